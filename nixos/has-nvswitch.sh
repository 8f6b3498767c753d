# Exits 0 when the machine has an NVIDIA NVSwitch (a PCI device of vendor 0x10de and class 0x0680xx,
# "bridge, other"), 1 when it has none: the fabric manager's ExecCondition (nixos/gpu.nix), so one
# image boots 8-GPU NVSwitch shapes (p5, a3-highgpu-8g, ND H100 v5) with the fabric manager and
# single-GPU shapes without a failed unit. PAGODA_PCI_DEVICES replaces /sys/bus/pci/devices (tests).
devices=${PAGODA_PCI_DEVICES:-/sys/bus/pci/devices}
for device in "$devices"/*; do
  [ -r "$device/vendor" ] && [ -r "$device/class" ] || continue
  read -r vendor <"$device/vendor"
  read -r class <"$device/class"
  if [ "$vendor" = 0x10de ]; then
    case $class in
      0x0680*)
        echo "NVSwitch at ${device##*/}: the fabric manager starts"
        exit 0
        ;;
    esac
  fi
done
echo "no NVSwitch on this machine: the fabric manager is not needed"
exit 1
