#!/usr/bin/env bash
# The test command: set up everything (idempotent; a fresh clone takes a few minutes), lint, run the tests.
#
#   bash scripts/test.sh                 # ruff + the whole pytest suite (in-process, server, browser)
#   bash scripts/test.sh -m "not browser" tests/harness/test_harness_comfy.py   # extra arguments go to pytest
#
# Exits non-zero on any failure, including "no tests collected".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
export PYTHONDONTWRITEBYTECODE="${PYTHONDONTWRITEBYTECODE:-1}"
# The tests always run in the project's own pinned environment and ComfyUI 0.3.75 tree.
unset COMFYUI_DIR COMFYUI_PYTHON

start=$(date +%s)
bash scripts/setup.sh --browser
PY="${MEGASR_VENV:-$ROOT/.venv}/bin/python"
echo "[megasr-test] setup done in $(( $(date +%s) - start ))s"

# Lint and format check of the pack's own code (pyproject.toml excludes .comfyui/.venv/node_modules/.cache).
# A lint failure fails the command, but the tests still run so one run reports everything.
set +e
lint=0
"$PY" -m ruff check . || lint=1
"$PY" -m ruff format --check . || lint=1

t0=$(date +%s)
if [ "$#" -gt 0 ]; then
  "$PY" -m pytest --timeout="${MEGASR_TEST_TIMEOUT:-900}" "$@"
else
  "$PY" -m pytest --timeout="${MEGASR_TEST_TIMEOUT:-900}" --durations=15 tests
fi
rc=$?
set -e
echo "[megasr-test] pytest exit status $rc after $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - start ))s)"
if [ "$lint" != 0 ]; then
  echo "[megasr-test] ruff found problems (see above)"
  [ "$rc" != 0 ] || rc=1
fi
# pytest's 5 ("no tests collected") is a failure too; any non-zero status fails the command.
exit "$rc"
