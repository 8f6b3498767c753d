# Every Pagoda NixOS module: the service, monitoring and the GPU switch. `defaultPackage` maps a
# pkgs to the package `services.pagoda.package` defaults to (the flake passes its own build).
{ defaultPackage }:
{
  imports = [
    (import ./pagoda.nix { inherit defaultPackage; })
    ./monitoring.nix
    ./gpu.nix
  ];
}
