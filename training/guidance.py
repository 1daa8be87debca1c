"""Guidance of a MegaSR training step: the frozen DAGE extractors (with their on-disk cache) and modality dropout.

Exactly what the MegaSR nodes compute: CLIP penultimate tokens (DAGE CLIP LoRA, ``clip_crop`` = the CLIP node's
crop option), HED / depth / segmentation maps by the DAGE extractors at ``dage_resolution``, encoded as the map
IMAGEs the nodes pass on and resized to the output size (bilinear; nearest for seg). The kinds, their config
options and weight-file components come from :mod:`megasr.dage.kinds`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megasr.dage.kinds import MAP_KINDS, TRAINED_KINDS

from .errors import UsageError

__all__ = [
    "DROPOUT_KINDS",
    "GuidanceExtractor",
    "apply_modality_dropout",
    "cache_note",
    "maps_to_output_size",
    "modality_keep",
]

logger = logging.getLogger(__name__)

#: the kinds that give image semantics (tokens for CISM²) rather than a map
_SEMANTIC_KINDS: tuple[str, ...] = tuple(k.kind for k in TRAINED_KINDS if not k.is_map)


def _file_fingerprint(path: str | None) -> str:
    if not path:
        return "-"
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


class GuidanceExtractor:
    """The frozen DAGE extractors: LR image -> CLIP tokens and HED / depth / segmentation maps.

    Outputs are what the MegaSR nodes hand the network: tokens [B, T, D]; ``hed``/``depth`` [B, 1, h, w] in
    0..1 (depth normalised per image); ``seg`` [B, 3, h, w] in the ADE20K palette -- all at the LR size.
    With ``cache_dir`` each image's guidance is stored on disk under a hash of its exact pixel values and the
    extractor files, so an identical LR (a rerun or resume with the same seed) is never recomputed. The LR is
    a pure function of the HR crop and the step's degradation seed, so this key hits exactly when those
    repeat; see :func:`cache_note` for what that means for a run. Images go
    through the extractors one at a time, so a cached and a computed value are bit-identical.
    """

    def __init__(self, mcfg: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        from megasr.dage import load_extractor

        self.device = device
        self.dtype = dtype
        self.resolution = int(mcfg.dage_resolution)
        self.clip_crop = bool(mcfg.clip_crop)
        self.models: dict[str, nn.Module] = {}
        prints = []
        for (
            kind
        ) in TRAINED_KINDS:  # megasr.<config_section> is the fine-tuned file, megasr.<config_section>_base its base
            option = f"megasr.{kind.config_section}"
            path = getattr(mcfg, kind.config_section)
            base = getattr(mcfg, f"{kind.config_section}_base") if kind.lora else None
            prints.append(f"{kind.kind}={_file_fingerprint(path)}|{_file_fingerprint(base)}")
            if not path:
                continue
            if not Path(path).is_file():
                raise UsageError(option, f"'{path}' does not exist")
            if kind.lora and not base:
                raise UsageError(
                    option + "_base", f"the {kind.kind} LoRA {path} needs its base weights; set {option}_base"
                )
            if base and not Path(base).exists():
                raise UsageError(option + "_base", f"'{base}' does not exist")
            try:
                model = load_extractor(path, base_path=base, expect=kind.component)
            except Exception as exc:  # WeightFileError and friends: one line naming the option
                raise UsageError(option, str(exc)) from None
            self.models[kind.kind] = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        missing = [k for k in (*_SEMANTIC_KINDS, *MAP_KINDS) if k not in self.models]
        if missing:
            logger.warning("megasr: no DAGE extractor for %s; those guidance inputs are left out", ", ".join(missing))
        self._key_salt = json.dumps([prints, self.resolution, self.clip_crop, str(dtype)])
        self.cache_dir = Path(mcfg.guidance_cache).expanduser() if mcfg.guidance_cache else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.models)

    @property
    def clip_dim(self) -> int | None:
        clip = self.models.get("clip")
        return None if clip is None else int(clip.clip_config["hidden_size"])

    def _key(self, lr: torch.Tensor) -> str:
        pix = lr.detach().float().cpu().contiguous()  # exact values: the degradation is deterministic per seed
        h = hashlib.sha256(self._key_salt.encode())
        h.update(str(tuple(pix.shape)).encode())
        h.update(pix.numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def _compute(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        from megasr.dage import encodings

        x = lr.to(self.device, self.dtype)
        out: dict[str, torch.Tensor] = {}
        if "clip" in self.models:
            out["clip"] = self.models["clip"](x, crop=self.clip_crop).map.float()
        if "hed" in self.models:
            img = encodings.hed_to_image(self.models["hed"](x, self.resolution).map.float())
            out["hed"] = encodings.hed_to_network(img)
        if "depth" in self.models:
            img = encodings.depth_to_image(self.models["depth"](x, self.resolution).map.float())
            out["depth"] = encodings.depth_to_network(img)
        if "seg" in self.models:
            img = encodings.seg_labels_to_image(self.models["seg"](x, self.resolution).map)
            out["seg"] = encodings.seg_to_network(img, snap=False)
        return out

    def __call__(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Guidance for a batch of LR images [B, 3, h, w] in 0..1 (per image through the cache)."""
        if not self.models:
            return {}
        if self.cache_dir is None:
            return self._compute(lr)
        from safetensors.torch import load_file, save_file

        parts: list[dict[str, torch.Tensor]] = []
        for i in range(lr.shape[0]):
            key = self._key(lr[i : i + 1])
            path = self.cache_dir / key[:2] / f"{key}.safetensors"
            got = None
            if path.is_file():
                try:
                    got = load_file(str(path), device=str(self.device))
                    self.hits += 1
                except Exception as exc:  # a damaged entry is recomputed
                    logger.warning("guidance cache entry %s unreadable (%s): recomputing", path, exc)
            if got is None:
                got = self._compute(lr[i : i + 1])
                self.misses += 1
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file({k: v.detach().cpu().contiguous() for k, v in got.items()}, str(tmp))
                os.replace(tmp, path)
            parts.append(got)
        return {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}


def cache_note(mcfg: Any, train: Any, lr_hw: tuple[int, int], clip_dim: int | None, kinds: tuple[str, ...]) -> str:
    """What ``megasr.guidance_cache`` will cost and when it hits, for the log at the start of a run.

    The cache is keyed on the LR pixels, which are a pure function of what repeats -- the HR crop and the
    step's degradation seed (every draw of a step comes from a generator seeded by (seed, step, micro-batch,
    rank)). So it hits exactly when a degradation repeats: ``train.overfit_batches`` (fixed batches), a resumed
    or rerun run redoing the same steps, validation on fixed LR images. A normal run draws a fresh degradation
    every step and never hits: then the cache only writes."""
    per_map = lr_hw[0] * lr_hw[1] * 4
    entry = sum({"hed": 1, "depth": 1, "seg": 3}.get(k, 0) for k in kinds) * per_map
    if "clip" in kinds and clip_dim:
        entry += 257 * clip_dim * 4  # ViT-*/14 at 224 px: 256 patches + the class token
    samples = int(train.max_steps) * int(train.batch_size) * int(train.grad_accum)
    if int(train.overfit_batches) > 0:
        unique = int(train.overfit_batches) * int(train.batch_size)
        return (
            f"guidance cache: {unique} fixed samples (train.overfit_batches), about {entry * unique / 1e6:.1f} MB; "
            "every later step hits"
        )
    return (
        f"guidance cache: about {entry / 1e6:.2f} MB per sample, {entry * samples / 1e9:.1f} GB for "
        f"{samples} samples, and no hits in this run (a fresh degradation every step never repeats; it pays off "
        "only when the same steps run again: a rerun or resume, or train.overfit_batches)"
    )


def maps_to_output_size(guidance: Mapping[str, torch.Tensor], hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resize LR-size maps to the output size as the MS-GAM node does (bilinear; nearest for segmentation)."""
    out = {}
    for kind in MAP_KINDS:
        m = guidance.get(kind)
        if m is None:
            continue
        if tuple(m.shape[-2:]) != tuple(hw):
            if kind == "seg":
                m = F.interpolate(m, size=hw, mode="nearest-exact")
            else:
                m = F.interpolate(m, size=hw, mode="bilinear", align_corners=False)
        out[kind] = m
    return out


#: The guidance inputs modality dropout draws for, in this (fixed) order: the registry's.
DROPOUT_KINDS: tuple[str, ...] = tuple(k.kind for k in TRAINED_KINDS)


def modality_keep(batch: int, mcfg: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per kind, a [batch] bool tensor: True = the sample keeps that guidance input.

    One draw of [batch, 4] uniforms every step, whatever the probabilities, so a run's random stream (and its
    resume) does not depend on which extractors are configured.
    """
    u = torch.rand(batch, len(DROPOUT_KINDS), generator=generator, device=generator.device)
    return {k: u[:, i] >= float(getattr(mcfg, f"{k}_dropout")) for i, k in enumerate(DROPOUT_KINDS)}


def apply_modality_dropout(guidance: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor]) -> dict:
    """Dropped maps become the null map (zeros, what an absent map is at inference); dropped semantics become a
    per-sample ``clip_keep`` weight of 0 on the CISM² term (its absent state: no term)."""
    out = dict(guidance)
    for kind in MAP_KINDS:
        if kind in out:
            m = out[kind]
            k = keep[kind].to(m.device).view(-1, *([1] * (m.ndim - 1)))
            out[kind] = torch.where(k, m, torch.zeros_like(m))
    if "clip" in out:
        out["clip_keep"] = keep["clip"].to(device=out["clip"].device, dtype=out["clip"].dtype)
    return out
