# Google Compute Engine (`google-compute` variant: nixpkgs' virtualisation/google-compute-image.nix
# with the GCE guest profile). A3/G2 GPU machine types want UEFI images.
# `virtualisation.googleComputeImage.efi` and `virtualisation.diskSize`: NIX_FACTS.md §1.2.
{
  virtualisation.googleComputeImage.efi = true;
  # MiB; the boot disk grows to its size at launch.
  virtualisation.diskSize = 16384;
}
