"""Tiny, randomly initialised but structurally real DAGE extractors and weight files.

Reused by the DAGE, node and training tests. Everything is seeded; nothing is downloaded.

    model, config = tiny_hed()          # HedExtractor, its from_config dict
    paths = write_dage_weight_files(folder)   # {"dage_hed": path, ...}
"""

from __future__ import annotations

import os
from typing import Any

import torch

TINY_HED_CONFIG: dict[str, Any] = {"widths": [4, 8, 8, 16, 16], "resolution": 64}

TINY_DEPTH_CONFIG: dict[str, Any] = {
    "depth_anything": {
        "backbone_config": {
            "model_type": "dinov2",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "image_size": 56,
            "out_features": ["stage1", "stage2"],
            "reshape_hidden_states": False,
        },
        "reassemble_hidden_size": 32,
        "reassemble_factors": [2, 1],
        "neck_hidden_sizes": [8, 16],
        "fusion_hidden_size": 16,
        "head_hidden_size": 8,
        "depth_estimation_type": "relative",
        "patch_size": 14,
    },
    "lora": {"r": 8, "alpha": 8},
    "resolution": 56,
}

TINY_SEG_CONFIG: dict[str, Any] = {
    "segmentor": "mask2former",
    "mask2former": {
        "backbone_config": {
            "model_type": "swin",
            "embed_dim": 16,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_size": 7,
            "image_size": 64,
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
        },
        "num_labels": 150,
        "num_queries": 8,
        "feature_size": 32,
        "mask_feature_size": 32,
        "hidden_dim": 32,
        "encoder_feedforward_dim": 32,
        "dim_feedforward": 32,
        "encoder_layers": 1,
        "decoder_layers": 2,
        "num_attention_heads": 2,
        "common_stride": 4,
    },
    "resolution": 64,
}

# ViT-H/14 layout (patch 14, 224 px -> 257 tokens), tiny width/depth.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "clip": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "patch_size": 14,
        "image_size": 224,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 16,
    },
    "lora": {"r": 8, "alpha": 8},
}


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """peft initialises lora_B at zero (LoRA = identity); give it values so tests see an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_hed(seed: int = 0):
    from megasr.dage.hed import HedExtractor

    torch.manual_seed(seed)
    model = HedExtractor.from_config(TINY_HED_CONFIG).eval()
    return model, dict(TINY_HED_CONFIG)


def tiny_depth(seed: int = 0, lora_nonzero: bool = True):
    from megasr.dage.depth import DepthExtractor

    torch.manual_seed(seed)
    model = DepthExtractor.from_config(TINY_DEPTH_CONFIG).eval()
    with torch.no_grad():  # random heads output ~1e-7 after the final ReLU; give the map some range
        model.model.head.conv3.bias.fill_(1.0)
    if lora_nonzero:
        _randomize_lora(model, seed + 1)
    return model, dict(TINY_DEPTH_CONFIG)


def tiny_seg(seed: int = 0):
    from megasr.dage.seg import SegExtractor

    torch.manual_seed(seed)
    model = SegExtractor.from_config(TINY_SEG_CONFIG).eval()
    return model, dict(TINY_SEG_CONFIG)


def tiny_clip(seed: int = 0, lora_nonzero: bool = True):
    from megasr.dage.clip import ClipExtractor

    torch.manual_seed(seed)
    model = ClipExtractor.from_config(TINY_CLIP_CONFIG).eval()
    if lora_nonzero:
        _randomize_lora(model, seed + 1)
    return model, dict(TINY_CLIP_CONFIG)


TINY_BUILDERS = {"dage_hed": tiny_hed, "dage_depth_lora": tiny_depth, "dage_seg": tiny_seg, "dage_clip_lora": tiny_clip}

DEFAULT_FILENAMES = {
    "dage_hed": "tiny_dage_hed.safetensors",
    "dage_depth_lora": "tiny_dage_depth_lora.safetensors",
    "dage_seg": "tiny_dage_seg.safetensors",
    "dage_clip_lora": "tiny_dage_clip_lora.safetensors",
}


def write_dage_weight_files(
    folder: str, components: tuple[str, ...] | None = None, seed: int = 0, overwrite: bool = True
) -> dict[str, str]:
    """Write a valid weight file for each DAGE component into ``folder``; returns {component: path}.

    LoRA files (depth, CLIP) need base weights at load time: also written are the tiny bases,
    ``tiny_depth_anything_base.safetensors`` (transformers keys) and ``tiny_clip_vision.safetensors``
    (ComfyUI clip_vision layout, ``vision_model.*`` keys); their paths are returned under
    ``"depth_base"`` and ``"clip_vision"``.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    out: dict[str, str] = {}
    for comp in components or tuple(TINY_BUILDERS):
        model, _ = TINY_BUILDERS[comp](seed)
        path = os.path.join(folder, DEFAULT_FILENAMES[comp])
        model.save(path, provenance={"test": "tiny random", "seed": seed}, overwrite=overwrite)
        out[comp] = path
        if comp == "dage_depth_lora":
            base = os.path.join(folder, "tiny_depth_anything_base.safetensors")
            save_file({k: v.contiguous() for k, v in model.base_state().items()}, base)
            out["depth_base"] = base
        elif comp == "dage_clip_lora":
            base = os.path.join(folder, "tiny_clip_vision.safetensors")
            save_file({"vision_model." + k: v.contiguous() for k, v in model.base_state().items()}, base)
            out["clip_vision"] = base
    return out
