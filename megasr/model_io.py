"""Save and load the MegaSR model (``controlnet`` component weight file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .model import MegaSRConfig, MegaSRModel
from .weights import check_state_dict, load_weight_file, save_weight_file

COMPONENT = "controlnet"
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_megasr_model(
    path: str,
    model: MegaSRModel,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` with its config and the base it was made for (atomic; no silent overwrite).

    ``dtype`` (e.g. ``torch.float16``): store the floating-point tensors in it (half the file size); the
    loader converts to whatever dtype the user's ComfyUI stores and computes in.
    """
    config = model.config.to_dict()
    config["base"] = model.config.base()
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.contiguous()
    save_weight_file(path, state, COMPONENT, config, provenance or {}, overwrite=overwrite)


def read_megasr_file(path: str) -> tuple[dict[str, torch.Tensor], MegaSRConfig]:
    """The validated state dict and config of a MegaSR weight file (component checked)."""
    state, info = load_weight_file(path, COMPONENT)
    return state, MegaSRConfig.from_dict(info.config)


def load_megasr_state(
    model: MegaSRModel, state: dict[str, torch.Tensor], path: str, dtype: torch.dtype, assign: bool = False
) -> MegaSRModel:
    """Fill ``model`` from ``state`` stored as ``dtype`` (keys and shapes checked first, naming the file).

    ``assign``: hand the tensors to the module instead of copying (ComfyUI's dynamic-VRAM patchers ask for it).
    """
    with torch.device("meta"):  # the expected keys/shapes, without memory (and whatever layers allocate lazily)
        reference = MegaSRModel(model.config)
    check_state_dict(reference, state, path)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if not assign:
        model.to(dtype)  # copying keeps the parameters' dtype: make it the storage dtype first
    model.load_state_dict(state, assign=assign)
    return model.eval().requires_grad_(False)


def load_megasr_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    operations=None,
    owner: Callable[[MegaSRModel], Any] | None = None,
) -> MegaSRModel:
    """Build a :class:`MegaSRModel` from a weight file, validating component, keys and shapes.

    ``dtype``: the storage dtype of the weights; ``operations``: the layer classes (:mod:`megasr.layers`);
    ``owner(model)``: called on the empty model before its weights are loaded (ComfyUI: makes the model
    patcher; a truthy ``is_dynamic()`` on what it returns asks for assign-loading).
    """
    state, config = read_megasr_file(path)
    return build_megasr_model(state, config, path, dtype, operations, owner)


def build_megasr_model(
    state: dict[str, torch.Tensor],
    config: MegaSRConfig,
    source: str,
    dtype: torch.dtype = torch.float32,
    operations=None,
    owner: Callable[[MegaSRModel], Any] | None = None,
) -> MegaSRModel:
    """:func:`load_megasr_model` from a state dict and config already read (``source`` names them in errors),
    e.g. a SeeSR folder converted in memory (``megasr.seesr_weights.seesr_folder_state``)."""
    model = MegaSRModel(config, operations=operations)
    assign = False
    if owner is not None:
        holder = owner(model)
        is_dynamic = getattr(holder, "is_dynamic", None)
        assign = bool(is_dynamic()) if callable(is_dynamic) else False
    return load_megasr_state(model, state, source, dtype, assign=assign)
