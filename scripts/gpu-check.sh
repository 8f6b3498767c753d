#!/usr/bin/env bash
# The GPU check: everything about the CUDA backend that needs a real NVIDIA GPU, in one command
# that runs in well under 8 minutes on a machine with the driver, PyTorch and transformers but no
# Rust and no network.
#
#   scripts/gpu-check.sh --prepare   # here, with Rust: builds target/gpu-check/ (stripped release
#                                    # binary with the kernels compiled by nvcc for sm_80/sm_90 plus
#                                    # compute_90 PTX, and the reference fixtures); carry that folder
#   scripts/gpu-check.sh             # on the GPU machine: logs and JSON under $OUT, one table at the end
#
# What it runs: `pagoda selftest` (every operation on the GPU against the CPU backend in f32, f16
# and bf16; the fixtures' logits and greedy tokens; batching invariance), then its benchmarks
# (device copy bandwidth; decode attention with 32 query heads, 8 KV heads, head_dim 128 at batch
# 1/16/64/128 and context 512/2k/8k; a Llama-3-8B-shaped bf16 model with dummy weights at batch 1
# and 64), then the peers on the same GPU (scripts/gpu_peers.py: PyTorch's SDPA on the same
# shapes, transformers' generate at batch 64), then the server itself on the GPU (`pagoda info`,
# /metrics with NVML's series, a short `bench serve`), and prints the ratios BENCHMARKS.md records and
# where one eager decode step's device time goes (the operations over 2% of the step).
set -uo pipefail
cd "$(dirname "$0")/.."
dir=target/gpu-check

if [ "${1:-}" = "--prepare" ]; then
  set -e
  nvcc=${PAGODA_NVCC:-$(ls -d .venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1)}
  [ -x "$nvcc" ] || { echo "gpu-check --prepare: no nvcc (run ./test.sh first, or set PAGODA_NVCC)" >&2; exit 1; }
  rm -rf "$dir" && mkdir -p "$dir/fixtures"
  PAGODA_NVCC="$nvcc" PAGODA_CUDA_GENCODE="-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90" \
    cargo build --release --locked
  cp "${CARGO_TARGET_DIR:-target}/release/pagoda" "$dir/pagoda"
  strip "$dir/pagoda"
  for model in tiny-llama tiny-llama-bf16; do
    cp -r "../shared/fixtures/$model" "$dir/fixtures/$model"
  done
  chmod -R u+w "$dir"
  du -sh "$dir"
  echo "carry $dir, then run scripts/gpu-check.sh on the GPU machine"
  exit 0
fi

out=${OUT:-$dir/out}
mkdir -p "$out"
bin=$dir/pagoda
[ -x "$bin" ] || { echo "gpu-check: $bin is missing: run scripts/gpu-check.sh --prepare where Rust is" >&2; exit 1; }
started=$(date +%s)
{
  nvidia-smi || true
  "$bin" --version
} >"$out/machine.txt" 2>&1

# libcuda comes from the driver; cuBLAS from the system, or from the CUDA wheels PyTorch ships.
wheel_libs=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site
dirs = set()
for base in site.getsitepackages():
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "libcublas.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}${wheel_libs}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$out/machine.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs under $out
  local name=$1 limit=$2
  shift 2
  echo "== $name" >&2
  if ! timeout "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.log"; then
    echo "gpu-check: $name failed or timed out (see $out/$name.log)" >&2
    tail -n 20 "$out/$name.log" >&2
    status=1
  fi
}
# A dry run of this script's plumbing without a GPU: a cuda-emu build with
# PAGODA_GPU_CHECK_DEVICE=cuda-emulated PAGODA_GPU_CHECK_QUICK=1 (the peers step then fails).
device=${PAGODA_GPU_CHECK_DEVICE:-cuda}
quick=${PAGODA_GPU_CHECK_QUICK:+--quick}
step selftest 180 "$bin" selftest --device "$device" --fixtures "$dir/fixtures" --json "$out/selftest.json"
# shellcheck disable=SC2086
step bench 240 "$bin" selftest --device "$device" --bench $quick --json "$out/bench.json"
step peers 240 python3 scripts/gpu_peers.py --json "$out/peers.json"

# The server on the GPU end to end (the embedded demo model: the serving path, not its speed):
# what `pagoda info` says of the driver and GPUs, /metrics' NVML series with real values, and a
# short `bench serve` through HTTP, CUDA graphs and on-device sampling.
serve_check() {
  "$bin" info --json >"$out/info.json" || return 1
  # The emulated dry run skips what only costs time there (graph capture, memory profiling).
  local quick_args=()
  [ -n "$quick" ] && quick_args=(--enforce-eager --num-gpu-blocks-override 256)
  "$bin" serve --device "$device" --port 18431 "${quick_args[@]}" >"$out/serve.log" 2>&1 &
  local server=$! ready=""
  for _ in $(seq 120); do
    if python3 -c 'import sys, urllib.request; urllib.request.urlopen("http://127.0.0.1:18431/ready", timeout=2)' 2>/dev/null; then
      ready=1
      break
    fi
    sleep 0.5
  done
  local status=1
  if [ -n "$ready" ]; then
    local sizes=(--num-prompts 64 --random-input-len 256 --random-output-len 32)
    [ -n "$quick" ] && sizes=(--num-prompts 4 --random-input-len 16 --random-output-len 4)
    "$bin" bench serve --base-url http://127.0.0.1:18431 "${sizes[@]}" --ignore-eos \
      --json "$out/serve-bench.json" >"$out/serve-bench.txt" 2>&1 &&
      python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:18431/metrics").read().decode())' \
        >"$out/metrics.txt" && status=0
  else
    echo "the server was not ready within 60 s" >&2
  fi
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  return $status
}
export -f serve_check
export bin out device quick
step serve 120 bash -c serve_check

python3 - "$out" <<'EOF' | tee "$out/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        print(f"({name} missing: {e})")
        return None
checks = load("selftest.json") or []
bench = load("bench.json") or []
peers = load("peers.json") or {}
failed = [r for r in checks + bench if r.get("pass") is False]
passed = [r for r in checks + bench if r.get("pass") is True]
print(f"correctness: {len(passed)} passed, {len(failed)} failed")
for r in failed:
    print(f"  FAIL {r['name']}: {r['value']}")
for r in checks:
    if r["section"] in ("fixtures", "batching"):
        print(f"  {'ok  ' if r['pass'] else 'FAIL'} {r['name']}: {r['value']}")
by_name = {r["name"]: r for r in bench}
copy = by_name.get("device copy bandwidth (read + write)", {}).get("number")
print(f"device copy bandwidth: {copy:.0f} GB/s" if copy else "device copy bandwidth: not measured")
sdpa = {(p["batch"], p["context"]): p["seconds"] for p in peers.get("sdpa", [])}
print(f"{'decode attention':<28}{'ours us':>10}{'GB/s':>8}{'% copy':>8}{'SDPA us':>10}{'speedup':>9}")
for r in bench:
    if not r["name"].startswith("decode attention bf16 batch"):
        continue
    words = r["name"].split()
    batch, context = int(words[4]), int(words[6])
    us = r["number"]
    kv_bytes = 2 * batch * context * 8 * 128 * 2
    gbs = kv_bytes / (us * 1e-6) / 1e9
    peer = sdpa.get((batch, context))
    peer_us = f"{peer * 1e6:.1f}" if peer else "-"
    speedup = f"{peer * 1e6 / us:.2f}x" if peer else "-"
    pct = f"{100 * gbs / copy:.0f}" if copy else "-"
    print(f"{'b' + str(batch) + ' ctx ' + str(context):<28}{us:>10.1f}{gbs:>8.0f}{pct:>8}{peer_us:>10}{speedup:>9}")
floor = by_name.get("weight-read floor for one sequence (copy bandwidth / weight bytes)", {}).get("number")
one = by_name.get("decode bf16 dummy weights, batch 1", {}).get("number")
many = by_name.get("decode bf16 dummy weights, batch 64", {}).get("number")
hf = peers.get("transformers", {}).get("tokens_per_second")
if one and floor:
    print(f"8B decode, 1 stream: {one:.1f} tok/s = {100 * one / floor:.0f}% of the weight-read floor ({floor:.0f} tok/s)")
if many:
    ratio = f" = {many / hf:.1f}x transformers ({hf:.1f} tok/s)" if hf else ""
    print(f"8B decode, batch 64: {many:.1f} tok/s{ratio}")
for r in bench:
    if r["section"] == "profile" and ("all " in r["name"] or r["number"] >= 0.02 * max(
            x["number"] for x in bench if x["section"] == "profile" and x["name"].split(":")[0] == r["name"].split(":")[0])):
        print(f"  {r['name']}: {r['value']}")
info = load("info.json") or {}
driver = info.get("driver") or {}
print(f"pagoda info: driver {driver.get('version', 'not found')} (CUDA {driver.get('cuda_version', '-')}), "
      f"{len(info.get('gpus', []))} GPUs, --device auto picks {info.get('auto_device', {}).get('device')}")
for g in info.get("gpus", []):
    print(f"  GPU {g['index']}: {g['name']}, {g.get('memory_total_bytes', 0) / 2**30:.1f} GiB, capability {g.get('compute_capability')}")
try:
    with open(os.path.join(out, "metrics.txt")) as f:
        gpu_lines = [l for l in f if l.startswith("pagoda_gpu_")]
    print(f"/metrics: {len(gpu_lines)} pagoda_gpu_* series, e.g.")
    for line in gpu_lines:
        if line.startswith(("pagoda_gpu_memory_used_bytes", "pagoda_gpu_power_draw_watts", "pagoda_gpu_info")):
            print(f"  {line.rstrip()}")
except OSError as e:
    print(f"/metrics not read: {e}")
served = load("serve-bench.json") or {}
if served:
    print(f"bench serve (demo model): {served.get('completed')} completed, {served.get('failed')} failed, "
          f"{served.get('output_throughput', 0):.0f} output tok/s")
for key in ("sdpa_error", "transformers_error"):
    if key in peers:
        print(f"{key}: {peers[key]}")
EOF
echo "gpu-check: $(($(date +%s) - started)) s; logs in $out" >&2
exit $status
