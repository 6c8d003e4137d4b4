#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU (fast subset: scripts/test.sh -m 'not slow').
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser --gemma
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two workers, each test file on one worker (its module fixtures built once); ECLENS_TEST_WORKERS=0 runs
# in this process (a debugger, -x on the first failure in order).
WORKERS=${ECLENS_TEST_WORKERS:-2}
if [ "$WORKERS" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
