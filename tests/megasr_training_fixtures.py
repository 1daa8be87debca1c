"""Tiny, structurally real SD-2 base folders and DAGE files for the MegaSR training tests (seeded, offline).

``write_tiny_sd2_base(folder)`` writes a diffusers-layout base: ``unet/`` (the very U-Net of the tiny ComfyUI
checkpoint, ``tiny_sd2_unet_diffusers()``), ``vae/`` (a small x8 ``AutoencoderKL``), ``text_encoder/`` (a
one-layer ``CLIPTextModel`` with 1024-d tokens, the U-Net's cross-attention width) and ``tokenizer/`` (a real
``CLIPTokenizer`` built from a small vocabulary and merges written here).
``write_guidance_files(folder)`` writes the tiny DAGE HED / depth / segmentation files of
``tests/dage_fixtures.py`` and a CLIP LoRA on a 1024-d ViT-H/14-layout vision tower (1024 = the ViT-L CLIP vision
of ``tests/megasr_fixtures.py``, so a model trained with it runs in the ComfyUI workflow).
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any

import torch

TEXT_WIDTH = 1024
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TINY_CLIP_1024: dict[str, Any] = {
    "clip": {
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 112,  # 65 tokens (ComfyUI's ViT-L gives 257: the connector is per token)
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 16,
    },
    "lora": {"r": 8, "alpha": 8},
}
WORDS = ("clean", "high", "resolution", "cat", "dog", "tree", "sky")


def tiny_tokenizer():  # -> transformers.CLIPTokenizer
    """A real CLIP BPE tokenizer over letters, digits, punctuation and a few whole words."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.-!?'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in WORDS:  # merge each word left to right: c l -> cl, cl e -> cle, ..., clea n</w> -> clean</w>
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def write_tiny_sd2_base(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD-2 base (diffusers folders) into ``folder``; returns it."""
    from diffusers import AutoencoderKL
    from harness.checkpoints import tiny_sd2_unet_diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tiny_sd2_unet_diffusers(seed).save_pretrained(folder / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(folder / "vae")
        tok = tiny_tokenizer()
        text_cfg = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=16,
            max_position_embeddings=77,
            projection_dim=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        CLIPTextModel(text_cfg).save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    return folder


def write_guidance_files(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """DAGE files: ``dage_hed``, ``dage_depth_lora`` (+ ``depth_base``), ``dage_seg``, ``dage_clip_lora``
    (+ ``clip_vision``: its 1024-d base in ComfyUI's clip_vision layout)."""
    from dage_fixtures import _randomize_lora, write_dage_weight_files
    from safetensors.torch import save_file

    from megasr.dage.clip import ClipExtractor

    folder = Path(folder)
    out = write_dage_weight_files(str(folder), ("dage_hed", "dage_depth_lora", "dage_seg"), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        clip = ClipExtractor.from_config(TINY_CLIP_1024).eval()
    _randomize_lora(clip, seed + 8)
    path = folder / "tiny_dage_clip1024_lora.safetensors"
    clip.save(str(path), provenance={"test": "tiny random"}, overwrite=True)
    base = folder / "tiny_clip1024_vision.safetensors"
    save_file({"vision_model." + k: v.contiguous() for k, v in clip.base_state().items()}, str(base))
    out["dage_clip_lora"] = str(path)
    out["clip_vision"] = str(base)
    return out


def write_hr_folder(folder: str | Path, count: int = 3, seed: int = 0) -> Path:
    """Small generated HR photos (smooth colour fields with edges), one with a tags file beside it."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = 72 + 8 * i, 80
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], axis=-1) * 0.4 + 0.5
        img[h // 3 : h // 2, w // 4 : w // 2] = rng.random(3)
        img += rng.normal(0, 0.02, img.shape)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("cat, tree, sky\n", encoding="utf-8")
    return folder


def megasr_config(base: Path, guidance: dict[str, str], hr: Path, out: Path, **train: Any) -> Path:
    """A tiny run config (JSON) on the tiny bundled settings; ``train`` overrides the train section."""
    cfg = {
        "base": str(Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"),
        "output_dir": str(out),
        "data": {"hr_dirs": [str(hr)], "crop_size": 32, "num_workers": 0},
        "train": {
            "batch_size": 2,
            "max_steps": 3,
            "lr": 1e-4,
            "mixed_precision": "no",
            "checkpoint_every": 5,
            "log_every": 1,
            **train,
        },
        "megasr": {
            "base": str(base),
            "model": {"msgam_hidden": 16},
            "dage_hed": guidance["dage_hed"],
            "dage_depth": guidance["dage_depth_lora"],
            "dage_depth_base": guidance["depth_base"],
            "dage_seg": guidance["dage_seg"],
            "dage_clip": guidance["dage_clip_lora"],
            "dage_clip_base": guidance["clip_vision"],
            "dage_resolution": 64,
            "prompt": "clean, high resolution",
        },
    }
    cfg_path = out.parent / f"{out.name}_config.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    os.makedirs(out.parent, exist_ok=True)
    return cfg_path
