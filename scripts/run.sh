#!/usr/bin/env bash
# The main job: set up (idempotent), then start the real ComfyUI with the pack on 127.0.0.1 and print its URL.
#
#   bash scripts/run.sh                      # ComfyUI at http://127.0.0.1:${PORT:-8188}; Ctrl-C stops it
#   bash scripts/run.sh -- --preview-method auto   # extra arguments after -- go to ComfyUI's main.py
#   bash scripts/run.sh --headless workflows/megasr_color_fix.json --input in.png --output out.png \
#        [--set NODE.INPUT=VALUE ...]        # run a workflow JSON without a browser, write the output image
#
# COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/python uses your own ComfyUI instead of ours.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" DO_NOT_TRACK="${DO_NOT_TRACK:-1}"

bash "$ROOT/scripts/setup.sh" >&2

if [ -n "${COMFYUI_DIR:-}" ]; then
  COMFY="$COMFYUI_DIR"
  PY="${COMFYUI_PYTHON:-python3}"
else
  COMFY="$ROOT/.comfyui/ComfyUI"
  PY="${MEGASR_VENV:-$ROOT/.venv}/bin/python"
fi

if [ "${1:-}" = "--headless" ]; then
  shift
  exec "$PY" "$ROOT/scripts/headless.py" "$@"
fi
if [ "${1:-}" = "--" ]; then shift; fi

# The shipped workflows name example inputs; put them where LoadImage finds them (never overwrite).
mkdir -p "$COMFY/input"
for f in "$ROOT"/workflows/input/*; do
  [ -f "$f" ] && [ ! -e "$COMFY/input/$(basename "$f")" ] && cp "$f" "$COMFY/input/"
done

PORT="${PORT:-8188}"
args=(--listen 127.0.0.1 --port "$PORT")
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  args+=(--cpu)
fi
if [ "${MEGASR_ALLOW_API_NODES:-0}" != 1 ]; then
  args+=(--disable-api-nodes) # offline by default; set MEGASR_ALLOW_API_NODES=1 for ComfyUI's API nodes
fi

cd "$COMFY"
"$PY" main.py "${args[@]}" "$@" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; exit 0' INT TERM
for _ in $(seq 1 240); do
  if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; exit $?; fi
  if "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/system_stats', timeout=2)" 2>/dev/null; then
    echo "ComfyUI-MegaSR is running: http://127.0.0.1:$PORT  (workflows: Templates > ComfyUI-MegaSR; Ctrl-C stops)"
    break
  fi
  sleep 0.5
done
wait "$pid"
