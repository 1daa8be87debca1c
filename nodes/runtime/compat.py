"""Where ComfyUI 0.3.75 and the newest ComfyUI differ in the model-patcher contract the pack builds on.

Each helper uses the newest mechanism where the installed ComfyUI has it and changes nothing on 0.3.75
(docs/COMPATIBILITY.md "Newest ComfyUI" lists what was read and where):

- ``fast_disk``: the newest ``ModelPatcher(..., fast_disk=False)`` takes a per-model storage policy (dynamic VRAM
  streams weights from a fast disk instead of pinning them in RAM); core loaders judge it from the files the
  weights were read from (``comfy.storage``). 0.3.75's constructor has no such parameter.
- ``cached_patcher_init``: the newest ``ModelPatcher.deepclone_multigpu`` (multi-GPU clones of a MODEL and of its
  additional models) and ``clone(disable_dynamic=True)`` of a dynamic patcher re-create the model from its loader
  and raise unless the loader registered ``(factory, args)``; ``factory(*args, disable_dynamic=...)`` returns a
  fresh patcher. 0.3.75 never reads the attribute.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

try:  # newest ComfyUI: the per-model storage policy; absent in 0.3.75
    import comfy.storage as comfy_storage
except ImportError:
    comfy_storage = None


def takes_argument(cls: type, name: str) -> bool:
    """Whether constructing ``cls`` accepts the keyword ``name`` (read from its signature, not its version)."""
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def storage_kwargs(patcher_cls: type, weight_paths: list[str] | None) -> dict:
    """``{"fast_disk": ...}`` for a patcher class that takes it, decided the way the newest core loaders decide it
    for the files the weights came from; ``{}`` on 0.3.75, without files, or without ComfyUI's decision helper."""
    if not weight_paths or comfy_storage is None or not takes_argument(patcher_cls, "fast_disk"):
        return {}
    decide = getattr(comfy_storage, "model_fast_disk", None)
    if not callable(decide):
        return {}
    return {"fast_disk": bool(decide(sorted(weight_paths)))}


def set_reload_factory(patcher, factory: Callable, *args) -> None:
    """Register how to load this patcher's model afresh (``factory(*args, disable_dynamic=False)`` -> patcher), as
    the newest core loaders do, so multi-GPU clones and non-dynamic delegates of it can be made."""
    patcher.cached_patcher_init = (factory, tuple(args))
