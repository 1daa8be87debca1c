"""Pieces shared by the DAGE extractors: outputs, working-size rules, LoRA helpers, losses."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import WeightFileError
from ..images import resize_bchw  # noqa: F401  (re-exported: the extractors resize through it)

log = logging.getLogger("megasr")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DageOutput:
    """What an extractor returns.

    ``map``: the guidance map at the input size, [B, 1, H, W] in 0..1 for HED/depth, a label map
    [B, H, W] (long) for segmentation, the penultimate CLIP tokens [B, 257, D] for CLIP.
    ``raw``: the differentiable output the output loss uses (HED logits, unnormalised inverse depth,
    class scores [B, 150, h, w], the tokens for CLIP), at the *working* size (see :func:`working_size`):
    only ``map`` is made at the input size, so an extractor's memory is bounded by its resolution.
    ``features``: intermediate representations for the DAGE feature loss (Eq. 3/5).
    """

    map: torch.Tensor
    raw: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


#: The working size's long side is at most this many times ``resolution``: an extreme aspect ratio (a 16x2048
#: strip) runs with a shorter short side instead of at 512x65536, so memory stays bounded by ``resolution``.
MAX_WORKING_ASPECT = 4


def working_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """Size the backbone sees: short side ``resolution`` (``<= 0``: keep the input size), aspect
    kept, the long side capped at ``MAX_WORKING_ASPECT * resolution``, both sides rounded to a
    multiple of ``multiple`` (at least one multiple). With ``resolution > 0`` the working area is
    therefore at most ``MAX_WORKING_ASPECT * resolution**2`` (plus rounding), whatever the input."""
    if resolution and resolution > 0:
        scale = resolution / min(height, width)
        cap = MAX_WORKING_ASPECT * resolution / max(height, width)
        if cap < scale:
            log.info(
                "DAGE: a %dx%d input exceeds aspect %d:1; working long side capped at %d px",
                width,
                height,
                MAX_WORKING_ASPECT,
                MAX_WORKING_ASPECT * resolution,
            )
            scale = cap
        h, w = height * scale, width * scale
    else:
        h, w = float(height), float(width)
    h = max(multiple, int(round(h / multiple)) * multiple)
    w = max(multiple, int(round(w / multiple)) * multiple)
    return h, w


def upsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Label map [B, h, w] -> [B, *size] by nearest neighbour (labels must never be blended).

    Resized as uint8 when the labels fit (ADE20K's 150 do), so the only full-size tensors are one
    byte per pixel plus the long result."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    small = labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < 256)
    x = labels.to(torch.uint8 if small else torch.float32).unsqueeze(1)
    return F.interpolate(x, size=size, mode="nearest-exact")[:, 0].long()


def check_input(image: torch.Tensor, name: str) -> torch.Tensor:
    """[B, 3, H, W] float 0..1 expected (grayscale/RGBA are converted upstream by the nodes)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected an image tensor [B, 3, H, W] in 0..1, got {shape}")
    return image


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    return (image - m) / s


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


# --------------------------------------------------------------------------------------------- LoRA

LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 8, "dropout": 0.0}


def inject_lora(
    model: torch.nn.Module, target_regex: str, r: int, alpha: float, dropout: float = 0.0
) -> torch.nn.Module:
    """Add peft LoRA adapters to the Linear layers whose full name matches ``target_regex``.

    Afterwards only the LoRA parameters require gradients.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=target_regex, bias="none"
    )
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


_ADAPTER = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``
    (peft's adapter name removed)."""
    out = {}
    for name, p in model.named_parameters():
        m = _ADAPTER.search(name)
        if m:
            out[name[: m.start()] + f".{m.group(1)}.weight"] = p.detach().clone()
    return out


def set_lora_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str = "<memory>") -> None:
    """Load LoRA tensors written by :func:`lora_state`; every LoRA tensor must be present."""
    params = {}
    for name, p in model.named_parameters():
        m = _ADAPTER.search(name)
        if m:
            params[name[: m.start()] + f".{m.group(1)}.weight"] = p
    from ..weights import check_state_dict

    check_state_dict({k: tuple(v.shape) for k, v in params.items()}, state, path)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(dtype=p.dtype, device=p.device))


def lora_weight_deltas(state: Mapping[str, torch.Tensor], r: int, alpha: float) -> dict[str, torch.Tensor]:
    """Per-weight deltas ``B @ A * alpha / r`` keyed ``<module>.weight`` (the plain layer's name)."""
    scale = float(alpha) / float(r)
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        base = key[: -len(".lora_A.weight")]
        b = state.get(base + ".lora_B.weight")
        if b is None:
            raise ValueError(f"LoRA tensor {base}.lora_B.weight is missing")
        out[base + ".weight"] = (b.float() @ a.float()) * scale
    return out


def merged_base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA-injected model with peft's ``base_layer`` renamed back and the LoRA
    tensors dropped (i.e. the base model's own keys)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


# --------------------------------------------------------------------------------------------- losses


class LoraExtractor(torch.nn.Module):
    """An extractor whose fine-tuned file holds only LoRA tensors on ``self.model`` (depth, CLIP): the LoRA
    state, the merged base weights and writing the ``component`` file are the same for every such kind."""

    component = ""
    model: torch.nn.Module

    def file_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def lora_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model)

    def set_lora_state(self, state: Mapping[str, torch.Tensor], path: str = "<memory>") -> None:
        set_lora_state(self.model, state, path)

    def base_state(self) -> dict[str, torch.Tensor]:
        """The base model's own state dict (library key names, LoRA merged in and left out)."""
        return merged_base_state(self.model)

    def save(self, path: str, provenance: dict | None = None, overwrite: bool = False) -> None:
        from ..weights import save_weight_file  # lazy: weights imports the kind registry of this package

        save_weight_file(path, self.lora_state(), self.component, self.file_config(), provenance, overwrite)


def feature_l1_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], reduce: str = "mean"
) -> torch.Tensor:
    """L1 on intermediate representations, the teacher side detached: each representation's mean |s - t|,
    averaged over the representations (Eq. 3/5, ``reduce="mean"``) or summed (Eq. 6, the CLIP term over its
    31 intermediate layers, ``reduce="sum"``)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature lists differ in length ({len(student)} vs {len(teacher)})")
    losses = torch.stack([F.l1_loss(s.float(), t.detach().float()) for s, t in zip(student, teacher)])
    if reduce == "sum":
        return losses.sum()
    if reduce != "mean":
        raise ValueError(f"reduce must be 'mean' or 'sum', got '{reduce}'")
    return losses.mean()


# ------------------------------------------------------------------------------------- HF base loading


def rename_keys(
    state: Mapping[str, torch.Tensor], renames: Sequence[tuple[str, str]], scope: str = ""
) -> dict[str, torch.Tensor]:
    """Apply substring renames (in order) to every key that contains ``scope``."""
    out = {}
    for k, v in state.items():
        for old, new in renames if scope in k else ():
            if old in k:
                k = k.replace(old, new)
        out[k] = v
    return out


def load_hf_pretrained(
    model_cls: Any,
    path: str,
    config: Any = None,
    legacy_renames: Sequence[tuple[str, str]] = (),
    legacy_scope: str = "",
) -> Any:
    """Build a transformers model and load local weights strictly: a folder (``config.json`` +
    ``model.safetensors``) or one safetensors file (``config`` then required). Checkpoints with
    transformers 4.x parameter names are converted with ``legacy_renames`` and, failing that,
    with transformers' own ``from_pretrained`` conversions. Missing or mismatched weights are an
    error (never a silently random layer). Nothing is downloaded."""
    from safetensors.torch import load_file

    from ..weights import check_state_dict

    if os.path.isdir(path):
        weights = os.path.join(path, "model.safetensors")
        if config is None:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise WeightFileError(
                    path, "the folder has no config.json; give the model's config or a full model folder"
                )
            config = model_cls.config_class.from_pretrained(path, local_files_only=True)
        if not os.path.isfile(weights):
            raise WeightFileError(path, "the folder has no model.safetensors (only safetensors weights are loaded)")
    else:
        weights = path
        if not os.path.isfile(path):
            raise WeightFileError(path, "the file does not exist")
        if not path.endswith(".safetensors"):
            raise WeightFileError(path, "base weights must be a .safetensors file or a model folder")
        if config is None:
            raise WeightFileError(path, "a single weights file needs its model config")
    model = model_cls(config)
    state = rename_keys(load_file(weights), legacy_renames, legacy_scope)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    try:
        check_state_dict(model, state, path)
    except WeightFileError as first:
        tmp = tempfile.mkdtemp(prefix="megasr_base_")
        try:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config.to_dict(), f)
            try:
                os.symlink(os.path.abspath(weights), os.path.join(tmp, "model.safetensors"))
            except OSError:
                shutil.copyfile(weights, os.path.join(tmp, "model.safetensors"))
            converted, info = model_cls.from_pretrained(tmp, local_files_only=True, output_loading_info=True)
        except Exception:
            raise first from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise first from None
        return converted
    model.load_state_dict(state)
    return model


def finite_or_raise(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{what} produced NaN/inf values (weights damaged, or a dtype that overflows)")
    return x


def ceil_to(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)
