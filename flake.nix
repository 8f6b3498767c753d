{
  description = "Pagoda: an LLM inference appliance (server, OCI images, NixOS images per cloud)";

  # nixos-unstable, not nixos-26.05: `cargoLock.lockFile` needs importCargoLock to download from
  # static.crates.io (nixpkgs #524985, merged late May 2026; NIX_FACTS.md §4), which 26.05 is not
  # confirmed to carry, and the `dc` driver needs to ship open kernel modules (dc_580, §2.1).
  # `nix flake lock` records the exact revision in flake.lock; see README.md, "Nix".
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" ];
      forAllSystems = lib.genAttrs systems;

      # CUDA and the NVIDIA driver are unfree (NIX_FACTS.md §2.5).
      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          config.allowUnfree = true;
        };

      gitCommit = self.rev or self.dirtyRev or "unknown";

      pagodaFor =
        pkgs: cuda:
        pkgs.callPackage ./nix/package.nix {
          cudaSupport = cuda;
          inherit gitCommit;
        };

      # What `services.pagoda.package` defaults to: this flake's build, with CUDA or without.
      defaultPackage = { pkgs, cuda }: pagodaFor pkgs cuda;
      module = import ./nixos { inherit defaultPackage; };

      appliance =
        extra:
        lib.nixosSystem {
          modules = [
            module
            ./images/appliance.nix
            {
              nixpkgs.hostPlatform = "x86_64-linux";
              nixpkgs.config.allowUnfree = true;
            }
          ]
          ++ extra;
        };
    in
    {
      packages = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
          images = self.nixosConfigurations.appliance.config.system.build.images;
        in
        rec {
          pagoda = pagodaFor pkgs true;
          pagoda-cpu = pagodaFor pkgs false;
          oci = pkgs.callPackage ./nix/oci.nix { inherit pagoda; };
          oci-cpu = pkgs.callPackage ./nix/oci.nix {
            pagoda = pagoda-cpu;
            gpu = false;
          };
          image-aws = images.amazon;
          image-gcp = images.google-compute;
          image-azure = images.azure;
          image-qemu = images.qemu-efi;
          default = pagoda;
        }
      );

      nixosModules = {
        default = module;
        pagoda = import ./nixos/pagoda.nix { inherit defaultPackage; };
        monitoring = ./nixos/monitoring.nix;
        gpu = ./nixos/gpu.nix;
      };

      nixosConfigurations = {
        # The cloud appliance: GPU on, configured from user data. Build an image with
        # `nix build .#image-aws` (or `nixos-rebuild build-image --flake .#appliance --image-variant amazon`).
        appliance = appliance [ ];
        # The same machine without the GPU stack (`nixos-rebuild build-vm --flake .#appliance-cpu`).
        appliance-cpu = appliance [ { pagoda.gpu.enable = false; } ];
      };

      checks = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
        in
        {
          # The package's own tests run in its check phase.
          pagoda-cpu = self.packages.${system}.pagoda-cpu;
          vm = import ./checks/vm-test.nix {
            inherit pkgs;
            pagodaModule = module;
            pagodaCpu = self.packages.${system}.pagoda-cpu;
          };
        }
      );

      devShells = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
        in
        {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.pagoda-cpu ];
            packages = with pkgs; [
              cargo
              rustc
              clippy
              rustfmt
              rust-analyzer
              cudaPackages.cuda_nvcc
              kubernetes-helm
              kubectl
              nixfmt
              deadnix
              statix
              python3
            ];
          };
        }
      );

      formatter = forAllSystems (system: (pkgsFor system).nixfmt);
    };
}
