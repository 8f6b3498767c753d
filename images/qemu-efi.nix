# A qcow2 with EFI for local QEMU/libvirt (`qemu-efi` variant: nixpkgs' virtualisation/disk-image.nix).
# Local VMs have no GPU passthrough by default: the GPU stack is off and the CPU build serves.
{ lib, ... }:

{
  pagoda.gpu.enable = lib.mkForce false;
}
