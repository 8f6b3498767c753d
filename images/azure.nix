# Azure (`azure` variant: nixpkgs' virtualisation/azure-image.nix with the Azure agent profile).
# The ND/NC H100 and H200 sizes run generation 2 (UEFI) VMs only.
# `virtualisation.azureImage.vmGeneration` and `virtualisation.diskSize`: NIX_FACTS.md §1.2.
{
  virtualisation.azureImage.vmGeneration = "v2";
  # MiB; Azure wants a fixed-size VHD, so the image file is this large.
  virtualisation.diskSize = 16384;
}
