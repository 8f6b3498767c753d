#!/usr/bin/env bash
# Runs every check CI runs, after installing what the tests use: in .venv the `openai` client, moto
# (S3, and GCS through it), Azure's SDK and the Helm chart's tools (helm-python-sdk,
# kubernetes-validate, check-jsonschema, pytest); under .ci/cache/node Azurite and the CRD schemas;
# promtool and rclone from Debian when run as root. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
if ! .venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt; then
  echo "installing the Python test tools failed" >&2
  exit 1
fi
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
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked

# The Helm chart: schema sanity, then render, lint and validate every values file.
.venv/bin/check-jsonschema --check-metaschema helm/pagoda/values.schema.json
.venv/bin/python -m pytest -q tests/helm
