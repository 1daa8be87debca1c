"""DAGE CLIP image semantics: the CLIP ViT-H/14 vision tower (OpenCLIP LAION-2B, ComfyUI's
``clip_vision`` file) via ``transformers.CLIPVisionModel`` + LoRA r=8 (``peft``).

Output: the penultimate hidden states [B, 257, 1280] (what ComfyUI's ``CLIPVisionEncode`` returns
as ``penultimate_hidden_states``). LoRA sits on the attention projections of every layer except
the last: the last layer does not influence the penultimate state, so its LoRA would get no
gradient (and would make DDP need ``find_unused_parameters``).

In ComfyUI the LoRA is applied as weight patches onto the user's CLIP_VISION model:
:func:`clip_lora_to_weight_deltas` gives ``B @ A * alpha / r`` per weight and
:func:`comfy_clip_vision_key` maps the transformers key to ComfyUI's state-dict key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import WeightFileError
from ..weights import check_state_dict, load_weight_file
from .common import (
    LORA_DEFAULTS,
    DageOutput,
    LoraExtractor,
    check_input,
    inject_lora,
    lora_state,
    lora_weight_deltas,
)
from .kinds import BY_KIND

log = logging.getLogger("megasr")

COMPONENT = BY_KIND["clip"].component
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# OpenCLIP ViT-H/14 vision tower (ComfyUI's clip_vision_config_h.json), as a CLIPVisionConfig dict.
CLIP_VIT_H14_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1024,
}
CLIP_LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_CONFIG_KEYS = tuple(CLIP_VIT_H14_CONFIG)


def clip_lora_target(num_layers: int) -> str:
    """Regex of the LoRA targets: attention projections of layers 0 .. num_layers-2."""
    layers = "|".join(str(i) for i in range(max(0, num_layers - 1)))
    return rf"^encoder\.layers\.({layers})\.self_attn\.({'|'.join(CLIP_LORA_PROJECTIONS)})$"


def clip_preprocess(image: torch.Tensor, size: int = 224, crop: bool = True, quantize: bool = True) -> torch.Tensor:
    """CLIP preprocessing in torch, matching ComfyUI's ``clip_preprocess``: resize the short side
    to ``size`` (bicubic, antialiased), centre crop, (8-bit quantise), OpenAI CLIP mean/std.
    ``image`` [B, 3, H, W] in 0..1."""
    h, w = image.shape[-2:]
    x = image.float()
    if (h, w) != (size, size):
        if crop:
            scale = size / min(h, w)
            new = (round(scale * h), round(scale * w))
        else:
            new = (size, size)
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True)
        top = (x.shape[-2] - size) // 2
        left = (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size]
    if quantize:
        x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    else:
        x = x.clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def build_clip_config(config: Mapping[str, Any]) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{k: v for k, v in config.items() if k in _CONFIG_KEYS})


class ClipExtractor(LoraExtractor):
    """``forward(image [B,3,H,W] 0..1, resolution=None) -> DageOutput``: ``map`` = ``raw`` = the
    penultimate hidden states [B, 1 + (size/14)^2, hidden]; ``features`` = hidden states of
    layers 1 .. L-1 (the last layer is not run through LoRA and not used)."""

    kind = "clip"
    component = COMPONENT

    def __init__(self, model: Any, clip_config: dict[str, Any], lora: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.clip_config = {k: clip_config[k] for k in _CONFIG_KEYS if k in clip_config}
        n = int(self.clip_config["num_hidden_layers"])
        self.lora_config = {**LORA_DEFAULTS, **(lora or {})}
        self.lora_config["target"] = clip_lora_target(n)
        self.model = inject_lora(
            model,
            self.lora_config["target"],
            self.lora_config["r"],
            self.lora_config["alpha"],
            self.lora_config["dropout"],
        )

    @property
    def image_size(self) -> int:
        return int(self.clip_config.get("image_size", 224))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ClipExtractor":
        """``config``: {"clip": CLIPVisionConfig dict, "lora": {...}}; random weights (tests)."""
        from transformers import CLIPVisionModel

        clip_cfg = {**CLIP_VIT_H14_CONFIG, **config.get("clip", {})}
        return cls(CLIPVisionModel(build_clip_config(clip_cfg)), clip_cfg, config.get("lora"))

    @classmethod
    def from_base(
        cls, base_path: str, clip: dict[str, Any] | None = None, lora: dict[str, Any] | None = None
    ) -> "ClipExtractor":
        """Base weights from a ComfyUI ``clip_vision`` safetensors file (``vision_model.*`` keys) or
        a transformers CLIPVisionModel folder/file."""
        from transformers import CLIPVisionModel

        clip_cfg = {**CLIP_VIT_H14_CONFIG, **(clip or {})}
        model = CLIPVisionModel(build_clip_config(clip_cfg))
        load_clip_vision_weights(model, base_path)
        return cls(model, clip_cfg, lora)

    def file_config(self) -> dict[str, Any]:
        c = self.clip_config
        return {
            "clip": dict(c),
            "lora": {k: self.lora_config[k] for k in ("r", "alpha", "dropout", "target")},
            "base": {
                "family": "clip_vision",
                "hidden_size": c["hidden_size"],
                "num_hidden_layers": c["num_hidden_layers"],
                "patch_size": c["patch_size"],
                "image_size": c["image_size"],
            },
        }

    def forward(self, image: torch.Tensor, resolution: int | None = None, crop: bool = True) -> DageOutput:
        image = check_input(image, "CLIP extractor")
        dtype = next(self.model.parameters()).dtype
        x = clip_preprocess(image, self.image_size, crop=crop).to(dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        hs = out.hidden_states
        pen = hs[-2]
        return DageOutput(map=pen, raw=pen, features=list(hs[1:-1]))

    @classmethod
    def load(cls, path: str, base_path: str | None = None, device: str | torch.device = "cpu") -> "ClipExtractor":
        """A ``dage_clip_lora`` file onto base CLIP weights (random without ``base_path``: tests)."""
        state, info = load_weight_file(path, COMPONENT, device=device)
        if "clip" not in info.config:
            raise WeightFileError(info.path, "its config lacks the 'clip' vision config")
        if base_path is None:
            log.warning("CLIP LoRA %s loaded onto a RANDOM CLIP vision base (no base weights given)", path)
            model = cls.from_config({"clip": info.config["clip"], "lora": info.config.get("lora")})
        else:
            model = cls.from_base(base_path, info.config["clip"], info.config.get("lora"))
        model.set_lora_state(state, info.path)
        return model.eval()


def clip_lora_state(model: ClipExtractor | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors: ``encoder.layers.N.self_attn.q_proj.lora_A.weight`` etc."""
    inner = model.model if isinstance(model, ClipExtractor) else model
    return lora_state(inner)


def clip_lora_to_weight_deltas(
    lora_state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Per-weight deltas ``B @ A * alpha / r`` keyed by the transformers ``CLIPVisionModel``
    parameter names (e.g. ``encoder.layers.3.self_attn.q_proj.weight``). ``config`` is the file
    config (its "lora" entry) or the LoRA dict itself."""
    lora = config.get("lora", config)
    return lora_weight_deltas(lora_state, int(lora.get("r", 8)), float(lora.get("alpha", lora.get("r", 8))))


def comfy_clip_vision_key(hf_key: str) -> str:
    """transformers ``CLIPVisionModel`` key -> ComfyUI ``CLIPVisionModelProjection`` state-dict key.

    ComfyUI (comfy/clip_model.py) keeps the transformers 4.x layout under ``vision_model.``
    (embeddings, pre_layrnorm, encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj,
    layer_norm2, mlp.fc1, mlp.fc2}, post_layernorm); transformers 5.x drops that prefix.
    """
    return hf_key if hf_key.startswith(("vision_model.", "visual_projection.")) else "vision_model." + hf_key


def hf_clip_vision_key(comfy_key: str) -> str | None:
    """The inverse of :func:`comfy_clip_vision_key`; ``None`` for keys the vision tower lacks."""
    if comfy_key.startswith("vision_model."):
        return comfy_key[len("vision_model.") :]
    return None


def clip_lora_comfy_deltas(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a ``dage_clip_lora`` file and return ({ComfyUI key: weight delta}, file config), ready
    for ``ModelPatcher.add_patches({k: ("diff", (delta,))})`` on a CLIP_VISION model."""
    state, info = load_weight_file(path, COMPONENT)
    deltas = clip_lora_to_weight_deltas(state, info.config)
    return {comfy_clip_vision_key(k): v for k, v in deltas.items()}, info.config


def check_clip_lora_fits(deltas: Mapping[str, torch.Tensor], model_shapes: Mapping[str, Any], path: str) -> None:
    """Check that every delta names a weight of the CLIP vision model with the same shape
    (``model_shapes``: its state dict or key -> shape), e.g. that a ViT-H LoRA meets a ViT-H."""
    expected = {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in model_shapes.items() if k in deltas
    }
    try:
        check_state_dict(expected, deltas, path)
    except WeightFileError as e:
        raise WeightFileError(
            path,
            "this CLIP LoRA does not fit the CLIP vision model it is applied to (a ViT-H/14 "
            f"clip_vision file is needed): {e.problem}",
        ) from None


def openclip_to_hf_vision(state: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """Convert an OpenCLIP visual tower state dict (``visual.transformer.resblocks.N.attn.in_proj_weight``
    ...) to transformers ``CLIPVisionModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "class_embedding": "embeddings.class_embedding",
        "conv1.weight": "embeddings.patch_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_pre.weight": "pre_layrnorm.weight",
        "ln_pre.bias": "pre_layrnorm.bias",
        "ln_post.weight": "post_layernorm.weight",
        "ln_post.bias": "post_layernorm.bias",
    }
    per_block = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix) :]
        if k in simple:
            out[simple[k]] = v
        elif k.startswith("transformer.resblocks."):
            rest = k[len("transformer.resblocks.") :]
            idx, name = rest.split(".", 1)
            base = f"encoder.layers.{idx}."
            if name.startswith("attn.in_proj_"):
                kind = name[len("attn.in_proj_") :]
                for part, proj in zip(v.chunk(3, dim=0), ("q_proj", "k_proj", "v_proj")):
                    out[f"{base}self_attn.{proj}.{kind}"] = part
            else:
                mod, leaf = name.rsplit(".", 1)
                if mod in per_block:
                    out[f"{base}{per_block[mod]}.{leaf}"] = v
    return out


def load_clip_vision_weights(model: torch.nn.Module, path: str) -> None:
    """Load a CLIP vision tower into a transformers ``CLIPVisionModel`` (no LoRA) from a ComfyUI
    clip_vision safetensors file (transformers 4.x ``vision_model.*`` keys or OpenCLIP
    ``visual.*`` keys) or a transformers folder/file."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        cand = [os.path.join(path, n) for n in ("model.safetensors",) if os.path.isfile(os.path.join(path, n))]
        if not cand:
            raise WeightFileError(path, "no model.safetensors in this CLIP vision folder")
        path = cand[0]
    if not path.endswith(".safetensors"):
        raise WeightFileError(path, "CLIP vision weights must be a .safetensors file")
    if not os.path.isfile(path):
        raise WeightFileError(path, "the file does not exist")
    raw = load_file(path)
    if any(k.startswith("visual.transformer.") for k in raw):
        state = openclip_to_hf_vision(raw)
    else:
        state = {}
        for k, v in raw.items():
            if k.startswith("vision_model."):
                state[k[len("vision_model.") :]] = v
            elif not k.startswith(("visual_projection.", "text_model.", "text_projection.", "logit_scale")):
                state[k] = v
    state.pop("embeddings.position_ids", None)
    check_state_dict(model, state, path)
    model.load_state_dict(state)
