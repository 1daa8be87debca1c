"""MegaSR training (Eq. 4): ``python -m training megasr --config FILE``.

Frozen: the SD-2-base U-Net, its VAE and text encoder (from a local diffusers folder with ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` -- or single files, see :func:`load_base_models`) and the fine-tuned DAGE
extractors. Trained: the :class:`megasr.model.MegaSRModel` -- the ControlNet (SD encoder copy, LR condition
encoder, zero convs), the CISM² connector, per-block projections and gates, and MS-GAM.

One step (per micro-batch, every random draw from the loop's per-step generator, so a resumed run repeats it):

1. HR crops -> Real-ESRGAN second-order degradation on the device (:class:`training.data.DegradedBatch`);
2. the bicubic-upscaled LR at HR size (0..1) is the ControlNet hint -- what the MegaSR nodes feed it;
3. the HR crop (``megasr.target``) is VAE-encoded (``latents * scaling_factor``), noised at a uniform random
   timestep of the SD-2 DDPM schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon);
4. guidance from the LR image, exactly as the nodes compute it: CLIP penultimate tokens (DAGE CLIP LoRA,
   ``clip_crop`` = the CLIP node's crop option), HED / depth / segmentation maps by the DAGE extractors at
   ``dage_resolution``, encoded as the map IMAGEs the nodes pass on (HED/depth mean channel, depth normalised
   per image, segmentation in the ADE20K palette) and resized to the output size (bilinear; nearest for seg),
   optionally cached on disk (``guidance_cache``, keyed by the LR pixels and the extractor files);
5. text: per image the tags in ``<image>.txt`` beside it (when ``captions``), else the tags of the HR crop by the
   teacher tagger (``megasr.tags``, :mod:`training.tagging`), else ``prompt``; replaced by the empty prompt with
   probability ``train.text_dropout`` (paper: 0.5; dropped images are not tagged), through the frozen tokenizer +
   text encoder;
6. modality dropout (MMSR): per sample and independently, each map is replaced by its null map (zeros) with
   probability ``megasr.<kind>_dropout`` and the image semantics are dropped (CISM² adds no term) with
   ``megasr.clip_dropout``. The nodes feed exactly these null inputs for an absent map or a strength of 0,
   so every subset of guidance the user may leave out is in distribution;
7. ``loss = MSE(eps_pred, eps)`` with :func:`megasr.model.megasr_noise_prediction`.

Optimisation, mixed precision, gradient accumulation, checkpoints and resume are :mod:`training.loop`'s.
A warm start from a SeeSR checkpoint folder (``init.seesr_dir``) is :mod:`training.seesr`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import latest_checkpoint
from .config import RunConfig, UsageError, config_to_dict
from .data import DegradedBatch
from .degradations import DegradationPipeline
from .loop import LoopResult, StepContext, run_training
from .runs import (
    build_adam,
    build_hr_dataset,
    degradation_generator,
    hr_batches,
    loop_config,
    open_run_dir,
    warmup_scheduler,
)

__all__ = [
    "SD2_NOISE_SCHEDULE",
    "BaseModels",
    "GuidanceExtractor",
    "MegaSRStage",
    "MegaSRTrainModule",
    "StepInputs",
    "load_base_models",
    "load_text_encoder",
    "load_unet",
    "load_vae",
    "run_megasr",
    "train_megasr",
]

logger = logging.getLogger(__name__)

STAGE = "megasr"
EXPORT_NAME = "megasr_controlnet.safetensors"

#: Stable Diffusion 2 base training schedule (epsilon prediction).
SD2_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

#: The SD-2 KL VAE (diffusers ``AutoencoderKL`` config), for single-file checkpoints.
SD2_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: The SD-2 text encoder as diffusers ships it: OpenCLIP ViT-H text, penultimate layer = 23 layers + final LN.
SD2_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- base models


@dataclass
class BaseModels:
    """The frozen SD-2 parts."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any  # diffusers DDPMScheduler


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A single-file checkpoint: safetensors, or a torch file loaded with ``weights_only=True``."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a state dict")
    return state


class _SingleFile:
    """Loads an LDM-layout SD checkpoint once for the parts taken from it."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, torch.Tensor]] = {}

    def __call__(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._cache:
            self._cache[path] = _read_state(path)
        return self._cache[path]


def _component(mcfg: Any, name: str) -> tuple[Path, str]:
    """Where a base part comes from: ``megasr.<name>`` or ``megasr.base``/<name> (or the single file)."""
    explicit = getattr(mcfg, name)
    option = f"megasr.{name}"
    if explicit:
        path = Path(explicit).expanduser()
    elif mcfg.base:
        option = "megasr.base"
        base = Path(mcfg.base).expanduser()
        path = base if base.is_file() else base / name
    else:
        raise UsageError("megasr.base", f"no SD-2 base given: set megasr.base (a diffusers folder with {name}/) ")
    if not path.exists():
        raise UsageError(option, f"'{path}' does not exist (needed for the {name.replace('_', ' ')})")
    return path, option


def _load_part(mcfg: Any, name: str, folder_loader: Any, file_loader: Any) -> nn.Module:
    path, option = _component(mcfg, name)
    try:
        model = folder_loader(path) if path.is_dir() else file_loader(path)
    except UsageError:
        raise
    except Exception as exc:  # a broken folder or file: name it, no traceback
        from .failures import explain

        known = explain(exc)
        text = known[0] if known else " ".join(str(exc).split())
        text = text if len(text) <= 400 else text[:400] + " ..."
        raise UsageError(option, f"cannot load the {name.replace('_', ' ')} from '{path}': {text}") from None
    return model.eval().requires_grad_(False)


def load_unet(mcfg: Any, single: _SingleFile | None = None) -> nn.Module:
    """The frozen U-Net: a diffusers folder, or an LDM-layout checkpoint converted with ``megasr.unet_config``."""
    from diffusers import UNet2DConditionModel

    single = single or _SingleFile()

    def from_file(path: Path) -> nn.Module:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        from .sd_checkpoint import unet_config_from_ldm

        state = single(path)
        config = {**unet_config_from_ldm(state), **dict(mcfg.unet_config)}  # the layout the file holds
        unet = UNet2DConditionModel(**config)
        converted = convert_ldm_unet_checkpoint(state, unet.config)
        missing, unexpected = unet.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the U-Net in the file does not fit the layout read from it ({len(missing)} missing keys, e.g. "
                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); set megasr.unet_config "
                "(a diffusers UNet2DConditionModel config) to describe it"
            )
        return unet

    return _load_part(mcfg, "unet", UNet2DConditionModel.from_pretrained, from_file)


def load_vae(mcfg: Any, single: _SingleFile | None = None) -> nn.Module:
    """The frozen KL VAE: a diffusers folder, or an LDM-layout checkpoint (SD-2 VAE config)."""
    from diffusers import AutoencoderKL

    single = single or _SingleFile()

    def from_file(path: Path) -> nn.Module:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        vae = AutoencoderKL(**SD2_VAE_CONFIG)
        vae.load_state_dict(convert_ldm_vae_checkpoint(single(path), vae.config), strict=True)
        return vae

    return _load_part(mcfg, "vae", AutoencoderKL.from_pretrained, from_file)


def load_text_encoder(mcfg: Any, single: _SingleFile | None = None) -> nn.Module:
    """The frozen text encoder: a diffusers/transformers folder, or the OpenCLIP text tower of an SD-2 checkpoint."""
    from transformers import CLIPTextConfig, CLIPTextModel

    single = single or _SingleFile()

    def from_file(path: Path) -> nn.Module:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        model = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_CONFIG))
        state = convert_open_clip_checkpoint(model, single(path))
        if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 has no text_model
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if "text_projection" not in k]  # CLIPTextModel has no projection
        if missing or unexpected:
            raise ValueError(f"not an SD-2 OpenCLIP text tower: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return model

    return _load_part(mcfg, "text_encoder", CLIPTextModel.from_pretrained, from_file)


def find_tokenizer(mcfg: Any, models_dir: str | None = None) -> tuple[Path, str]:
    """The tokenizer folder: ``megasr.tokenizer``, ``<base>/tokenizer`` of a diffusers folder, or -- for a
    single-file checkpoint, which has none -- ComfyUI's CLIP tokenizer files (:mod:`training.sd_checkpoint`)."""
    from .sd_checkpoint import comfy_tokenizer_dirs

    if mcfg.tokenizer or (mcfg.base and Path(mcfg.base).expanduser().is_dir()):
        path, option = _component(mcfg, "tokenizer")
        if not path.is_dir():
            raise UsageError(option, f"'{path}' is not a tokenizer folder", expected="a folder with vocab.json")
        return path, option
    candidates = comfy_tokenizer_dirs(models_dir)
    for d in candidates:
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return d, "megasr.tokenizer"
    raise UsageError(
        "megasr.tokenizer",
        "a single-file checkpoint holds no tokenizer and ComfyUI's CLIP tokenizer files were not found "
        f"(looked in {', '.join(str(d) for d in candidates[:3])})",
        expected="--models-dir COMFYUI/models (its ComfyUI has comfy/sd1_tokenizer) or a tokenizer folder",
        example="--set megasr.tokenizer=/ComfyUI/comfy/sd1_tokenizer",
    )


def load_base_models(mcfg: Any, models_dir: str | None = None) -> BaseModels:
    """Load the frozen SD-2 U-Net, VAE, text encoder, tokenizer and noise schedule.

    Each part comes from ``megasr.<part>`` when set, else from ``megasr.base``. A part is a diffusers folder
    (``config.json`` + weights) or -- U-Net, VAE and text encoder -- one LDM-layout SD checkpoint
    (``.safetensors``, or ``.ckpt`` read with ``weights_only=True``), converted with diffusers' converters using
    ``megasr.unet_config`` (default: SD-2-base) and the SD-2 VAE / text-encoder configs. The tokenizer must be
    a folder (a checkpoint has none). The schedule is ``<base>/scheduler`` when present, else SD-2's.
    """
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer

    single = _SingleFile()
    unet = load_unet(mcfg, single)
    vae = load_vae(mcfg, single)
    text_encoder = load_text_encoder(mcfg, single)
    tok_path, tok_option = find_tokenizer(mcfg, models_dir)
    try:
        if tok_path.name == "sd1_tokenizer":  # ComfyUI's copy of the CLIP tokenizer files
            from .sd_checkpoint import load_clip_tokenizer

            tokenizer = load_clip_tokenizer(tok_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
    except Exception as exc:
        raise UsageError(tok_option, f"cannot load the tokenizer from '{tok_path}': {exc}") from None
    sched_dir = Path(mcfg.base).expanduser() / "scheduler" if mcfg.base else None
    if sched_dir is not None and sched_dir.is_dir():
        scheduler = DDPMScheduler.from_pretrained(str(sched_dir))
    else:
        scheduler = DDPMScheduler(**SD2_NOISE_SCHEDULE)
    if scheduler.config.prediction_type != "epsilon":
        raise UsageError(
            "megasr.base", f"the schedule predicts '{scheduler.config.prediction_type}'; MegaSR is epsilon"
        )
    ctx = int(getattr(unet.config, "cross_attention_dim", 0))
    width = int(text_encoder.config.hidden_size)
    if ctx != width:
        raise UsageError(
            "megasr.text_encoder",
            f"the text encoder gives {width}-d tokens but the U-Net's cross-attention takes {ctx}-d (not an SD-2 pair)",
        )
    return BaseModels(unet, vae, text_encoder, tokenizer, scheduler)


# ----------------------------------------------------------------------------------------------- guidance

_MAP_KINDS = ("hed", "depth", "seg")


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
    extractor files, so an identical LR (a rerun or resume with the same seed) is never recomputed. Images go
    through the extractors one at a time, so a cached and a computed value are bit-identical.
    """

    def __init__(self, mcfg: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        from megasr.dage import load_extractor

        self.device = device
        self.dtype = dtype
        self.resolution = int(mcfg.dage_resolution)
        self.clip_crop = bool(mcfg.clip_crop)
        self.models: dict[str, nn.Module] = {}
        specs = {
            "hed": ("megasr.dage_hed", mcfg.dage_hed, None, "dage_hed"),
            "depth": ("megasr.dage_depth", mcfg.dage_depth, mcfg.dage_depth_base, "dage_depth_lora"),
            "seg": ("megasr.dage_seg", mcfg.dage_seg, None, "dage_seg"),
            "clip": ("megasr.dage_clip", mcfg.dage_clip, mcfg.dage_clip_base, "dage_clip_lora"),
        }
        prints = []
        for kind, (option, path, base, component) in specs.items():
            prints.append(f"{kind}={_file_fingerprint(path)}|{_file_fingerprint(base)}")
            if not path:
                continue
            if not Path(path).is_file():
                raise UsageError(option, f"'{path}' does not exist")
            if component in ("dage_depth_lora", "dage_clip_lora") and not base:
                raise UsageError(option + "_base", f"the {kind} LoRA {path} needs its base weights; set {option}_base")
            if base and not Path(base).exists():
                raise UsageError(option + "_base", f"'{base}' does not exist")
            try:
                model = load_extractor(path, base_path=base, expect=component)
            except Exception as exc:  # WeightFileError and friends: one line naming the option
                raise UsageError(option, str(exc)) from None
            self.models[kind] = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        missing = [k for k in ("clip", *_MAP_KINDS) if k not in self.models]
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


def maps_to_output_size(guidance: Mapping[str, torch.Tensor], hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resize LR-size maps to the output size as the MS-GAM node does (bilinear; nearest for segmentation)."""
    out = {}
    for kind in _MAP_KINDS:
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


#: The guidance inputs modality dropout draws for, in this (fixed) order.
DROPOUT_KINDS = ("hed", "depth", "seg", "clip")


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
    for kind in ("hed", "depth", "seg"):
        if kind in out:
            m = out[kind]
            k = keep[kind].to(m.device).view(-1, *([1] * (m.ndim - 1)))
            out[kind] = torch.where(k, m, torch.zeros_like(m))
    if "clip" in out:
        out["clip_keep"] = keep["clip"].to(device=out["clip"].device, dtype=out["clip"].dtype)
    return out


# ----------------------------------------------------------------------------------------------- text


class PromptEncoder:
    """Frozen tokenizer + text encoder; each distinct prompt is encoded once."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        limit = int(getattr(text_encoder.config, "max_position_embeddings", 77))
        self.max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            ids = self.tokenizer(
                todo, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0].float()
            for p, h in zip(todo, hidden, strict=True):
                self._cache[p] = h
        return torch.stack([self._cache[p] for p in prompts])


def captions_for(paths: Sequence[str], prompt: str | None, use_captions: bool) -> list[str | None]:
    """Per image: the tags in ``<image>.txt`` beside it (when present and ``use_captions``), else ``prompt``."""
    out = []
    for p in paths:
        text = prompt
        if use_captions:
            side = Path(p).with_suffix(".txt")
            if side.is_file():
                text = " ".join(side.read_text(encoding="utf-8", errors="replace").split())
        out.append(text)
    return out


# ----------------------------------------------------------------------------------------------- model


class MegaSRTrainModule(nn.Module):
    """The trained :class:`MegaSRModel` (its only child) calling the frozen U-Net it is attached to.

    The U-Net is held outside the module tree: it is neither checkpointed, nor broadcast or all-reduced by DDP,
    nor moved by ``accelerate``. ``forward`` is the full MegaSR epsilon prediction, so DDP syncs every
    gradient of the MegaSR model.
    """

    def __init__(self, model: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet

        self.model = model
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_adapter", attach_megasr_to_diffusers_unet(unet, model))

    @property
    def unet(self) -> nn.Module:
        return self._unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        hint: torch.Tensor,
        clip: torch.Tensor | None = None,
        hed: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        seg: torch.Tensor | None = None,
        clip_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from megasr.model import megasr_noise_prediction

        ctx = self.model.prepare_context(
            tuple(sample.shape[-2:]),
            clip,
            hed,
            depth,
            seg,
            image_keep=clip_keep,
            image_attention=self._adapter.image_attention,
        )
        return megasr_noise_prediction(self._unet, self._adapter, self.model, sample, timestep, text, hint, ctx)


def controlnet_from_unet(controlnet: nn.Module, unet: nn.Module) -> int:
    """Copy the U-Net encoder into the ControlNet (as ``ControlNetModel.from_unet``); zero convs stay zero.

    Returns the number of tensors copied.
    """
    prefixes = ("conv_in.", "time_proj.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.")
    prefixes += ("mid_block.",)
    cn_state = controlnet.state_dict()
    take = {
        k: v
        for k, v in unet.state_dict().items()
        if k.startswith(prefixes) and k in cn_state and tuple(cn_state[k].shape) == tuple(v.shape)
    }
    controlnet.load_state_dict(take, strict=False)
    return len(take)


def build_megasr_model(cfg: RunConfig, unet: nn.Module, clip_dim: int | None) -> nn.Module:
    """A fresh :class:`MegaSRModel` for ``unet``: ControlNet = the U-Net's encoder copy, new parts zero-init."""
    from megasr.model import MegaSRConfig, MegaSRModel

    overrides = dict(cfg.megasr.model)
    if clip_dim is not None:
        if "clip_dim" in overrides and int(overrides["clip_dim"]) != clip_dim:
            raise UsageError(
                "megasr.model.clip_dim",
                f"is {overrides['clip_dim']} but the DAGE CLIP extractor gives {clip_dim}-d tokens",
            )
        overrides["clip_dim"] = clip_dim
    overrides.pop("unet", None)
    try:
        mconfig = MegaSRConfig(unet=dict(unet.config), **overrides)
    except TypeError as exc:
        raise UsageError("megasr.model", str(exc)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = MegaSRModel(mconfig)
        except ValueError as exc:  # e.g. an unknown connector kind
            raise UsageError("megasr.model", str(exc)) from None
    n = controlnet_from_unet(model.controlnet, unet)
    logger.info("megasr: ControlNet initialised from the U-Net encoder (%d tensors)", n)
    return model


# ----------------------------------------------------------------------------------------------- the stage


@dataclass
class StepInputs:
    """Everything of one micro-batch except the noise: made without gradients."""

    latents: torch.Tensor  # [B, 4, H/8, W/8], scaled
    hint: torch.Tensor  # [B, 3, H, W] in 0..1
    text: torch.Tensor  # [B, 77, context]
    guidance: dict[str, torch.Tensor]  # clip tokens, hed/depth/seg at the output size


class MegaSRStage:
    """The frozen parts, the trained module and the per-step computation of a MegaSR run."""

    def __init__(self, cfg: RunConfig, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> None:
        from megasr.model import MegaSRModel

        self.cfg = cfg
        self.mcfg = cfg.megasr
        if self.mcfg.target not in ("hr", "hr_usm"):
            raise UsageError("megasr.target", f"must be hr or hr_usm, got '{self.mcfg.target}'")
        self.device = device
        self.weight_dtype = weight_dtype
        base = load_base_models(self.mcfg, cfg.models_dir)
        self.seesr_report = None
        self.base = base
        self.guidance = GuidanceExtractor(self.mcfg, device, weight_dtype)
        model: MegaSRModel = build_megasr_model(cfg, base.unet, self.guidance.clip_dim)
        if cfg.init.seesr_dir:
            from .seesr import SeeSRError, warm_start_from_seesr

            try:
                unet = base.unet if cfg.init.seesr_unet else None
                self.seesr_report = warm_start_from_seesr(model, cfg.init.seesr_dir, unet=unet)
            except SeeSRError as exc:
                raise UsageError("init.seesr_dir", str(exc)) from None
        for part in (base.unet, base.vae, base.text_encoder):
            part.to(device) if weight_dtype == torch.float32 else part.to(device=device, dtype=weight_dtype)
        self.module = MegaSRTrainModule(model, base.unet)
        self.prompts = PromptEncoder(base.tokenizer, base.text_encoder, device)
        self.tagger = None
        if self.mcfg.tags.enabled:
            from .tagging import build_teacher_tagger

            self.tagger = build_teacher_tagger(
                self.mcfg, base.tokenizer, device, weight_dtype, self.guidance.models.get("clip")
            )
        self.last_prompts: list[str] = []
        self.pipeline = DegradationPipeline(cfg.degradation)
        self.scaling = float(getattr(base.vae.config, "scaling_factor", 0.18215))
        sched = base.scheduler
        self.num_timesteps = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("megasr: %s trainable parameters; guidance: %s", f"{n_train:,}", ", ".join(self.guidance.kinds))

    @property
    def model(self) -> nn.Module:
        return self.module.model

    @torch.no_grad()
    def make_inputs(self, hr: torch.Tensor, paths: Sequence[str], generator: torch.Generator) -> StepInputs:
        """Degrade, encode, extract guidance and text for a batch of HR crops [B, 3, H, W].

        Outside autocast: the degradation runs in float32, the frozen parts in their own dtype.
        """
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self._make_inputs(hr, paths, generator)

    def _make_inputs(self, hr: torch.Tensor, paths: Sequence[str], generator: torch.Generator) -> StepInputs:
        b = DegradedBatch.build(hr, self.pipeline, generator, device=self.device)
        target = b.hr if self.mcfg.target == "hr" else b.hr_usm
        dist = self.base.vae.encode((target * 2.0 - 1.0).to(self.weight_dtype)).latent_dist
        latents = dist.sample(generator=generator).float() * self.scaling
        sidecar = captions_for(paths, None, self.mcfg.captions)
        drop = torch.rand(len(paths), generator=generator, device=generator.device) < self.cfg.train.text_dropout
        prompts = self._prompts(b.hr, sidecar, drop.tolist())
        self.last_prompts = prompts
        text = self.prompts(prompts)
        guidance = self.guidance(b.lr)
        maps = maps_to_output_size(guidance, tuple(b.hr.shape[-2:]))
        if "clip" in guidance:
            maps["clip"] = guidance["clip"]
        keep = modality_keep(len(prompts), self.mcfg, generator)
        return StepInputs(latents=latents, hint=b.lr_up, text=text, guidance=apply_modality_dropout(maps, keep))

    def _prompts(self, hr: torch.Tensor, sidecar: Sequence[str | None], drop: Sequence[bool]) -> list[str]:
        """Per image: "" when dropped, else its sidecar tags, else the teacher's tags of its HR crop, else
        ``megasr.prompt``. Only the images that need it are tagged."""
        out = ["" if d else (s if s is not None else self.mcfg.prompt) for s, d in zip(sidecar, drop, strict=True)]
        need = [i for i, (s, d) in enumerate(zip(sidecar, drop, strict=True)) if s is None and not d]
        if self.tagger is not None and need:
            for i, tags in zip(need, self.tagger(hr[need]), strict=True):
                if tags:
                    out[i] = ", ".join(tags)
        return out

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Epsilon and uniform timesteps for ``latents``."""
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        t = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator, device=generator.device)
        return noise, t.to(latents.device)

    def loss(self, module: nn.Module, inputs: StepInputs, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Eq. 4: ``|| eps - eps_theta(z_t, t, text, LR, guidance) ||^2``."""
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * inputs.latents + (1.0 - a).sqrt() * noise
        dt = self.weight_dtype
        g = {k: v.to(dt) for k, v in inputs.guidance.items()}
        pred = module(noisy.to(dt), timesteps, inputs.text.to(dt), inputs.hint.to(dt), **g)
        return F.mse_loss(pred.float(), noise.float())

    def step_fn(self, batch: dict[str, Any], ctx: StepContext) -> torch.Tensor:
        # ctx.generator; with train.overfit_batches one fixed per cycled batch: the same degradation, latent
        # sample, text dropout, noise and timesteps every time the batch comes round
        gen = degradation_generator(ctx, self.cfg)
        inputs = self.make_inputs(batch["hr"], batch["path"], gen)
        noise, t = self.draw_noise(inputs.latents, gen)
        return self.loss(ctx.modules[STAGE], inputs, noise, t)


def make_megasr_accelerator(cfg: RunConfig, find_unused: bool) -> Any:
    """``Accelerator`` as :func:`training.loop.make_accelerator`, with DDP told whether some parameters go unused
    (a guidance input without an extractor leaves its MS-GAM / CISM² weights out of the graph)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    lcfg = loop_config(cfg)
    cpu = not torch.cuda.is_available()
    mp = lcfg.mixed_precision
    if cpu and mp == "fp16":
        logger.warning("mixed_precision fp16 needs a GPU; running in full precision on the CPU")
        mp = "no"
    kwargs = DistributedDataParallelKwargs(find_unused_parameters=find_unused)
    return Accelerator(
        cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=lcfg.grad_accum, kwargs_handlers=[kwargs]
    )


def _frozen_dtype(acc: Any) -> torch.dtype:
    """Frozen parts in the mixed-precision dtype on a GPU (as diffusers' ControlNet training), else float32."""
    mp = str(acc.mixed_precision)
    return _DTYPES.get(mp, torch.float32) if acc.device.type == "cuda" else torch.float32


def _check_resumable(run_dir: Path) -> dict[str, Any] | None:
    """Refuse to resume a run of another stage (its checkpoint would not fit): one line, not a traceback."""
    from .checkpoint import STATE_FILE, decode_tree

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        extra = decode_tree(meta["state"].get("extra", {}), {})
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise UsageError("--resume", f"checkpoint {ckpt} is unreadable ({exc})") from None
    stage = extra.get("stage") if isinstance(extra, dict) else None
    if stage != STAGE:
        raise UsageError("--resume", f"'{run_dir}' holds a '{stage}' run, not megasr; choose another --output")
    return extra


def train_megasr(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> tuple[LoopResult, Path | None, MegaSRStage]:
    """Train MegaSR into ``run_dir``; returns the loop result, the exported weight file (main process) and the stage."""
    from megasr.model_io import save_megasr_model

    from .export import megasr_provenance

    dataset = build_hr_dataset(cfg)
    previous = _check_resumable(run_dir) if resume else None
    mcfg = cfg.megasr
    all_guidance = all(getattr(mcfg, k) for k in ("dage_hed", "dage_depth", "dage_seg", "dage_clip"))
    acc = make_megasr_accelerator(cfg, find_unused=not all_guidance)
    stage = MegaSRStage(cfg, acc.device, _frozen_dtype(acc))
    if previous is not None and previous.get("megasr_config") is not None:
        old = json.loads(json.dumps(previous["megasr_config"]))
        new = json.loads(json.dumps(stage.model.config.to_dict()))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise UsageError(
                "--resume",
                f"the run's model was built with other settings ({', '.join(changed)}); resume with its config",
            )
    optimizer = build_adam(stage.module.parameters(), cfg)
    scheduler = warmup_scheduler(optimizer, cfg.train.lr_warmup_steps)
    extra = {
        "stage": STAGE,
        "config": config_to_dict(cfg),
        "megasr_config": stage.model.config.to_dict(),
        "seesr": stage.seesr_report.summary() if stage.seesr_report is not None else None,
    }
    result = run_training(
        run_dir=run_dir,
        config=loop_config(cfg),
        modules={STAGE: stage.module},
        optimizer=optimizer,
        scheduler=scheduler,
        step_fn=stage.step_fn,
        batches=hr_batches(dataset, cfg),
        resume=resume,
        extra_state=extra,
        accelerator=acc,
    )
    export = None
    if acc.is_main_process:
        export = run_dir / "export" / EXPORT_NAME
        model = acc.unwrap_model(stage.module).model
        ckpt = result.checkpoint or latest_checkpoint(run_dir)
        prov = megasr_provenance(extra["config"], result.step, run_dir, ckpt, extra["seesr"])
        save_megasr_model(str(export), model, prov, overwrite=True)
    acc.wait_for_everyone()
    return result, export, stage


def check_inputs(cfg: RunConfig) -> None:
    """Fail early (before a run folder is made) on a missing base part, DAGE file or SeeSR folder."""
    mcfg = cfg.megasr
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        _component(mcfg, name)
    for option in ("dage_hed", "dage_depth", "dage_depth_base", "dage_seg", "dage_clip", "dage_clip_base"):
        path = getattr(mcfg, option)
        if path and not Path(path).expanduser().exists():
            raise UsageError(f"megasr.{option}", f"'{path}' does not exist")
    for lora in ("dage_depth", "dage_clip"):
        if getattr(mcfg, lora) and not getattr(mcfg, f"{lora}_base"):
            raise UsageError(
                f"megasr.{lora}_base", f"the {lora[5:]} LoRA needs its base weights; set megasr.{lora}_base"
            )
    if mcfg.tags.enabled:
        from .tagging import tag_sources

        tag_sources(mcfg)
    if cfg.init.seesr_unet and not cfg.init.seesr_dir:
        raise UsageError("init.seesr_unet", "needs init.seesr_dir (the SeeSR folder whose unet/ to use)")
    if cfg.init.seesr_dir and not Path(cfg.init.seesr_dir).expanduser().is_dir():
        raise UsageError("init.seesr_dir", f"'{cfg.init.seesr_dir}' is not a folder")


def run_megasr(cfg: RunConfig, args: Any) -> str | None:
    """CLI entry (``python -m training megasr``); returns the summary line (None off the main process)."""
    build_hr_dataset(cfg, "--input" if getattr(args, "input", None) else "data.hr_dirs")  # bad input: exit 2 first
    check_inputs(cfg)
    run_dir = open_run_dir(
        Path(args.output) if args.output else Path(cfg.output_dir) / STAGE,
        cfg,
        STAGE,
        resume=bool(args.resume),
        overwrite=bool(args.overwrite),
    )
    result, export, _ = train_megasr(cfg, run_dir, resume=bool(args.resume))
    if export is None:
        return None
    last = f"{result.losses[-1]:.5g}" if result.losses else "n/a"
    where = f"; weights {export}" if export is not None else ""
    return f"megasr: step {result.step} (from {result.start_step}), last loss {last}, run {run_dir}{where}"
