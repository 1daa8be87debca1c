"""Where things are: the repository and the ComfyUI tree (from the product runner), plus the fixture cache."""

from __future__ import annotations

import os
from pathlib import Path

from comfyrun.paths import OFFLINE_ENV, PACK_NAME, REPO_ROOT, apply_offline_env, comfy_dir, workflows_dir

__all__ = ["OFFLINE_ENV", "PACK_NAME", "REPO_ROOT", "apply_offline_env", "cache_dir", "comfy_dir", "workflows_dir"]


def cache_dir() -> Path:
    """Git-ignored cache for generated fixtures (``$MEGASR_FIXTURE_CACHE`` overrides)."""
    env = os.environ.get("MEGASR_FIXTURE_CACHE")
    return Path(env).resolve() if env else REPO_ROOT / ".cache" / "fixtures"
