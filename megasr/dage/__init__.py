"""DAGE: degradation-aware guidance extractors (HED, depth, segmentation, CLIP image semantics).

Each extractor is an ``nn.Module`` with ``from_config(config)`` (random weights, tests),
``load(path[, base_path])`` from a MegaSR weight file, ``save(path, ...)``, and
``forward(image [B,3,H,W] 0..1, resolution=None) -> DageOutput(map, raw, features)``.
Heavy libraries (controlnet_aux, transformers, peft) are imported lazily by the submodules'
builders; importing this package is cheap.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .common import DageOutput, feature_l1_loss, working_size
from .kinds import BY_COMPONENT, DAGE_COMPONENTS, KINDS

log = logging.getLogger("megasr")

#: kind -> component (the registry in ``kinds.py`` is the one definition)
KIND_TO_COMPONENT: dict[str, str] = {k.kind: k.component for k in KINDS}


def extractor_class(component: str) -> type:
    """The extractor class for a DAGE component name (or kind: hed/depth/seg/clip)."""
    row = BY_COMPONENT.get(KIND_TO_COMPONENT.get(component, component))
    if row is None:
        raise ValueError(f"'{component}' is not a DAGE component (expected one of {', '.join(DAGE_COMPONENTS)})")
    return row.extractor_class()


def load_extractor(
    path: str,
    base_path: str | None = None,
    expect: str | tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load any DAGE weight file; the kind comes from its metadata. LoRA components (depth, CLIP)
    take their base weights from ``base_path``."""
    from ..weights import _check_component, read_weight_header

    info = read_weight_header(path)
    _check_component(info, expect if expect is not None else DAGE_COMPONENTS)
    cls = extractor_class(info.component)
    if BY_COMPONENT[info.component].lora:
        return cls.load(path, base_path=base_path, device=device)
    return cls.load(path, device=device)


def output_loss(kind: str, student: DageOutput, teacher: DageOutput) -> torch.Tensor:
    """The output term of the DAGE loss (Eq. 6) for an extractor kind."""
    if kind == "hed":
        from .hed import hed_output_loss

        return hed_output_loss(student, teacher)
    if kind == "depth":
        from .depth import depth_output_loss

        return depth_output_loss(student, teacher)
    if kind == "seg":
        from .seg import seg_output_loss

        return seg_output_loss(student, teacher)
    if kind == "clip":
        return torch.nn.functional.l1_loss(student.raw.float(), teacher.raw.detach().float())
    raise ValueError(f"unknown extractor kind '{kind}'")


def dage_loss(kind: str, student: DageOutput, teacher: DageOutput, output_weight: float = 1.0) -> dict[str, Any]:
    """DAGE loss (Eq. 3, 5, 6): L1 on intermediate representations + weighted output loss.
    ``student`` from the trainable LR branch, ``teacher`` from the frozen HR branch. The intermediate term is
    averaged over the representations (Eq. 3/5), for CLIP summed over its layers as Eq. 6 writes it."""
    feat = feature_l1_loss(student.features, teacher.features, "sum" if kind == "clip" else "mean")
    out = output_loss(kind, student, teacher)
    return {"loss": feat + output_weight * out, "feature": feat.detach(), "output": out.detach()}


__all__ = [
    "DAGE_COMPONENTS",
    "DageOutput",
    "dage_loss",
    "extractor_class",
    "feature_l1_loss",
    "load_extractor",
    "output_loss",
    "working_size",
]
