"""Where things are: the repository and the ComfyUI tree the runner boots (``$COMFYUI_DIR`` or setup.sh's)."""

from __future__ import annotations

import os
from pathlib import Path

#: The pack's repository root (the folder linked as ``ComfyUI/custom_nodes/ComfyUI-MegaSR``).
REPO_ROOT: Path = Path(__file__).resolve().parents[2]

#: Name of the pack inside ``custom_nodes``; the frontend serves its JS under ``/extensions/<name>/``.
PACK_NAME = "ComfyUI-MegaSR"

#: Environment variables of the offline, low-thread test environment (HARNESS.md).
OFFLINE_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}


def comfy_dir() -> Path:
    """The ComfyUI tree: ``$COMFYUI_DIR`` if set (a user's own install), else the one setup.sh installs."""
    env = os.environ.get("COMFYUI_DIR")
    return Path(env).resolve() if env else REPO_ROOT / ".comfyui" / "ComfyUI"


def workflows_dir() -> Path:
    return REPO_ROOT / "workflows"


def apply_offline_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the offline variables (without overriding explicit settings); returns the environment dict."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_ENV.items():
        target.setdefault(key, value)
    return target  # type: ignore[return-value]
