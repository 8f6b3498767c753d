# The appliance: one generic machine per cloud, configured at launch from the instance's user
# data (`pagoda metadata`), so the same image serves any model.
#
# This configuration stays image-agnostic: importing an image module here would make
# `system.build.images` vanish (NIX_FACTS.md §1.1, trap 1). Each cloud's profile (its agents,
# serial console, disk growth, SSH keys from metadata) comes from the builder module nixpkgs'
# images.nix attaches to the variant; our per-cloud settings go in `image.modules.<variant>`.
{ lib, ... }:

{
  services.pagoda = {
    enable = true;
    # Clients reach the server from outside the instance; put the API key in the user data
    # (`api_key_file`, or a secret the instance can read) before exposing the port publicly.
    host = "0.0.0.0";
    openFirewall = true;
    launchConfigFromMetadata = true;
    # The GPU shapes' instance-store NVMe (p4d/p5, a3, ND H100 v5) holds the model cache where
    # present; elsewhere (and in the qemu image) it stays on the root disk.
    localNvmeCache = true;
  };

  pagoda.monitoring = {
    enable = true;
    prometheus.enable = true;
  };

  # The cloud profiles turn sshd on with keys from metadata; keep logins key-only.
  services.openssh.settings = {
    PasswordAuthentication = false;
    KbdInteractiveAuthentication = false;
  };

  system.stateVersion = "26.05";

  image.modules = {
    amazon = ./amazon.nix;
    google-compute = ./google-compute.nix;
    azure = ./azure.nix;
    qemu-efi = ./qemu-efi.nix;
  };

  # Images are built for GPU instances; `nixos-rebuild build-vm` and the qemu image are not.
  pagoda.gpu.enable = lib.mkDefault true;
}
