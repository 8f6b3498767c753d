#!/usr/bin/env bash
# Model sync throughput on loopback: a 2 GB model (4 shards of 512 MiB plus configs) served by
# s3s-fs, fetched three ways side by side: one plain GET of a shard with curl (the server's
# single-stream rate), `pagoda sync` (ranged parts in parallel), and `aws s3 cp --recursive`
# (awscli from PyPI).
#
# Usage: benches/sync.sh   (needs s3s-fs: cargo install s3s-fs --version 0.14.1 --features binary
# --locked --root /tmp/s3s; set S3S_FS to its path if elsewhere). Uses ~6 GB of /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
s3s=${S3S_FS:-/tmp/s3s/bin/s3s-fs}
[ -x "$s3s" ] || { echo "s3s-fs not found at $s3s" >&2; exit 1; }
work=$(mktemp -d /tmp/pagoda-sync-bench.XXXX)
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/root/models" "$work/staging"
cp ../shared/fixtures/tiny-llama/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json} "$work/staging/"
for i in 1 2 3 4; do
  head -c $((512 << 20)) /dev/urandom > "$work/staging/model-0000$i-of-00004.safetensors"
done
total=$(du -cb "$work/staging" | tail -1 | cut -f1)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$s3s" --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret --domain "localhost:$port" "$work/root" >/dev/null 2>&1 &
server=$!
until curl -s "http://127.0.0.1:$port" >/dev/null; do sleep 0.1; done
# Upload through the server, so that it records each object's ETag (s3s-fs otherwise hashes the
# whole file again on every GET, ranged or not, which would dominate the measurement).
s3curl() { curl -s --fail -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" --user "bench:benchsecret" "$@"; }
for f in "$work"/staging/*; do
  s3curl -T "$f" "http://127.0.0.1:$port/models/big/$(basename "$f")" >/dev/null
done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
cargo build --release --quiet

rate() { python3 -c "print(f'{$1 / $2 / 1e6:.0f}')"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

shard=$((512 << 20))
drop_caches
start=$(date +%s.%N)
s3curl -o "$work/one-shard" "http://127.0.0.1:$port/models/big/model-00001-of-00004.safetensors"
end=$(date +%s.%N)
single=$(rate "$shard" "$(echo "$end - $start" | bc)")
echo "single-stream GET (curl, one 512 MiB shard): $single MB/s"

drop_caches
start=$(date +%s.%N)
./target/release/pagoda sync s3://models/big "$work/pagoda" --endpoint "http://127.0.0.1:$port" --allow-http --progress off >/dev/null 2>&1
end=$(date +%s.%N)
ours=$(rate "$total" "$(echo "$end - $start" | bc)")
echo "pagoda sync (16 parts of 16 MiB in flight): $ours MB/s"

if [ ! -x /tmp/pagoda-bench-venv/bin/aws ]; then
  python3 -m venv /tmp/pagoda-bench-venv >/dev/null
  /tmp/pagoda-bench-venv/bin/pip install --quiet --disable-pip-version-check awscli==1.46.3 >/dev/null
fi
drop_caches
start=$(date +%s.%N)
/tmp/pagoda-bench-venv/bin/aws s3 cp --recursive --quiet --endpoint-url "http://127.0.0.1:$port" s3://models/big "$work/aws"
end=$(date +%s.%N)
aws=$(rate "$total" "$(echo "$end - $start" | bc)")
echo "aws s3 cp --recursive (awscli defaults: 10 requests, 8 MiB parts): $aws MB/s"
cmp "$work/pagoda/model-00004-of-00004.safetensors" "$work/staging/model-00004-of-00004.safetensors"
echo "model: $total bytes; ratios: pagoda/single-stream $(python3 -c "print(f'{$ours/$single:.2f}')"), pagoda/awscli $(python3 -c "print(f'{$ours/$aws:.2f}')")"
