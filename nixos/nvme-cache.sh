# Puts the model cache on the instance's local NVMe disks (instance store: AWS p4d/p5, GCP a3's
# local SSDs, Azure ND H100 v5), the unit `pagoda-nvme-cache` that services.pagoda.localNvmeCache
# adds (nixos/pagoda.nix). The cache is the pagoda units' state directory, /var/lib/private/pagoda
# (systemd links /var/lib/pagoda to it for DynamicUser units): the disks' filesystem is mounted
# there before those units start, and systemd adopts the mount point as the directory, setting its
# mode and owner as it does for one it made. Without such disks, or with any doubt about them, the
# directory stays on the root disk: the script says why and exits 0, so serving never waits on it.
#
# A disk is formatted only on positive evidence that nothing is on it. blkid -p alone is not that:
# it exits 2 ("nothing found") also when its probe failed (a read error, a device it cannot probe),
# and RAID 0.90/1.0 superblocks, a backup GPT and ZFS labels lie at the end of a disk. Blank means
# that blkid -p finds nothing and prints nothing, that wipefs (a second probe, which also lists
# signatures whose checksum fails and a GPT whose protective MBR is gone) lists nothing, and that
# the first and the last MiB of the size sysfs gives can be read. Several disks become one RAID 0
# array (mdadm): a p5 has 8 of 3.84 TB and an a3-highgpu-8g 16 of 375 GB, so one disk alone may not
# hold a large model, and loading it reads from all of them at once. The array and the filesystem
# are labelled `pagoda-cache`; after a reboot (instance store survives one) the array is assembled
# again and the filesystem mounted without formatting. Any other signature, a partition, a holder
# (md, dm), a disk that is not shown to be blank or a mix of blank disks and members is left alone,
# logged as a warning.
#
# Disks that appear late: first the script waits, at most PAGODA_NVME_WAIT_SEC seconds (30), until
# every NVMe controller in /sys/class/nvme reads "live" (not "new", "connecting" or "resetting"),
# then lets udev settle. A controller still not live then is logged as a warning. If it is (or may
# be, its model unknown) instance store, the set of disks is incomplete and the cache stays on the
# root disk this boot: an array of part of the disks would be smaller, and the next boot, seeing a
# blank disk beside its members, would leave it alone. Any other controller (an EBS volume's) is
# left out and the script goes on.
#
# The instance store is used only when its capacity (all its disks together) is at least the size
# of the root filesystem holding /var/lib; otherwise the root disk, the larger, keeps the cache.
#
# PAGODA_ROOT_DIR replaces / for /sys, /dev and /var/lib (tests); the tools come from PATH.
set -u
shopt -s nullglob

root=${PAGODA_ROOT_DIR:-}
sys_block=$root/sys/block
sys_nvme=$root/sys/class/nvme
dev=$root/dev
var_lib=$root/var/lib
private=$var_lib/private
target=$private/pagoda
label=pagoda-cache
# A fixed md device: without mdadm's udev rules (boot.swraid is off) nothing makes the /dev/md/NAME
# link mdadm would otherwise wait for, while the kernel's /dev/mdN node always appears.
array_name=md100
array=$dev/$array_name
wait_sec=${PAGODA_NVME_WAIT_SEC:-30}
[[ $wait_sec =~ ^[0-9]+$ ]] || wait_sec=30
mib=$((1 << 20))

root_disk() {
  echo "$1: the model cache stays on the root disk"
  exit 0
}

# "<4>" gives the line the warning priority in the journal (systemd's SyslogLevelPrefix=).
warn() {
  echo "<4>$1"
}

leave_alone() {
  warn "$1: the model cache stays on the root disk"
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

# A size in bytes as people read it.
human() {
  if [ "$1" -ge $((1 << 30)) ]; then
    echo "$(($1 >> 30)) GiB"
  else
    echo "$(($1 >> 20)) MiB"
  fi
}

# Sets `size` to the size in bytes of the block device named $1 (sysfs counts 512-byte sectors
# whatever the disk's block size); fails when sysfs does not give one.
device_size() {
  local sectors=""
  read -r sectors 2>/dev/null <"$sys_block/$1/size"
  [[ $sectors =~ ^[0-9]+$ ]] && [ "$sectors" -gt 0 ] || return 1
  size=$((sectors * 512))
}

# True when the $3 bytes from offset $2 of $1 can all be read: dd stops at the first read error,
# and comes back short where the device ends before the size it was said to have.
reads() {
  local count
  count=$(dd if="$1" bs=1M iflag=skip_bytes,count_bytes,fullblock skip="$2" count="$3" status=none 2>/dev/null | wc -c)
  [ "$((count))" = "$3" ]
}

# Sets `signature` to what is on the block device named $1: "" when it is shown to be blank,
# "filesystem" for our filesystem, "member" for a member of our array, otherwise what keeps it from
# being used, worded to follow the device's path ("holds ext4 labelled data").
probe() {
  local device=$dev/$1 output rc line type="" fs_label="" pttype="" offset found=""
  output=$(blkid -p -o export "$device" 2>&1)
  rc=$?
  if [ "$rc" = 8 ]; then
    signature="holds several signatures"
    return
  elif [ "$rc" = 2 ] && [ -n "$output" ]; then
    signature="could not be probed by blkid (${output//$'\n'/; })"
    return
  elif [ "$rc" != 0 ] && [ "$rc" != 2 ]; then
    signature="holds what blkid could not identify (exit $rc)"
    return
  elif [ "$rc" = 0 ]; then
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
      signature="holds $type${fs_label:+ labelled $fs_label}"
    else
      signature="holds a ${pttype:-partition} partition table"
    fi
    return
  fi
  # blkid found nothing and said nothing; wipefs lists what it finds, each signature on a line
  # (without -a it erases nothing; --no-act makes sure).
  output=$(wipefs --no-act --noheadings --output OFFSET,TYPE "$device" 2>&1)
  rc=$?
  if [ "$rc" != 0 ]; then
    signature="could not be probed by wipefs (${output//$'\n'/; })"
    return
  elif [ -n "$output" ]; then
    while read -r offset type; do
      found="${found:+$found, }$type at $offset"
    done <<<"$output"
    signature="holds $found (found by wipefs)"
    return
  fi
  if ! device_size "$1"; then
    signature="has no size in sysfs"
    return
  fi
  local chunk=$((size < mib ? size : mib))
  if ! reads "$device" 0 "$chunk"; then
    signature="cannot be read in its first MiB"
  elif ! reads "$device" $((size - chunk)) "$chunk"; then
    signature="cannot be read in its last MiB (of $(human "$size"))"
  else
    signature=""
  fi
}

# Sets `not_live` to the NVMe controllers whose state is not "live".
not_live=()
controllers_not_live() {
  local controller state
  not_live=()
  for controller in "$sys_nvme"/nvme*; do
    [[ ${controller##*/} =~ ^nvme[0-9]+$ ]] || continue
    state=""
    read -r state 2>/dev/null <"$controller/state"
    [ "$state" = live ] || not_live+=("${controller##*/}")
  done
}

# Microseconds since the epoch.
now() {
  echo "${EPOCHREALTIME/[.,]/}"
}

if mountpoint -q "$target"; then
  echo "$target is already mounted"
  exit 0
fi

controllers_not_live
if [ ${#not_live[@]} -gt 0 ]; then
  echo "waiting up to $wait_sec s for NVMe controllers to come up: ${not_live[*]}"
fi
deadline=$(($(now) + wait_sec * 1000000))
while [ ${#not_live[@]} -gt 0 ] && [ "$(now)" -lt "$deadline" ]; do
  sleep 0.1
  controllers_not_live
done
for controller in "${not_live[@]}"; do
  state="" model=""
  read -r state 2>/dev/null <"$sys_nvme/$controller/state"
  read -r model 2>/dev/null <"$sys_nvme/$controller/model"
  said="NVMe controller $controller (${model:-model unknown}) is not live after $wait_sec s (${state:-no state})"
  if [ -n "$model" ] && ! is_instance_store "$model"; then
    warn "$said: left out, it is not instance store"
  else
    leave_alone "$said: the instance-store disks may be incomplete"
  fi
done
# The namespaces of a controller that has just come up are added as udev events; let udev finish.
if command -v udevadm >/dev/null 2>&1; then
  udevadm settle --timeout=30 || warn "udev did not settle within 30 s: going on with the disks there are"
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

num_blank=0
num_members=0
capacity=0
for name in "${disks[@]}"; do
  partitions=("$sys_block/$name/$name"p*)
  holders=("$sys_block/$name/holders"/*)
  [ ${#partitions[@]} -eq 0 ] || leave_alone "$dev/$name has partitions: left alone"
  [ ${#holders[@]} -eq 0 ] || leave_alone "$dev/$name is in use by ${holders[*]##*/}: left alone"
  device_size "$name" || leave_alone "$dev/$name has no size in sysfs: left alone"
  capacity=$((capacity + size))
  # One disk holds the filesystem itself, probed below; several must all be blank or all ours.
  if [ ${#disks[@]} -gt 1 ]; then
    probe "$name"
    case $signature in
      "") num_blank=$((num_blank + 1)) ;;
      member) num_members=$((num_members + 1)) ;;
      filesystem) leave_alone "$dev/$name holds a Pagoda cache filesystem of its own, not an array member: left alone" ;;
      *) leave_alone "$dev/$name $signature: left alone" ;;
    esac
  fi
done

# statvfs of the root filesystem: its size in bytes.
root_size=$(df -B1 --output=size "$var_lib" 2>/dev/null | tail -n 1)
root_size=${root_size//[[:space:]]/}
[[ $root_size =~ ^[0-9]+$ ]] || leave_alone "the size of the filesystem holding $var_lib is unknown"
if [ "$capacity" -lt "$root_size" ]; then
  root_disk "the instance store ($(human "$capacity")) is smaller than the root filesystem ($(human "$root_size"))"
fi

members=("${disks[@]/#/$dev/}")
if [ ${#disks[@]} -eq 1 ]; then
  device_name=${disks[0]}
elif [ "$num_blank" = ${#disks[@]} ]; then
  echo "creating a RAID 0 array of ${#disks[@]} disks at $array"
  mdadm --create "$array" --run --level=0 --raid-devices=${#disks[@]} --metadata=1.2 --name="$label" "${members[@]}" ||
    leave_alone "creating the RAID 0 array failed"
  device_name=$array_name
elif [ "$num_members" = ${#disks[@]} ]; then
  echo "assembling the RAID 0 array of an earlier boot at $array"
  mdadm --assemble "$array" --run "${members[@]}" || leave_alone "assembling the RAID 0 array failed"
  device_name=$array_name
else
  leave_alone "the disks are partly blank ($num_blank of ${#disks[@]}) and partly members of an array: left alone"
fi
device=$dev/$device_name

probe "$device_name"
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
  *) leave_alone "$device $signature: left alone" ;;
esac

# systemd keeps DynamicUser services' directories under this 0700 root-owned folder.
[ -d "$private" ] || mkdir -m 0700 "$private" || leave_alone "creating $private failed"
mkdir -p "$target" || leave_alone "creating $target failed"
mount -t ext4 -o noatime,nodev,nosuid "$device" "$target" || leave_alone "mounting $device at $target failed"
echo "mounted $device at $target: the model cache is on local NVMe"
