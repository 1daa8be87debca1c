"""Where things are: the repository and the ComfyUI tree (from the product runner), plus the fixture cache."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from comfyrun.paths import OFFLINE_ENV, PACK_NAME, REPO_ROOT, apply_offline_env, comfy_dir, workflows_dir

__all__ = [
    "OFFLINE_ENV",
    "PACK_NAME",
    "REPO_ROOT",
    "apply_offline_env",
    "cache_dir",
    "comfy_dir",
    "load_script",
    "workflows_dir",
]


def cache_dir() -> Path:
    """Git-ignored cache for generated fixtures (``$MEGASR_FIXTURE_CACHE`` overrides)."""
    env = os.environ.get("MEGASR_FIXTURE_CACHE")
    return Path(env).resolve() if env else REPO_ROOT / ".cache" / "fixtures"


def load_script(name: str, relative: str) -> ModuleType:
    """A repository script (not a package module, e.g. ``scripts/eval_workflow.py``) imported as ``name``."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
