#!/usr/bin/env bash
# Runs every check CI runs, after installing what the tests use: the `openai` Python package (in
# .venv) and promtool (Debian's `prometheus` package). Safe to run again; it skips what is there.
set -euo pipefail
cd "$(dirname "$0")"

if ! .venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
export PAGODA_TEST_PYTHON="$PWD/.venv/bin/python"

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    # Only the promtool binary is wanted: keep the package's daemon from starting.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool is missing and this is not root: install Debian's 'prometheus' package" >&2
  fi
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
