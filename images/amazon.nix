# AWS (`amazon` variant: nixpkgs' maintainers/scripts/ec2/amazon-image.nix with the EC2 runtime
# profile). GPU instance types (p5, p4d, g6e) boot UEFI; register the AMI with `--boot-mode uefi`.
# `ec2.efi` and `virtualisation.diskSize` (which replaced amazonImage.sizeMB): NIX_FACTS.md §1.2.
{
  ec2.efi = true;
  # nixpkgs' amazon-image.nix imports amazon-init.nix, on by default: at every boot it writes user
  # data that is not a `#!` script to /etc/nixos/configuration.nix and runs `nixos-rebuild switch`.
  # Pagoda's user data is its launch configuration (`PAGODA_MODEL=…`, read by `pagoda metadata`),
  # which that rebuild would fail on. `virtualisation.amazon-init.enable`: amazon-init.nix.
  virtualisation.amazon-init.enable = false;
  # MiB. The CUDA libraries and the driver do not fit the 4 GiB default; the root partition grows
  # to the EBS volume's size at boot, and models are synced there.
  virtualisation.diskSize = 16384;
}
