"""DAGE depth extractor: Depth-Anything-V2-Small (Apache-2.0) via ``transformers``, LoRA r=8 (``peft``)
on the DINOv2 backbone's attention projections.

The map is relative inverse depth (near = bright), min-max normalised per image. The
``dage_depth_lora`` weight file holds only the LoRA tensors plus the Depth-Anything config; the
base weights come from the user's Depth-Anything-V2-Small (a transformers folder or its single
``model.safetensors``). Intermediates for the DAGE loss are the backbone hidden states.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import WeightFileError
from ..weights import COMPONENT_DESCRIPTIONS, check_state_dict, detect_component, load_weight_file
from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LORA_DEFAULTS,
    DageOutput,
    LoraExtractor,
    check_input,
    inject_lora,
    load_hf_pretrained,
    normalize,
    resize_bchw,
    working_size,
)
from .encodings import normalize_depth
from .kinds import BY_KIND

log = logging.getLogger("megasr")

COMPONENT = BY_KIND["depth"].component
DEPTH_SIZE_MULTIPLE = 14
DEPTH_LORA_TARGET = r".*backbone\.encoder\.layer\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj)"

# depth-anything/Depth-Anything-V2-Small-hf (the only Apache-2.0 size), as a DepthAnythingConfig dict.
DEPTH_ANYTHING_V2_SMALL_CONFIG: dict[str, Any] = {
    "backbone_config": {
        "model_type": "dinov2",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 518,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
        "out_features": ["stage9", "stage10", "stage11", "stage12"],
        "out_indices": [9, 10, 11, 12],
        "apply_layernorm": True,
        "reshape_hidden_states": False,
    },
    "reassemble_hidden_size": 384,
    "reassemble_factors": [4, 2, 1, 0.5],
    "neck_hidden_sizes": [48, 96, 192, 384],
    "fusion_hidden_size": 64,
    "head_hidden_size": 32,
    "head_in_index": -1,
    "depth_estimation_type": "relative",
    "patch_size": 14,
}
DEPTH_DEFAULT_RESOLUTION = 518

# transformers 4.x DINOv2 names (as in the published Depth-Anything-V2-*-hf checkpoints) -> 5.x names.
# transformers' own conversion table covers Dinov2Model but not the Dinov2Backbone inside Depth Anything.
DINOV2_LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)


def build_depth_config(da_config: dict[str, Any]) -> Any:
    from transformers import DepthAnythingConfig, Dinov2Config

    cfg = dict(da_config)
    bb = dict(cfg.pop("backbone_config", {}))
    bb.pop("model_type", None)
    bb["reshape_hidden_states"] = False  # Depth Anything needs the token sequence
    backbone = Dinov2Config(**bb)
    return DepthAnythingConfig(backbone_config=backbone, **{k: v for k, v in cfg.items() if k != "model_type"})


def _small_dict(config: Any) -> dict[str, Any]:
    """A JSON-able DepthAnythingConfig dict (only what differs from the defaults is needed, but
    the full dict is kept so that a file documents its base)."""
    d = config.to_dict()
    bb = config.backbone_config.to_dict()
    keep_bb = {
        k: bb[k]
        for k in (
            "model_type",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "mlp_ratio",
            "patch_size",
            "image_size",
            "layerscale_value",
            "layer_norm_eps",
            "out_features",
            "out_indices",
            "apply_layernorm",
            "reshape_hidden_states",
            "hidden_act",
            "use_swiglu_ffn",
            "qkv_bias",
        )
        if k in bb
    }
    keep = {
        k: d[k]
        for k in (
            "reassemble_hidden_size",
            "reassemble_factors",
            "neck_hidden_sizes",
            "fusion_hidden_size",
            "head_hidden_size",
            "head_in_index",
            "depth_estimation_type",
            "max_depth",
            "patch_size",
        )
        if k in d
    }
    keep["backbone_config"] = keep_bb
    return keep


class DepthExtractor(LoraExtractor):
    """``forward(image [B,3,H,W] 0..1, resolution=None) -> DageOutput`` with ``map`` [B,1,H,W]
    (normalised inverse depth) at the input size and ``raw`` (unnormalised inverse depth) at the
    working size."""

    kind = "depth"
    component = COMPONENT
    size_multiple = DEPTH_SIZE_MULTIPLE

    def __init__(
        self,
        model: Any,
        depth_config: dict[str, Any],
        lora: dict[str, Any] | None = None,
        resolution: int = DEPTH_DEFAULT_RESOLUTION,
    ) -> None:
        super().__init__()
        self.lora_config = {**LORA_DEFAULTS, **(lora or {}), "target": DEPTH_LORA_TARGET}
        self.depth_config = depth_config
        self.resolution = int(resolution)
        self.model = inject_lora(
            model, DEPTH_LORA_TARGET, self.lora_config["r"], self.lora_config["alpha"], self.lora_config["dropout"]
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DepthExtractor":
        """``config``: {"depth_anything": DepthAnythingConfig dict, "lora": {...}, "resolution": int};
        random base weights (tests) ."""
        from transformers import DepthAnythingForDepthEstimation

        da = config.get("depth_anything", DEPTH_ANYTHING_V2_SMALL_CONFIG)
        model = DepthAnythingForDepthEstimation(build_depth_config(da))
        return cls(
            model, _small_dict(model.config), config.get("lora"), config.get("resolution", DEPTH_DEFAULT_RESOLUTION)
        )

    @classmethod
    def from_base(
        cls,
        base_path: str,
        depth_anything: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        resolution: int = DEPTH_DEFAULT_RESOLUTION,
    ) -> "DepthExtractor":
        """Base Depth-Anything weights from a transformers folder or one safetensors file
        (``depth_anything`` config, default V2-Small, is needed for a single file)."""
        from transformers import DepthAnythingForDepthEstimation

        cfg = (
            None
            if (depth_anything is None and _is_model_folder(base_path))
            else build_depth_config(depth_anything or DEPTH_ANYTHING_V2_SMALL_CONFIG)
        )
        model = load_hf_pretrained(
            DepthAnythingForDepthEstimation, base_path, cfg, DINOV2_LEGACY_RENAMES, "backbone.encoder."
        )
        model.config.backbone_config.reshape_hidden_states = False  # Depth Anything needs token sequences
        return cls(model, _small_dict(model.config), lora, resolution)

    def file_config(self) -> dict[str, Any]:
        return {
            "depth_anything": self.depth_config,
            "lora": {k: self.lora_config[k] for k in ("r", "alpha", "dropout", "target")},
            "resolution": self.resolution,
            "base": {
                "family": "depth_anything",
                "hidden_size": self.depth_config["backbone_config"]["hidden_size"],
                "num_hidden_layers": self.depth_config["backbone_config"]["num_hidden_layers"],
            },
        }

    def forward(self, image: torch.Tensor, resolution: int | None = None) -> DageOutput:
        image = check_input(image, "depth extractor")
        h0, w0 = image.shape[-2:]
        res = self.resolution if resolution is None else int(resolution)
        size = working_size(h0, w0, res, self.size_multiple)
        dtype = next(self.model.parameters()).dtype
        x = normalize(resize_bchw(image.float(), size, "bicubic").clamp(0, 1), IMAGENET_MEAN, IMAGENET_STD).to(dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        disparity = out.predicted_depth.unsqueeze(1).float()  # [B,1,h,w] at the working size, large = near
        feats = list(out.hidden_states[1:]) if out.hidden_states is not None else []
        # raw stays at the working size (bounded by resolution); only the 1-channel map is made at the input size
        depth = normalize_depth(resize_bchw(disparity, (h0, w0), "bilinear"))
        return DageOutput(map=depth, raw=disparity, features=feats)

    # -------------------------------------------------------------------------------- LoRA + files

    @classmethod
    def load(cls, path: str, base_path: str | None = None, device: str | torch.device = "cpu") -> "DepthExtractor":
        """Load a ``dage_depth_lora`` file onto base Depth-Anything weights from ``base_path``
        (folder or safetensors file). Without ``base_path`` the base is random (tests only)."""
        state, info = load_weight_file(path, COMPONENT, device=device)
        cfg = info.config
        try:
            da = cfg["depth_anything"]
            lora = cfg.get("lora")
        except KeyError as e:
            raise WeightFileError(info.path, f"its config lacks {e}") from None
        if base_path is None:
            log.warning("depth LoRA %s loaded onto a RANDOM Depth-Anything base (no base weights given)", path)
            model = cls.from_config(
                {"depth_anything": da, "lora": lora, "resolution": cfg.get("resolution", DEPTH_DEFAULT_RESOLUTION)}
            )
        else:
            model = cls.from_base(base_path, da, lora, cfg.get("resolution", DEPTH_DEFAULT_RESOLUTION))
        check_state_dict({k: tuple(v.shape) for k, v in model.lora_state().items()}, state, info.path)
        model.set_lora_state(state, info.path)
        return model.eval()


#: what the depth LoRA's base file is and where it comes from (for messages)
DEPTH_BASE_HINT = (
    "the Depth-Anything-V2-Small base weights: the model.safetensors of depth-anything/Depth-Anything-V2-Small-hf "
    "(Apache-2.0), renamed e.g. depth_anything_v2_small_hf.safetensors, in models/megasr"
)


def check_depth_base(path: str, name: str | None = None) -> None:
    """Refuse a depth-LoRA base that is not a plain transformers Depth-Anything safetensors file (a MegaSR file,
    an original-repository checkpoint, any other model). Raises :class:`WeightFileError` on ``path``; the
    message names the file as ``name`` (default: its file name)."""
    import os

    name = name or os.path.basename(path)
    component = detect_component(path)
    if component is not None:
        raise WeightFileError(
            path,
            f"'{name}' is a MegaSR {component} file ({COMPONENT_DESCRIPTIONS.get(component, '')}); the depth LoRA "
            f"needs {DEPTH_BASE_HINT}",
        )
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file: say so
        raise WeightFileError(path, f"'{name}' could not be read ({type(e).__name__}: {e})") from e
    if any(k.startswith("pretrained.") for k in keys):
        raise WeightFileError(
            path,
            f"'{name}' is an original-repository Depth-Anything checkpoint (keys 'pretrained.*'); the depth LoRA "
            f"needs the transformers layout: {DEPTH_BASE_HINT}",
        )
    if not (any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)):
        shown = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise WeightFileError(
            path,
            f"'{name}' is not a transformers Depth-Anything model (keys such as {shown}); the depth LoRA needs "
            f"{DEPTH_BASE_HINT}",
        )


def _is_model_folder(path: str) -> bool:
    import os

    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def silog_loss(
    pred: torch.Tensor, target: torch.Tensor, lambd: float = 0.5, eps: float = 1e-6, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al.), per image then averaged:
    sqrt(mean(d^2) - lambd * mean(d)^2), d = log(pred) - log(target). ``target`` is detached."""
    p = pred.float().flatten(1).clamp_min(0) + eps
    t = target.detach().float().flatten(1).clamp_min(0) + eps
    d = torch.log(p) - torch.log(t)
    if mask is not None:
        m = mask.flatten(1).to(d.dtype)
        n = m.sum(1).clamp_min(1)
        mean_d = (d * m).sum(1) / n
        mean_d2 = (d * d * m).sum(1) / n
    else:
        mean_d = d.mean(1)
        mean_d2 = (d * d).mean(1)
    return torch.sqrt((mean_d2 - lambd * mean_d * mean_d).clamp_min(1e-12)).mean()


def depth_output_loss(student: DageOutput, teacher: DageOutput) -> torch.Tensor:
    """Output term for depth: SILog between raw inverse depths."""
    return silog_loss(student.raw, teacher.raw)
