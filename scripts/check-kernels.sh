#!/usr/bin/env bash
# Compiles every kernel in kernels/*.cu with nvcc for sm_80 (A100) and sm_90 (H100/H200), prints
# ptxas's register, spill and shared-memory report per kernel, and fails if any kernel spills on
# sm_90 or uses more than 48 KiB of static shared memory. Needs nvcc (CUDA 13.0): on PATH, or
# NVCC=..., or the PyPI wheels in .venv that ./test.sh installs. Logs under $OUT (default
# target/kernel-check).
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc=${NVCC:-}
if [ -z "$nvcc" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc=nvcc
  else
    nvcc=$(ls -d .venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1 || true)
  fi
fi
if [ -z "$nvcc" ] || ! "$nvcc" --version >/dev/null 2>&1; then
  echo "check-kernels: no nvcc (set NVCC, put it on PATH, or run ./test.sh to install the CUDA wheels)" >&2
  exit 1
fi
out=${OUT:-target/kernel-check}
mkdir -p "$out"
rm -f "$out/report.txt"
"$nvcc" --version | tail -n1
# Compile: one job per architecture, side by side (attention.cu dominates, a minute or more each).
rm -f "$out/failed"
for arch in sm_80 sm_90; do
  (
    for src in kernels/*.cu; do
      name=$(basename "$src" .cu)
      "$nvcc" -arch="$arch" -O3 -std=c++17 --use_fast_math -cubin -Xptxas -v -I kernels "$src" \
        -o "$out/$name.$arch.cubin" >"$out/$name.$arch.log" 2>&1 || echo "$src $arch" >>"$out/failed"
    done
  ) &
done
wait
if [ -s "$out/failed" ]; then
  while read -r src arch; do
    cat "$out/$(basename "$src" .cu).$arch.log" >&2
    echo "check-kernels: $src does not compile for $arch" >&2
  done <"$out/failed"
  exit 1
fi
status=0
for arch in sm_80 sm_90; do
  for src in kernels/*.cu; do
    name=$(basename "$src" .cu)
    log="$out/$name.$arch.log"
    # One line per kernel: name, registers, spill bytes, shared memory.
    awk -v arch="$arch" '
      /Compiling entry function/ { gsub(/'\''/, "", $7); fn = $7 }
      /bytes spill stores/ { spill = $5 + $9 }
      /Used [0-9]+ registers/ {
        regs = $5; smem = 0
        for (i = 1; i <= NF; i++) if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
        printf "%-6s %-40s %4d regs %6d B spilled %6d B smem\n", arch, fn, regs, spill, smem
      }' "$log" >"$out/$name.$arch.report"
    cat "$out/$name.$arch.report" | tee -a "$out/report.txt"
    # Fields: arch, name, registers, "regs", spilled bytes, "B", "spilled", smem bytes, ...
    if ! awk '
        $1 == "sm_90" && $5 > 0 { print "check-kernels: " $2 " spills " $5 " bytes on sm_90" > "/dev/stderr"; bad = 1 }
        $8 > 49152 { print "check-kernels: " $2 " uses " $8 " bytes of static shared memory" > "/dev/stderr"; bad = 1 }
        END { exit bad }' "$out/$name.$arch.report"; then
      status=1
    fi
  done
done
kernels=$(grep -c '' "$out/report.txt" || true)
echo "check-kernels: $kernels kernel compilations checked for sm_80 and sm_90 (report: $out/report.txt)"
exit $status
