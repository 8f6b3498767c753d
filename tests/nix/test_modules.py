"""The NixOS modules, evaluated offline with nixpkgs' `lib.evalModules` (tests/nix/eval.nix).

No nixpkgs checkout and no builds: the NixOS options the modules set are stubs, so these tests check
what our modules render (ExecStart, environment, unit ordering, firewall ports, the GPU and
monitoring switches, the image variants) and that bad values fail with the option's name. The lib
comes from NIXPKGS_LIB (a checkout of nixpkgs or of nix-community/nixpkgs.lib); without it, or
without `nix-instantiate`, the tests say they did not run.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

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


def test_appliance_image_variants_and_defaults():
    s = scenario("appliance")
    assert s["imageVariants"] == ["amazon", "azure", "google-compute", "qemu-efi"]
    assert s["gpuEnabled"] and not s["qemuGpu"]
    assert s["firewall"] == [8000]
    assert "pagoda-launch-config" in s["units"]
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
