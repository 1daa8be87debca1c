"""Which layer classes the pack's modules are built from (pure torch; ComfyUI hands its own in).

Every module of ``megasr`` takes ``operations``: a namespace with ``Linear``, ``Conv2d``, ``GroupNorm`` and
``LayerNorm``. Training uses ``torch.nn`` (the default). The nodes pass ComfyUI's ``comfy.ops.manual_cast``:
those classes are subclasses of the torch ones that cast their weights to the input's dtype and device at
each call, which is what lets model management store weights in fp16/bf16/fp8 while computing in a dtype the
device supports, and keep part of a model on the offload device (lowvram partial loading).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

TORCH_OPS = SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm, LayerNorm=nn.LayerNorm)
LAYER_NAMES = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")


def ops_or_torch(operations: Any | None) -> Any:
    return TORCH_OPS if operations is None else operations


def zero_(layer: nn.Module) -> None:
    """Zero-initialise a layer's weight and bias; a layer that allocates lazily (filled from a file) has none."""
    for name in ("weight", "bias"):
        p = getattr(layer, name, None)
        if isinstance(p, torch.Tensor):
            nn.init.zeros_(p)


def retype_layers(module: nn.Module, operations: Any | None) -> nn.Module:
    """Give layers of a module built elsewhere (diffusers' ControlNetModel) the classes of ``operations``.

    Only exact ``torch.nn`` classes are retyped, to the matching subclass in ``operations``; parameters,
    shapes and module paths are unchanged, so the state dict is the same.
    """
    if operations is None or operations is TORCH_OPS:
        return module
    mapping = {getattr(nn, name): getattr(operations, name) for name in LAYER_NAMES}
    for m in module.modules():
        target = mapping.get(type(m))
        if target is not None and target is not type(m):
            m.__class__ = target
    return module


def cast_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (a bare parameter of ours) on ``ref``'s device and in its dtype, at the point of use."""
    return x.to(device=ref.device, dtype=ref.dtype)


def expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile ``x`` along the batch to ``batch`` (cond/uncond chunks are stacked in ComfyUI and diffusers)."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0] != 0:
        raise ValueError(f"guidance batch {x.shape[0]} does not divide the model batch {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))
