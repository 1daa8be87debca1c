"""Save and load the MegaSR model (``controlnet`` component weight file)."""

from __future__ import annotations

from typing import Any

import torch

from .model import MegaSRConfig, MegaSRModel
from .weights import check_state_dict, load_weight_file, save_weight_file

COMPONENT = "controlnet"


def save_megasr_model(
    path: str, model: MegaSRModel, provenance: dict[str, Any] | None = None, overwrite: bool = False
) -> None:
    """Write ``model`` with its config and the base it was made for (atomic; no silent overwrite)."""
    config = model.config.to_dict()
    config["base"] = model.config.base()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_weight_file(path, state, COMPONENT, config, provenance or {}, overwrite=overwrite)


def load_megasr_model(path: str, dtype: torch.dtype = torch.float32) -> MegaSRModel:
    """Build a :class:`MegaSRModel` from a weight file, validating component, keys and shapes."""
    state, info = load_weight_file(path, COMPONENT)
    config = MegaSRConfig.from_dict(info.config)
    model = MegaSRModel(config)
    check_state_dict(model, state, path)
    model.load_state_dict(state)
    return model.to(dtype).eval().requires_grad_(False)
