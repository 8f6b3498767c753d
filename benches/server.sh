#!/usr/bin/env bash
# The server's own overhead: requests per second and latency percentiles for completions with
# max_tokens=1 on the tiny fixture model, 64 concurrent connections, measured with wrk against the
# release binary, side by side with GET /health on the same server (the HTTP floor).
#
# Usage: benches/server.sh [seconds]   (needs wrk: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-15}"
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet
log=$(mktemp)
PAGODA_LOG=warn,pagoda::cli::serve=info ./target/release/pagoda serve --host 127.0.0.1 --port 0 --disable-log-requests \
  --model ../shared/fixtures/tiny-llama --max-queue 4096 >/dev/null 2>"$log" &
pid=$!
script=$(mktemp --suffix=.lua)
trap 'kill $pid 2>/dev/null; rm -f "$log" "$script"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$log" 2>/dev/null && break; sleep 0.1; done
port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | head -1 | grep -o '[0-9]*$')
until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.1; done
cat >"$script" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt": "The licensor grants you a license", "max_tokens": 1, "temperature": 0}'
LUA
echo "== GET /health (HTTP floor), 64 connections, ${seconds}s"
wrk -t2 -c64 -d"${seconds}s" --latency "http://127.0.0.1:$port/health" | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors"
echo "== POST /v1/completions max_tokens=1, 64 connections, ${seconds}s"
wrk -t2 -c64 -d"${seconds}s" --latency -s "$script" "http://127.0.0.1:$port/v1/completions" | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^vllm:request_success_total|^vllm:num_preemptions'
