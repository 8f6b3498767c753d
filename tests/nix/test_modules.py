"""The NixOS modules, evaluated offline with nixpkgs' `lib.evalModules` (tests/nix/eval.nix).

No nixpkgs checkout and no builds: the NixOS options the modules set are stubs, so these tests check
what our modules render (ExecStart, environment, unit ordering, firewall ports, the GPU and
monitoring switches, the image variants) and that bad values fail with the option's name. The
modules' boot-time scripts (the NVSwitch check, the NVMe model cache) run against stand-ins for
sysfs and the disks. The lib comes from NIXPKGS_LIB (a checkout of nixpkgs or of
nix-community/nixpkgs.lib); without it, or without `nix-instantiate`, the tests say they did not
run.
"""

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EVAL = ROOT / "tests" / "nix" / "eval.nix"


def lib_dir():
    given = os.environ.get("NIXPKGS_LIB")
    if not given:
        return None
    path = pathlib.Path(given)
    # Either the repository (which holds lib/) or lib/ itself.
    for candidate in (path / "lib", path):
        if (candidate / "default.nix").is_file() and (candidate / "modules.nix").is_file():
            return candidate
    pytest.fail(f"NIXPKGS_LIB={given} holds no nixpkgs lib (lib/default.nix and lib/modules.nix)")


def require_tools():
    if shutil.which("nix-instantiate") is None:
        message = "nix-instantiate is not installed (Debian: apt-get install nix-bin)"
        if os.environ.get("PAGODA_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        print(f"did not run: {message}")
        pytest.skip(message)
    lib = lib_dir()
    if lib is None:
        # nixpkgs' lib is on GitHub only, which CI cannot reach; test.sh points NIXPKGS_LIB at a
        # local copy where one exists.
        message = "NIXPKGS_LIB is not set: no nixpkgs lib to evaluate the modules with"
        print(f"did not run: {message}")
        pytest.skip(message)
    return lib


def instantiate(attr, eval_file=EVAL):
    lib = require_tools()
    return subprocess.run(
        [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            str(eval_file),
            "--arg",
            "lib",
            f"import {lib}",
            "-A",
            attr,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@functools.cache
def scenario(name):
    result = instantiate(name)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def argv(unit):
    """The ExecStart words after the program (quoting from lib.escapeShellArgs removed)."""
    words = unit["ExecStart"].split()
    assert words[0].endswith("/bin/pagoda"), unit["ExecStart"]
    return [w.strip("'") for w in words[1:]]


def test_defaults_listen_on_loopback_with_the_firewall_closed():
    s = scenario("defaults")
    serve = s["units"]["pagoda"]
    assert argv(serve) == [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--download-dir",
        "/var/lib/pagoda/models",
        "$PAGODA_EXTRA_ARGS",
    ]
    assert s["firewall"] == []
    assert "PAGODA_MODEL" not in serve["environment"]
    assert serve["environment"]["PAGODA_DOWNLOAD_DIR"] == "/var/lib/pagoda/models"
    assert serve["wantedBy"] == ["multi-user.target"]
    # Without launchConfigFromMetadata there is no metadata unit and no launch environment file.
    assert set(s["units"]) == {"pagoda", "pagoda-model-sync"}
    assert serve["EnvironmentFile"] == []
    # The CPU build, since the GPU is off.
    assert "-pagoda-cpu/bin/pagoda" in serve["ExecStart"]


def test_disabled_service_renders_nothing():
    s = scenario("disabled")
    assert s["units"] == {}
    assert s["firewall"] == []


def test_configured_server_renders_flags_environment_and_firewall():
    s = scenario("configured")
    serve = s["units"]["pagoda"]
    assert argv(serve) == [
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--download-dir",
        "/var/lib/pagoda/models",
        # settings in name order: false gives --no-NAME, true the bare flag, null nothing.
        "--no-enable-chunked-prefill",
        "--enable-prefix-caching",
        "--max-model-len",
        "8192",
        # extraFlags after settings.
        "--max-queue",
        "512",
        "$PAGODA_EXTRA_ARGS",
    ]
    assert s["firewall"] == [8080]
    # Each connection holds a file descriptor: room for --max-connections' default and more.
    assert serve["LimitNOFILE"] == 65536
    env = serve["environment"]
    assert env["PAGODA_MODEL"] == "s3://models/meta-llama/Llama-3.1-8B-Instruct"
    assert env["PAGODA_SERVED_MODEL_NAME"] == "llama-3.1-8b"
    assert env["PAGODA_API_KEY_FILE"] == "/run/secrets/pagoda-api-key"
    assert env["AWS_REGION"] == "eu-west-1"
    assert serve["EnvironmentFile"] == ["/run/secrets/store-credentials"]
    # The sync sees the same model, store settings and credentials as the server.
    sync = s["units"]["pagoda-model-sync"]
    assert sync["environment"] == env
    assert sync["EnvironmentFile"] == serve["EnvironmentFile"]


def test_sync_runs_before_the_server_and_is_retried():
    s = scenario("configured")
    serve, sync = s["units"]["pagoda"], s["units"]["pagoda-model-sync"]
    assert "pagoda-model-sync.service" in serve["requires"]
    assert "pagoda-model-sync.service" in serve["after"]
    assert argv(sync) == ["sync", "--progress", "log"]
    assert sync["Type"] == "oneshot"
    assert sync["Restart"] == "on-failure"
    assert "network-online.target" in sync["after"]
    # The sync is pulled in by the server, not started on its own.
    assert sync["wantedBy"] == []


def test_gpu_device_access_is_limited_to_nvidia_devices():
    serve = scenario("defaults")["units"]["pagoda"]
    assert serve["DeviceAllow"], "the server needs the NVIDIA devices"
    assert all(rule.startswith("char-nvidia") and rule.endswith(" rw") for rule in serve["DeviceAllow"])


def test_launch_configuration_from_metadata_comes_first():
    s = scenario("launchConfig")
    launch = s["units"]["pagoda-launch-config"]
    assert argv(launch) == ["metadata", "--output", "/run/pagoda/launch.env"]
    assert launch["Type"] == "oneshot"
    assert launch["Restart"] == "on-failure"
    assert set(launch["before"]) == {"pagoda-model-sync.service", "pagoda.service"}
    # The API key it writes from a cloud secret (mode 0600) must be the server's to read: one
    # dynamic user for the three units.
    assert launch["DynamicUser"] and launch["User"] == s["units"]["pagoda"]["User"] == "pagoda"
    # ... and the key goes with the unit, so it never outlives the allocation of that user's UID.
    assert launch["RuntimeDirectoryPreserve"] is False
    sync = s["units"]["pagoda-model-sync"]
    assert "pagoda-launch-config.service" in sync["requires"]
    assert "pagoda-launch-config.service" in sync["after"]
    # The launch file is optional ("-") and read by both units, after `environment`.
    for unit in ("pagoda", "pagoda-model-sync"):
        assert s["units"][unit]["EnvironmentFile"] == ["-/run/pagoda/launch.env"]


def test_monitoring_scrapes_node_and_pagoda_without_a_gpu():
    s = scenario("monitoring")
    assert s["exporters"] == {"node": True, "nvidia-gpu": False}
    # host "::" is a wildcard: scraped over loopback.
    assert s["scrapeJobs"] == {"node": ["127.0.0.1:9100"], "pagoda": ["127.0.0.1:8000"]}
    assert s["prometheus"] and s["grafana"]
    assert s["grafanaProvisioning"] == {"datasources": ["Prometheus"], "dashboards": ["pagoda"]}
    assert s["failedAssertions"] == []


def test_grafana_needs_a_secret_key_and_prometheus():
    s = scenario("grafanaWithoutKey")
    assert any("secretKeyFile" in m for m in s["failedAssertions"]), s["failedAssertions"]
    assert any("prometheus.enable" in m for m in s["failedAssertions"]), s["failedAssertions"]


def test_gpu_switch_turns_on_driver_toolkit_exporter_and_cuda_build():
    s = scenario("gpu")
    assert s["nvidia"] == {
        "datacenter": True,
        "open": True,
        "package": "nvidia-dc",
        "persistenced": True,
        "settings": False,
    }
    # The default: datacenter mode, the fabric manager only where an NVSwitch is found at boot.
    assert "nvidia" not in s["videoDrivers"]
    assert s["units"]["nvidia-fabricmanager"]["ExecCondition"].endswith("-pagoda-has-nvswitch")
    assert s["graphics"] and s["containerToolkit"]
    assert s["kernelModules"] == ["nvidia_uvm"]
    assert s["exporters"]["nvidia-gpu"]
    assert s["scrapeJobs"]["nvidia-gpu"] == ["127.0.0.1:9835"]
    assert "-pagoda/bin/pagoda" in s["units"]["pagoda"]["ExecStart"]


def test_fabric_manager_uses_datacenter_mode_without_video_drivers():
    s = scenario("gpuFabric")
    # The two driver modes exclude each other (nixpkgs asserts it): nixpkgs' default drivers stay.
    assert s["nvidia"]["datacenter"] and "nvidia" not in s["videoDrivers"]
    assert s["nvidia"]["open"] is False
    assert s["graphics"], "datacenter mode needs hardware.graphics for /run/opengl-driver"
    # Forced on: no start condition of ours.
    assert "nvidia-fabricmanager" not in s["units"] or s["units"]["nvidia-fabricmanager"]["ExecCondition"] is None
    # Forced off: the driver through videoDrivers, no datacenter mode, no fabric manager.
    off = scenario("gpuNoFabric")
    assert not off["nvidia"]["datacenter"] and off["videoDrivers"] == ["nvidia"]
    assert "nvidia-fabricmanager" not in off["units"]


HAS_NVSWITCH = ROOT / "nixos" / "has-nvswitch.sh"


def pci_tree(root, devices):
    """A stand-in for /sys/bus/pci/devices: one folder per (vendor, class)."""
    for i, (vendor, cls) in enumerate(devices):
        device = root / f"0000:{i:02x}:00.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(cls + "\n")
    return root


@pytest.mark.parametrize(
    "devices, found",
    [
        # p5.48xlarge-like: 8 H100s (3D controller 0x0302) and 4 NVSwitches (bridge 0x0680).
        ([("0x10de", "0x030200")] * 8 + [("0x10de", "0x068000")] * 4 + [("0x1d0f", "0x010802")], True),
        # g6e.xlarge-like: one GPU, an NVMe disk, no NVSwitch.
        ([("0x10de", "0x030200"), ("0x1d0f", "0x010802")], False),
        # A bridge of another vendor is not an NVSwitch.
        ([("0x8086", "0x068000")], False),
        ([], False),
    ],
    ids=["nvswitch", "single-gpu", "other-bridge", "empty"],
)
def test_the_fabric_manager_starts_only_where_an_nvswitch_is(tmp_path, devices, found):
    tree = pci_tree(tmp_path / "devices", devices)
    result = subprocess.run(["bash", str(HAS_NVSWITCH)], env={"PAGODA_PCI_DEVICES": str(tree)},
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == (0 if found else 1), result.stdout + result.stderr
    assert ("NVSwitch at" in result.stdout) == found, result.stdout


NVME_CACHE = ROOT / "nixos" / "nvme-cache.sh"
EBS = "Amazon Elastic Block Store"
AWS_INSTANCE_STORE = "Amazon EC2 NVMe Instance Storage"
GCE_PERSISTENT_DISK = "nvme_card-pd"
AZURE_DIRECT_DISK = "Microsoft NVMe Direct Disk"

# mdadm for the tests. --create writes an md v1.2 superblock (the real layout and checksum, so the
# real blkid reads a member as mdadm's would be read) to each member, or with --metadata=1.0 one at
# the end of each member (where mdadm puts it: 8 to 12 KiB before the end, 4 KiB aligned), and
# makes the array: a link from /dev to a file kept outside it, as large as the members, and its size
# in sysfs as the kernel gives it; --assemble checks the superblocks and links the kept file again.
# Every call is logged.
FAKE_MDADM = r"""#!PYTHON
import os, struct, sys, uuid

MAGIC = 0xA92B4EFC
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("mdadm " + " ".join(args) + "\n")
mode, array = args[0], args[1]
members = [a for a in args[2:] if not a.startswith("-")]
kept = os.path.join(os.environ["FAKE_STATE"], "array")


# data_offset, data_size and super_offset in 512-byte sectors.
def superblock(name, role, data_offset, data_size, super_offset):
    sb = bytearray(256 + 2 * len(members))
    struct.pack_into("<II", sb, 0, MAGIC, 1)
    sb[16:32] = uuid.uuid4().bytes
    sb[32:32 + len(name)] = name.encode()
    struct.pack_into("<I", sb, 92, len(members))
    struct.pack_into("<QQQ", sb, 128, data_offset, data_size, super_offset)
    struct.pack_into("<I", sb, 160, role)
    struct.pack_into("<I", sb, 220, len(members))
    for i in range(len(members)):
        struct.pack_into("<H", sb, 256 + 2 * i, i)
    total = sum(struct.unpack_from("<%dI" % (len(sb) // 4), sb))
    if len(sb) % 4:
        total += struct.unpack_from("<H", sb, len(sb) - 2)[0]
    struct.pack_into("<I", sb, 216, ((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF)
    return bytes(sb)


if mode == "--create":
    name = next(a for a in args if a.startswith("--name=")).split("=", 1)[1]
    at_end = "--metadata=1.0" in args
    for role, member in enumerate(members):
        size = os.path.getsize(member)
        if at_end:
            offset = (size & ~0xFFF) - 0x2000
            sb = superblock("testhost:" + name, role, 0, offset // 512, offset // 512)
        else:
            offset = 4096
            sb = superblock("testhost:" + name, role, 2048, size // 512 - 2048, 8)
        with open(member, "r+b") as f:
            f.seek(offset)
            f.write(sb)
    with open(kept, "wb") as f:
        f.truncate(sum(os.path.getsize(m) for m in members))
elif mode == "--assemble":
    for member in members:
        with open(member, "rb") as f:
            f.seek(4096)
            if struct.unpack("<I", f.read(4))[0] != MAGIC:
                sys.exit("mdadm: no superblock on " + member)
    if not os.path.exists(kept):
        sys.exit("mdadm: the array's contents are gone")
else:
    sys.exit("mdadm: unexpected call")
os.symlink(kept, array)
if "PAGODA_ROOT_DIR" in os.environ:
    block = os.path.join(os.environ["PAGODA_ROOT_DIR"], "sys", "block", os.path.basename(array))
    os.makedirs(block, exist_ok=True)
    with open(os.path.join(block, "size"), "w") as f:
        f.write("%d\n" % (os.path.getsize(kept) // 512))
"""

# udevadm for the tests: `udevadm settle` is logged and returns at once.
FAKE_UDEVADM = """#!/usr/bin/env bash
echo "udevadm $*" >>"$FAKE_LOG"
"""

FAKE_MOUNT = """#!/usr/bin/env bash
echo "mount $*" >>"$FAKE_LOG"
[ -z "${FAKE_MOUNT_FAILS:-}" ]
"""


def disk_tools_path(extra=()):
    """PATH with blkid and wipefs (util-linux) and mkfs.ext4 (e2fsprogs), which the script runs for
    real on files standing in for the disks, and the tools in `extra`: (tool, Debian package)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    tools = [("blkid", "util-linux"), ("wipefs", "util-linux"), ("mkfs.ext4", "e2fsprogs"), *extra]
    missing = [(tool, package) for tool, package in tools if shutil.which(tool, path=path) is None]
    if missing:
        names = " and ".join(tool for tool, _ in missing)
        packages = " ".join(sorted({package for _, package in missing}))
        message = f"{names} not installed (Debian: apt-get install {packages})"
        if os.environ.get("PAGODA_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        print(f"did not run: {message}")
        pytest.skip(message)
    return path


def is_instance_store(model):
    """The models nvme-cache.sh takes for instance store, to size the disks standing in for them."""
    return model in (AWS_INSTANCE_STORE, AZURE_DIRECT_DISK, AZURE_DIRECT_DISK + " v2") or re.fullmatch(r"nvme_card\d*", model)


class Machine:
    """What the script sees of an instance, under a folder standing in for /: sys/class/nvme with
    each controller's model (padded to 40 characters, as sysfs gives it) and state, sys/block with
    each namespace's size and its device/ linked to the controller, a sparse file per namespace in
    dev/, var/lib; and mdadm, mount and udevadm replaced by logging stubs.

    The instance store must be at least as large as the root filesystem, here the one holding the
    test's folder: unless `size` is given, each instance-store namespace gets its share of that
    filesystem's size and a MiB more (sparse files: nothing is written but what mkfs writes)."""

    def __init__(self, tmp_path, controllers, size=None, down=()):
        """controllers: (model, number of namespaces) for nvme0, nvme1, ...; down: the controllers
        still "connecting", whose namespaces are not there yet (see bring_up)."""
        self.root = tmp_path / "root"
        self.state = tmp_path / "state"
        self.bin = tmp_path / "bin"
        self.log = tmp_path / "calls.log"
        for folder in (self.root / "sys" / "block", self.root / "dev", self.root / "var" / "lib", self.state, self.bin):
            folder.mkdir(parents=True)
        self.log.write_text("")
        if size is None:
            num_instance_store = sum(n for model, n in controllers if is_instance_store(model)) or 1
            share = -(-shutil.disk_usage(self.root / "var" / "lib").total // num_instance_store)
            size = max(32 << 20, -(-share >> 20 << 20) + (1 << 20))
        self.size = size
        self.controllers = controllers
        for index, (model, num_namespaces) in enumerate(controllers):
            controller = self.controller(index)
            controller.mkdir(parents=True)
            (controller / "model").write_text(f"{model:<40}\n")
            if index in down:
                (controller / "state").write_text("connecting\n")
            else:
                self.bring_up(index)
        mdadm = self.bin / "mdadm"
        mdadm.write_text(FAKE_MDADM.replace("PYTHON", sys.executable, 1))
        (self.bin / "mount").write_text(FAKE_MOUNT)
        (self.bin / "udevadm").write_text(FAKE_UDEVADM)
        for stub in ("mdadm", "mount", "udevadm"):
            (self.bin / stub).chmod(0o755)

    def controller(self, index):
        return self.root / "sys" / "class" / "nvme" / f"nvme{index}"

    def bring_up(self, index):
        """The controller's namespaces appear, then it reads "live"."""
        controller = self.controller(index)
        for nsid in range(1, self.controllers[index][1] + 1):
            name = f"nvme{index}n{nsid}"
            block = self.root / "sys" / "block" / name
            (block / "holders").mkdir(parents=True)
            (block / "size").write_text(f"{self.size // 512}\n")
            (block / "device").symlink_to(controller)
            with open(self.dev(name), "wb") as f:
                f.truncate(self.size)
        with open(self.log, "a") as log:
            log.write(f"(nvme{index} is live)\n")
        (controller / "state").write_text("live\n")

    def dev(self, name):
        return self.root / "dev" / name

    @property
    def cache_dir(self):
        return self.root / "var" / "lib" / "private" / "pagoda"

    def boot(self, **env):
        """Runs the script as the unit would at boot; returns its result and the calls of mdadm and
        mount (`self.events` keeps every line of the log, udevadm's and bring_up's included)."""
        self.log.write_text("")
        started = time.monotonic()
        result = subprocess.run(
            ["bash", str(NVME_CACHE)],
            env={"PATH": f"{self.bin}{os.pathsep}{disk_tools_path()}", "PAGODA_ROOT_DIR": str(self.root),
                 "FAKE_LOG": str(self.log), "FAKE_STATE": str(self.state), **env},
            capture_output=True, text=True, timeout=120,
        )
        self.seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr == "", result.stderr
        self.events = self.log.read_text().splitlines()
        return result, [e for e in self.events if e.startswith(("mdadm ", "mount "))]

    def reboot(self):
        """The kernel's md device is gone after a reboot; the disks keep what was written."""
        array = self.dev("md100")
        if array.is_symlink():
            array.unlink()
        shutil.rmtree(self.root / "sys" / "block" / "md100", ignore_errors=True)


def probe(path):
    """What the real blkid finds on a file: its KEY=value pairs, empty for nothing."""
    result = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True, text=True,
                            env={"PATH": disk_tools_path()}, timeout=30)
    assert result.returncode in (0, 2, 8), result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def signatures(path):
    """What the real wipefs lists on a file (nothing erased), or its error."""
    result = subprocess.run(["wipefs", "--no-act", "--noheadings", str(path)], capture_output=True, text=True,
                            env={"PATH": disk_tools_path()}, timeout=30)
    return result.returncode, result.stdout, result.stderr


def mount_call(machine, device):
    return f"mount -t ext4 -o noatime,nodev,nosuid {device} {machine.cache_dir}"


# Instance shapes: the root disk first where it is NVMe, then the instance-store namespaces.
SHAPES = {
    # p5.48xlarge: an EBS root and 8 instance-store disks of 3.84 TB, one controller each.
    "p5": ([(EBS, 1)] + [(AWS_INSTANCE_STORE, 1)] * 8, [f"nvme{i}n1" for i in range(1, 9)]),
    # a3-highgpu-8g: an NVMe persistent boot disk and 16 local SSDs, namespaces of one controller.
    "a3": ([(GCE_PERSISTENT_DISK, 1), ("nvme_card", 16)], [f"nvme1n{i}" for i in range(1, 17)]),
    # GCE's local SSDs as controllers of their own, "nvme_card<N>" (guest-configs' udev rules
    # name both layouts).
    "gce-multi-controller": ([(GCE_PERSISTENT_DISK, 1), ("nvme_card0", 1), ("nvme_card1", 1)], ["nvme1n1", "nvme2n1"]),
    # ND96isr H100 v5: a SCSI OS disk (not NVMe) and 8 NVMe direct disks of 3.5 TB.
    "nd-h100-v5": ([(AZURE_DIRECT_DISK, 1)] * 8, [f"nvme{i}n1" for i in range(8)]),
    # Azure's v6 sizes: an NVMe OS disk and the second generation of direct disks.
    "azure-v6": ([("MSFT NVMe Accelerator v1.0", 1)] + [(AZURE_DIRECT_DISK + " v2", 1)] * 2, ["nvme1n1", "nvme2n1"]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_instance_store_nvme_becomes_one_array_mounted_at_the_state_directory(tmp_path, shape):
    controllers, instance_store = SHAPES[shape]
    machine = Machine(tmp_path, controllers)
    members = [str(machine.dev(name)) for name in instance_store]
    array = machine.dev("md100")
    result, calls = machine.boot()
    assert calls == [
        f"mdadm --create {array} --run --level=0 --raid-devices={len(members)} --metadata=1.2 "
        f"--name=pagoda-cache {' '.join(members)}",
        mount_call(machine, array),
    ], result.stdout
    for member in members:
        assert probe(member)["TYPE"] == "linux_raid_member"
    filesystem = probe(array)
    assert (filesystem["TYPE"], filesystem["LABEL"]) == ("ext4", "pagoda-cache")
    # The disks that are not instance store are never touched.
    for name in {f"nvme{i}n1" for i in range(len(controllers))} - set(instance_store):
        assert probe(machine.dev(name)) == {}, name
    # systemd's boundary for DynamicUser directories, made as systemd makes it.
    assert machine.cache_dir.is_dir()
    assert machine.cache_dir.parent.stat().st_mode & 0o777 == 0o700
    assert "the model cache is on local NVMe" in result.stdout


def test_a_single_instance_store_disk_is_formatted_without_an_array(tmp_path):
    # p5.4xlarge: an EBS root and one 3.84 TB instance-store disk.
    machine = Machine(tmp_path, [(EBS, 1), (AWS_INSTANCE_STORE, 1)])
    disk = machine.dev("nvme1n1")
    result, calls = machine.boot()
    assert calls == [mount_call(machine, disk)], result.stdout
    filesystem = probe(disk)
    assert (filesystem["TYPE"], filesystem["LABEL"]) == ("ext4", "pagoda-cache")
    assert probe(machine.dev("nvme0n1")) == {}


@pytest.mark.parametrize("shape", ["single", "p5"])
def test_after_a_reboot_the_cache_is_mounted_again_without_formatting(tmp_path, shape):
    controllers = [(EBS, 1), (AWS_INSTANCE_STORE, 1)] if shape == "single" else SHAPES["p5"][0]
    machine = Machine(tmp_path, controllers)
    machine.boot()
    device = machine.dev("nvme1n1" if shape == "single" else "md100")
    formatted = probe(device)["UUID"]
    machine.reboot()
    result, calls = machine.boot()
    if shape == "p5":
        members = " ".join(str(machine.dev(f"nvme{i}n1")) for i in range(1, 9))
        assert calls[0] == f"mdadm --assemble {device} --run {members}", calls
    assert calls[-1] == mount_call(machine, device)
    assert not any("--create" in call for call in calls), calls
    assert probe(device)["UUID"] == formatted, "the cache was formatted again"
    assert "earlier boot" in result.stdout


@pytest.mark.parametrize(
    "controllers",
    [
        # An instance type without instance store: only the EBS root.
        [(EBS, 1)],
        # A GCE machine without local SSD: only the persistent boot disk.
        [(GCE_PERSISTENT_DISK, 1)],
        # No NVMe at all (a SCSI root disk).
        [],
    ],
    ids=["ebs-only", "gce-pd-only", "no-nvme"],
)
def test_without_instance_store_the_root_disk_keeps_the_cache(tmp_path, controllers):
    machine = Machine(tmp_path, controllers)
    result, calls = machine.boot()
    assert calls == []
    assert "no instance-store NVMe on this machine: the model cache stays on the root disk" in result.stdout
    assert not machine.cache_dir.parent.exists()


def put_filesystem(machine, name):
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "scratch", str(machine.dev(name))], check=True,
                   env={"PATH": disk_tools_path()}, capture_output=True, timeout=60)


def put_two_filesystems(machine, name):
    """ext4 and an ISO 9660 volume descriptor at once: blkid's "ambivalent result" (exit 8)."""
    put_filesystem(machine, name)
    with open(machine.dev(name), "r+b") as f:
        f.seek(32768)
        f.write(b"\x01CD001\x01\x00" + b"LINUX".ljust(32) + b"VOLUME".ljust(32))
        f.seek(32768 + 2048)
        f.write(b"\xffCD001\x01")


def put_foreign_array_member(machine, name, metadata="1.2"):
    """An md member of someone else's array, written by the mdadm stub: its superblock 4 KiB from
    the start (1.2), or only near the end of the disk (1.0, as 0.90 is too)."""
    subprocess.run([str(machine.bin / "mdadm"), "--create", str(machine.root / "elsewhere"), f"--metadata={metadata}",
                    "--name=data", str(machine.dev(name))],
                   check=True, env={"FAKE_LOG": os.devnull, "FAKE_STATE": str(machine.state)})


def put_backup_gpt_only(machine, name):
    """A GPT written by the real sfdisk, then the disk's first MiB zeroed (a common way of
    "wiping" a disk): only the backup GPT at the end remains. blkid -p finds nothing (it looks for
    a GPT only behind a protective MBR); wipefs finds it."""
    path = disk_tools_path([("sfdisk", "fdisk")])
    subprocess.run(["sfdisk", "-q", str(machine.dev(name))], input="label: gpt\n,,L\n", text=True, check=True,
                   env={"PATH": path}, capture_output=True, timeout=60)
    with open(machine.dev(name), "r+b") as f:
        f.write(bytes(1 << 20))
    assert probe(machine.dev(name)) == {}, "blkid alone finds the backup GPT: the case proves nothing"


def cut_short(machine, name, size):
    """The disk reads as `size` bytes while sysfs gives it machine.size: reads past `size` come
    back short, as they stop at a device's read error. blkid probes what it can read and finds
    nothing."""
    os.truncate(machine.dev(name), size)


def link_to_dev_zero(machine, name):
    """A character device where the disk should be: it reads as zeros without end, and libblkid
    cannot probe it at all, which blkid -p reports as "nothing found" (exit 2), silently."""
    machine.dev(name).unlink()
    machine.dev(name).symlink_to("/dev/zero")


# How each case is put on a disk, and what the warning says after the disk's path.
FOREIGN = {
    "filesystem": (put_filesystem, "holds ext4 labelled scratch"),
    "array-member": (put_foreign_array_member, "holds linux_raid_member labelled testhost:data"),
    "array-member-at-end": (lambda m, n: put_foreign_array_member(m, n, "1.0"), "holds linux_raid_member labelled testhost:data"),
    "backup-gpt-only": (put_backup_gpt_only, "holds gpt at {end_sector} (found by wipefs)"),
    "two-filesystems": (put_two_filesystems, "holds several signatures"),
    "partitions": (lambda m, n: (m.root / "sys" / "block" / n / f"{n}p1").mkdir(), "has partitions"),
    "in-use": (lambda m, n: (m.root / "sys" / "block" / n / "holders" / "dm-0").mkdir(), "is in use by dm-0"),
    # blkid answers "nothing found" for a device it cannot open; wipefs fails on it.
    "missing": (lambda m, n: m.dev(n).unlink(), "could not be probed by wipefs (wipefs: error: "),
    "not-a-disk": (link_to_dev_zero, "could not be probed by wipefs (wipefs: error: "),
    "end-unreadable": (lambda m, n: cut_short(m, n, m.size - (512 << 10)), "cannot be read in its last MiB"),
    "start-unreadable": (lambda m, n: cut_short(m, n, 512 << 10), "cannot be read in its first MiB"),
}


@pytest.mark.parametrize("num_disks", [1, 2])
@pytest.mark.parametrize("kind", FOREIGN)
def test_a_disk_holding_anything_is_left_alone_and_logged(tmp_path, kind, num_disks):
    machine = Machine(tmp_path, [(EBS, 1)] + [(AWS_INSTANCE_STORE, 1)] * num_disks)
    put, described = FOREIGN[kind]
    put(machine, "nvme1n1")
    names = ("nvme1n1", "nvme2n1")[:num_disks]
    before = {name: (probe(machine.dev(name)), signatures(machine.dev(name))) for name in names}
    result, calls = machine.boot()
    # Not formatted, joined, nor mounted; said as a warning (journal priority 4).
    assert calls == [] and "formatting" not in result.stdout, result.stdout
    assert {name: (probe(machine.dev(name)), signatures(machine.dev(name))) for name in names} == before
    warning = f"<4>{machine.dev('nvme1n1')} {described.format(end_sector=hex(machine.size - 512))}"
    lines = [line for line in result.stdout.splitlines() if line.startswith(warning)]
    assert lines, result.stdout
    assert lines[0].endswith(": left alone: the model cache stays on the root disk"), lines[0]


@pytest.mark.parametrize("shape", ["single", "p5"])
def test_instance_store_smaller_than_the_root_filesystem_is_not_used(tmp_path, shape):
    controllers = [(EBS, 1), (AWS_INSTANCE_STORE, 1)] if shape == "single" else SHAPES["p5"][0]
    machine = Machine(tmp_path, controllers, size=32 << 20)
    result, calls = machine.boot()
    disks = len(controllers) - 1
    assert calls == [] and "formatting" not in result.stdout, result.stdout
    root_size = shutil.disk_usage(machine.root / "var" / "lib").total
    assert root_size > disks * machine.size, "the test's filesystem is too small for this test"
    assert (f"the instance store ({disks * 32} MiB) is smaller than the root filesystem "
            f"({root_size >> 30} GiB): the model cache stays on the root disk") in result.stdout
    for i in range(1, disks + 1):
        assert probe(machine.dev(f"nvme{i}n1")) == {}


def test_a_disk_whose_controller_comes_up_late_is_waited_for(tmp_path):
    # nvme2 is still connecting when the unit starts; its disk appears half a second later.
    machine = Machine(tmp_path, [(EBS, 1)] + [(AWS_INSTANCE_STORE, 1)] * 2, down={2})
    timer = threading.Timer(0.5, machine.bring_up, [2])
    timer.start()
    result, calls = machine.boot(PAGODA_NVME_WAIT_SEC="10")
    timer.join()
    assert "waiting up to 10 s for NVMe controllers to come up: nvme2" in result.stdout
    array = machine.dev("md100")
    assert calls == [
        f"mdadm --create {array} --run --level=0 --raid-devices=2 --metadata=1.2 --name=pagoda-cache "
        f"{machine.dev('nvme1n1')} {machine.dev('nvme2n1')}",
        mount_call(machine, array),
    ], result.stdout
    # udev settles once the controller is live, before the disks are listed.
    assert machine.events.index("(nvme2 is live)") < machine.events.index("udevadm settle --timeout=30"), machine.events
    assert machine.seconds < 5


@pytest.mark.parametrize("model", [AWS_INSTANCE_STORE, ""], ids=["instance-store", "model-unknown"])
def test_an_instance_store_controller_that_never_comes_up_keeps_the_root_disk(tmp_path, model):
    machine = Machine(tmp_path, [(EBS, 1)] + [(AWS_INSTANCE_STORE, 1)] * 2, down={2})
    # Before the controller is identified, sysfs has no model for it.
    (machine.controller(2) / "model").write_text(f"{model:<40}\n")
    result, calls = machine.boot(PAGODA_NVME_WAIT_SEC="1")
    # The bounded wait (a second here, with room for a loaded machine), then nothing touched: an
    # array of nvme1n1 alone would be left alone as partly blank once nvme2n1 is there.
    assert 1 <= machine.seconds < 3, machine.seconds
    assert calls == [] and "formatting" not in result.stdout, result.stdout
    assert probe(machine.dev("nvme1n1")) == {}
    assert (f"<4>NVMe controller nvme2 ({model or 'model unknown'}) is not live after 1 s (connecting): "
            "the instance-store disks may be incomplete: the model cache stays on the root disk") in result.stdout


def test_another_controller_that_never_comes_up_is_left_out(tmp_path):
    # The EBS controller of a data volume is stuck; the instance store is complete.
    machine = Machine(tmp_path, [(EBS, 1)] + [(AWS_INSTANCE_STORE, 1)] * 2, down={0})
    result, calls = machine.boot(PAGODA_NVME_WAIT_SEC="1")
    assert 1 <= machine.seconds < 3, machine.seconds
    assert (f"<4>NVMe controller nvme0 ({EBS}) is not live after 1 s (connecting): left out, it is not "
            "instance store") in result.stdout
    assert calls[-1] == mount_call(machine, machine.dev("md100")), result.stdout


def test_blank_disks_beside_members_of_the_array_are_left_alone(tmp_path):
    machine = Machine(tmp_path, [(EBS, 1)] + [(AWS_INSTANCE_STORE, 1)] * 2)
    machine.boot()
    machine.reboot()
    # One disk comes back blank (replaced), the other still holds its part of the array.
    with open(machine.dev("nvme2n1"), "wb") as f:
        f.truncate(machine.size)
    result, calls = machine.boot()
    assert calls == []
    assert "<4>the disks are partly blank (1 of 2) and partly members of an array: left alone" in result.stdout
    assert probe(machine.dev("nvme2n1")) == {}


def test_a_failed_mount_leaves_the_root_disk_and_does_not_fail_the_boot(tmp_path):
    machine = Machine(tmp_path, [(EBS, 1), (AWS_INSTANCE_STORE, 1)])
    result, calls = machine.boot(FAKE_MOUNT_FAILS="1")
    assert calls == [mount_call(machine, machine.dev("nvme1n1"))]
    assert f"<4>mounting {machine.dev('nvme1n1')} at {machine.cache_dir} failed" in result.stdout


def test_the_nvme_cache_unit_runs_as_root_before_the_sync_and_the_server():
    s = scenario("nvmeCache")
    unit = s["units"]["pagoda-nvme-cache"]
    assert unit["ExecStart"].endswith("-pagoda-nvme-cache")
    assert unit["Type"] == "oneshot"
    # Root, in the host's mount namespace: no dynamic user.
    assert unit["User"] is None and unit["DynamicUser"] is False
    # Ordered before, and pulled in by, both units whose state directory it mounts; wanted, not
    # required, so the server starts on the root disk whatever happens to it.
    assert set(unit["before"]) == {"pagoda-model-sync.service", "pagoda.service"}
    assert set(unit["wantedBy"]) == {"pagoda-model-sync.service", "pagoda.service"}
    for name in ("pagoda", "pagoda-model-sync"):
        assert "pagoda-nvme-cache.service" not in s["units"][name]["requires"]
    assert set(unit["path"]) >= {"util-linux", "e2fsprogs", "mdadm"}
    # After udev's coldplug, so that the script's `udevadm settle` waits for the disks; not after
    # the deprecated udev-settle unit (the script waits for the NVMe controllers itself).
    assert unit["after"] == ["systemd-udev-trigger.service"]
    # Off by default.
    assert "pagoda-nvme-cache" not in scenario("defaults")["units"]


def test_appliance_image_variants_and_defaults():
    s = scenario("appliance")
    assert s["imageVariants"] == ["amazon", "azure", "google-compute", "qemu-efi"]
    assert s["gpuEnabled"] and not s["qemuGpu"]
    assert s["firewall"] == [8000]
    assert "pagoda-launch-config" in s["units"]
    # Instance-store NVMe holds the model cache where the shape has it.
    assert "pagoda-nvme-cache" in s["units"]
    assert argv(s["units"]["pagoda"])[:3] == ["serve", "--host", "0.0.0.0"]
    assert s["prometheus"] and not s["grafana"]
    assert s["failedAssertions"] == []


def test_highest_port_is_accepted():
    s = scenario("maxPort")
    assert s["firewall"] == [65535]
    assert "--port 65535" in s["units"]["pagoda"]["ExecStart"]


@pytest.mark.parametrize(
    "attr, option",
    [("badPort", "services.pagoda.port"), ("badSetting", "services.pagoda.settings.max-model-len")],
)
def test_bad_values_fail_with_the_option_name(attr, option):
    result = instantiate(attr)
    assert result.returncode != 0
    assert f"`{option}' is not of type" in result.stderr, result.stderr


def test_each_image_variant_sets_its_builders_options():
    amazon = scenario("variants.amazon")
    # User data is Pagoda's launch configuration: amazon-init must not rebuild the system from it.
    assert amazon["amazonInit"] is False
    assert amazon["ec2Efi"] is True and amazon["diskSize"] == 16384
    azure = scenario("variants.azure")
    assert azure["vmGeneration"] == "v2" and azure["diskSize"] == 16384 and azure["ec2Efi"] is False
    google = scenario("variants.google-compute")
    assert google["googleEfi"] is True and google["diskSize"] == 16384
    qemu = scenario("variants.qemu-efi")
    assert not qemu["gpuEnabled"] and qemu["diskSize"] == "auto"
    for name in ("amazon", "azure", "google-compute"):
        s = scenario(f"variants.{name}")
        assert s["gpuEnabled"] and s["failedAssertions"] == [], name
        assert "pagoda-launch-config" in s["units"], name


# Edits a reviewer made to a copy of the repository, each a name or value nixpkgs does not have:
# (file, text, replacement, the scenario that evaluates it, what the error must name).
MUTATIONS = [
    ("images/amazon.nix", "ec2.efi = true;", "ec2.efiTypo = true;", "variants.amazon", "ec2.efiTypo"),
    ("images/azure.nix", 'vmGeneration = "v2";', 'vmGeneration = "v9";', "variants.azure", "virtualisation.azureImage.vmGeneration"),
    ("nixos/gpu.nix", "nvidiaPersistenced = true;", "nvidiaPersistencedTypo = true;", "gpu", "hardware.nvidia.nvidiaPersistencedTypo"),
    ("nixos/gpu.nix", "hardware.nvidia.datacenter.enable = true;", "hardware.nvidia.datacenter.enabled = true;", "gpuFabric", "hardware.nvidia.datacenter.enabled"),
]


@pytest.mark.parametrize("path, text, replacement, attr, option", MUTATIONS, ids=[m[4] for m in MUTATIONS])
def test_a_misspelled_nixpkgs_option_or_value_fails_evaluation(path, text, replacement, attr, option):
    """The stubs declare nixpkgs' options with their real types, nothing freeform that nixpkgs
    does not make freeform: each edit, which passed the old stubs, must now fail."""
    require_tools()
    with tempfile.TemporaryDirectory(prefix="pagoda-mutant-") as tmp:
        copy = pathlib.Path(tmp)
        for folder in ("nixos", "images", "helm/pagoda/files", "tests/nix"):
            shutil.copytree(ROOT / folder, copy / folder)
        target = copy / path
        source = target.read_text()
        assert source.count(text) == 1, f"{path} no longer holds {text!r}: update the mutation"
        # The unedited copy evaluates; the edited one fails and names the option.
        assert instantiate(attr, copy / "tests" / "nix" / "eval.nix").returncode == 0
        target.write_text(source.replace(text, replacement))
        result = instantiate(attr, copy / "tests" / "nix" / "eval.nix")
    assert result.returncode != 0, f"{path}: {replacement!r} was accepted"
    assert option in result.stderr, result.stderr


def gencode(capabilities):
    lib = require_tools()
    listed = " ".join(f'"{c}"' for c in capabilities)
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr",
         f"import {ROOT / 'nix' / 'cuda-gencode.nix'} {{ lib = import {lib}; }} [ {listed} ]"],
        capture_output=True, text=True, timeout=60,
    )


def test_the_cuda_package_compiles_the_kernels_for_nixpkgs_capabilities():
    """nix/package.nix passes nvcc the capabilities nixpkgs builds CUDA for, those the kernels
    support (8.0 and newer) as machine code, and PTX of the newest for later GPUs."""
    result = gencode(["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout).split() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_89,code=sm_89",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120",
    ]
    # One capability at the limit; an architecture-specific one gets machine code, never the PTX.
    assert json.loads(gencode(["8.0"]).stdout) == "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_80,code=compute_80"
    mixed = json.loads(gencode(["9.0", "9.0a"]).stdout).split()
    assert mixed == ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90"]
    # Nothing the kernels can run on: the build stops and says why.
    old = gencode(["7.0", "7.5"])
    assert old.returncode != 0 and "capability 8.0 or newer" in old.stderr, old.stderr


def oci_env(gpu, cuda_version):
    """The OCI image's environment, evaluated from nix/oci.nix with a stand-in for dockerTools
    (which only receives the configuration) and for the package."""
    lib = require_tools()
    extra = f'cudaMajorMinorVersion = "{cuda_version}";' if cuda_version else ""
    expr = f"""
      let
        lib = import {lib};
        pagoda = {{
          type = "derivation"; name = "pagoda"; outPath = "/nix/store/0-pagoda"; version = "0.1.0";
          meta.mainProgram = "pagoda"; {extra}
        }};
        image = import {ROOT / 'nix' / 'oci.nix'} {{
          inherit lib pagoda;
          gpu = {'true' if gpu else 'false'};
          dockerTools = {{ streamLayeredImage = args: args; caCertificates = "ca-certificates"; }};
        }};
      in image.config.Env
    """
    result = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_cuda_image_states_the_cuda_version_it_was_built_with():
    env = oci_env(True, "13.0")
    assert "NVIDIA_REQUIRE_CUDA=cuda>=13.0" in env
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    # The CPU image names no CUDA (its package has no CUDA version to give).
    assert not any(e.startswith("NVIDIA_") for e in oci_env(False, None))
