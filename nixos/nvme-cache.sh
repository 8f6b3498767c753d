# Puts the model cache on the instance's local NVMe disks (instance store: AWS p4d/p5, GCP a3's
# local SSDs, Azure ND H100 v5), the unit `pagoda-nvme-cache` that services.pagoda.localNvmeCache
# adds (nixos/pagoda.nix). The cache is the pagoda units' state directory, /var/lib/private/pagoda
# (systemd links /var/lib/pagoda to it for DynamicUser units): the disks' filesystem is mounted
# there before those units start, and systemd adopts the mount point as the directory, setting its
# mode and owner as it does for one it made. Without such disks, or with any doubt about them, the
# directory stays on the root disk: the script says why and exits 0, so serving never waits on it.
#
# A disk is formatted only when low-level probing (blkid -p) finds nothing on it: no filesystem,
# partition table or RAID member. Several disks become one RAID 0 array (mdadm): a p5 has 8 of
# 3.84 TB and an a3-highgpu-8g 16 of 375 GB, so one disk alone may not hold a large model, and
# loading it reads from all of them at once. The array and the filesystem are labelled
# `pagoda-cache`; after a reboot (instance store survives one) the array is assembled again and the
# filesystem mounted without formatting. Any other signature, a partition, a holder (md, dm) or a
# mix of blank disks and members is left alone, logged as a warning.
#
# PAGODA_ROOT_DIR replaces / for /sys/block, /dev and /var/lib (tests); the tools come from PATH.
set -u
shopt -s nullglob

root=${PAGODA_ROOT_DIR:-}
sys_block=$root/sys/block
dev=$root/dev
private=$root/var/lib/private
target=$private/pagoda
label=pagoda-cache
# A fixed md device: without mdadm's udev rules (boot.swraid is off) nothing makes the /dev/md/NAME
# link mdadm would otherwise wait for, while the kernel's /dev/mdN node always appears.
array=$dev/md100

root_disk() {
  echo "$1: the model cache stays on the root disk"
  exit 0
}

# "<4>" gives the line the warning priority in the journal (systemd's SyslogLevelPrefix=).
leave_alone() {
  echo "<4>$1: the model cache stays on the root disk"
  exit 0
}

# True for the models the clouds give their instance-store NVMe controllers (sysfs pads them with
# spaces, which `read` trims). GCE's persistent disks are "nvme_card-pd"; its local SSDs are
# "nvme_card", or "nvme_card<N>" with one controller per disk (guest-configs' udev rules).
# EBS ("Amazon Elastic Block Store") and Azure's remote disks ("MSFT NVMe Accelerator") never match.
is_instance_store() {
  case $1 in
    "Amazon EC2 NVMe Instance Storage" | "Microsoft NVMe Direct Disk" | "Microsoft NVMe Direct Disk v2") return 0 ;;
  esac
  [[ $1 =~ ^nvme_card[0-9]*$ ]]
}

# Sets `signature` to what is on the device $1: "" for nothing, "filesystem" for our filesystem,
# "member" for a member of our array, otherwise a description of what is there.
probe() {
  local output rc line type="" fs_label="" pttype=""
  # blkid reports a device it cannot open as empty (exit 2), the answer that allows formatting.
  if ! head -c 4096 "$1" >/dev/null 2>&1; then
    signature="nothing readable"
    return
  fi
  output=$(blkid -p -o export "$1" 2>/dev/null)
  rc=$?
  if [ "$rc" = 2 ]; then
    signature=""
    return
  elif [ "$rc" = 8 ]; then
    signature="several signatures"
    return
  elif [ "$rc" != 0 ]; then
    signature="what blkid could not identify (exit $rc)"
    return
  fi
  while IFS= read -r line; do
    case $line in
      TYPE=*) type=${line#TYPE=} ;;
      LABEL=*) fs_label=${line#LABEL=} ;;
      PTTYPE=*) pttype=${line#PTTYPE=} ;;
    esac
  done <<<"$output"
  if [ "$type" = ext4 ] && [ "$fs_label" = "$label" ]; then
    signature=filesystem
  # mdadm stores the array's name as "HOMEHOST:NAME".
  elif [ "$type" = linux_raid_member ] && [[ $fs_label == "$label" || $fs_label == *:"$label" ]]; then
    signature=member
  elif [ -n "$type" ]; then
    signature="$type${fs_label:+ labelled $fs_label}"
  else
    signature="a ${pttype:-partition} partition table"
  fi
}

if mountpoint -q "$target"; then
  echo "$target is already mounted"
  exit 0
fi

disks=()
for block in "$sys_block"/nvme*; do
  name=${block##*/}
  # Whole namespaces only, not a multipath namespace's hidden paths (nvmeXcYnZ).
  [[ $name =~ ^nvme[0-9]+n[0-9]+$ ]] || continue
  # device/ is the controller, or the subsystem of a multipath namespace: both have the model.
  [ -r "$block/device/model" ] || continue
  model=""
  read -r model <"$block/device/model"
  is_instance_store "$model" && disks+=("$name")
done
[ ${#disks[@]} -gt 0 ] || root_disk "no instance-store NVMe on this machine"
# In numeric order (nvme1n2 before nvme1n10), as the logs are read.
mapfile -t disks < <(printf '%s\n' "${disks[@]}" | sort -V)
echo "instance-store NVMe: ${disks[*]}"

members=()
num_blank=0
num_members=0
for name in "${disks[@]}"; do
  partitions=("$sys_block/$name/$name"p*)
  holders=("$sys_block/$name/holders"/*)
  [ ${#partitions[@]} -eq 0 ] || leave_alone "$dev/$name has partitions: left alone"
  [ ${#holders[@]} -eq 0 ] || leave_alone "$dev/$name is in use by ${holders[*]##*/}: left alone"
  members+=("$dev/$name")
  # One disk holds the filesystem itself, probed below; several must all be blank or all ours.
  if [ ${#disks[@]} -gt 1 ]; then
    probe "$dev/$name"
    case $signature in
      "") num_blank=$((num_blank + 1)) ;;
      member) num_members=$((num_members + 1)) ;;
      filesystem) leave_alone "$dev/$name holds a Pagoda cache filesystem of its own, not an array member: left alone" ;;
      *) leave_alone "$dev/$name holds $signature: left alone" ;;
    esac
  fi
done

if [ ${#members[@]} -eq 1 ]; then
  device=${members[0]}
elif [ "$num_blank" = ${#members[@]} ]; then
  echo "creating a RAID 0 array of ${#members[@]} disks at $array"
  mdadm --create "$array" --run --level=0 --raid-devices=${#members[@]} --metadata=1.2 --name="$label" "${members[@]}" ||
    leave_alone "creating the RAID 0 array failed"
  device=$array
elif [ "$num_members" = ${#members[@]} ]; then
  echo "assembling the RAID 0 array of an earlier boot at $array"
  mdadm --assemble "$array" --run "${members[@]}" || leave_alone "assembling the RAID 0 array failed"
  device=$array
else
  leave_alone "the disks are partly blank ($num_blank of ${#members[@]}) and partly members of an array: left alone"
fi

probe "$device"
case $signature in
  "")
    echo "formatting $device (ext4, label $label)"
    # No reserved blocks (nothing but the cache lives here), an inode per MiB (models are large
    # files), no discard pass (minutes on terabytes of flash) and lazy initialisation, so a large
    # array formats in seconds.
    mkfs.ext4 -q -F -m 0 -T largefile -L "$label" -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$device" ||
      leave_alone "formatting $device failed"
    ;;
  filesystem) echo "$device holds the model cache of an earlier boot" ;;
  member) leave_alone "$device is a member of a Pagoda array whose other disks are gone: left alone" ;;
  *) leave_alone "$device holds $signature: left alone" ;;
esac

# systemd keeps DynamicUser services' directories under this 0700 root-owned folder.
[ -d "$private" ] || mkdir -m 0700 "$private" || leave_alone "creating $private failed"
mkdir -p "$target" || leave_alone "creating $target failed"
mount -t ext4 -o noatime,nodev,nosuid "$device" "$target" || leave_alone "mounting $device at $target failed"
echo "mounted $device at $target: the model cache is on local NVMe"
