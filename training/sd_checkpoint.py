"""What a single-file SD-2 checkpoint (the file a ComfyUI user has in ``models/checkpoints``) does not say itself.

- The U-Net layout: read from the LDM keys (``model.diffusion_model.*``) -- channels per level, res blocks per
  level, which levels have transformers (and how deep), linear or conv ``proj_in``, the middle block, the
  cross-attention width. Attention heads are not visible in weights: SD-2 uses 64 channels per head, and so do
  we (``megasr.unet_config`` overrides any of it).
- The tokenizer: a checkpoint has none. SD-2's is OpenAI CLIP's BPE tokenizer padded with ``!`` (id 0), which
  is what ComfyUI's SD-2 text encoder uses too; ComfyUI ships its files (``comfy/sd1_tokenizer``), so we take
  them from the ComfyUI next to the models folder, the one this pack sits in, or an importable ``comfy``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["SD2_HEAD_CHANNELS", "comfy_tokenizer_dirs", "load_clip_tokenizer", "unet_config_from_ldm"]

SD2_HEAD_CHANNELS = 64
_PREFIX = "model.diffusion_model."


def _block_ids(keys: Iterable[str], group: str) -> list[int]:
    pat = re.compile(rf"^{group}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _depth(keys: set[str], block: str) -> int:
    pat = re.compile(rf"^{re.escape(block)}\.transformer_blocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def unet_config_from_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of the LDM U-Net in ``state`` (an SD checkpoint).

    Raises ``ValueError`` when the file holds no SD U-Net.
    """
    sd = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ValueError("no Stable Diffusion U-Net in this file (no model.diffusion_model.input_blocks.0.0.weight)")
    keys = set(sd)
    conv_in = sd["input_blocks.0.0.weight"]
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    # input blocks: level by level, each res block (+ transformer), then a downsample (".0.op") except the last
    levels: list[dict[str, Any]] = []
    current: dict[str, Any] = {"res": 0, "depth": 0, "channels": model_channels}
    for i in _block_ids(keys, "input_blocks")[1:]:
        if f"input_blocks.{i}.0.op.weight" in keys:
            levels.append(current)
            current = {"res": 0, "depth": 0, "channels": current["channels"]}
            continue
        current["res"] += 1
        current["channels"] = int(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
        current["depth"] = max(current["depth"], _depth(keys, f"input_blocks.{i}.1"))
    levels.append(current)
    res_counts = {lv["res"] for lv in levels}
    if len(res_counts) != 1:
        raise ValueError(f"levels with different numbers of res blocks ({sorted(res_counts)}) are not supported")
    attn_keys = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise ValueError("the U-Net has no cross-attention (not an SD-2 text-conditioned U-Net)")
    context = int(sd[attn_keys[0]].shape[1])
    proj = [k for k in keys if k.endswith(".proj_in.weight")]
    linear = bool(proj) and sd[proj[0]].ndim == 2
    mid_depth = _depth(keys, "middle_block.1")
    has_mid = any(k.startswith("middle_block.") for k in keys)
    down = ["CrossAttnDownBlock2D" if lv["depth"] else "DownBlock2D" for lv in levels]
    up = ["CrossAttnUpBlock2D" if lv["depth"] else "UpBlock2D" for lv in reversed(levels)]
    channels = [lv["channels"] for lv in levels]
    depths = [max(1, lv["depth"]) for lv in levels]
    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": in_channels,
        "out_channels": int(sd["out.2.weight"].shape[0]),
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": ("UNetMidBlock2DCrossAttn" if mid_depth else "UNetMidBlock2D") if has_mid else None,
        "block_out_channels": channels,
        "layers_per_block": levels[0]["res"],
        "cross_attention_dim": context,
        "attention_head_dim": [c // SD2_HEAD_CHANNELS for c in channels],
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths if any(d > 1 for d in depths) else 1,
        "upcast_attention": False,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    return config


def comfy_tokenizer_dirs(models_dir: str | Path | None = None) -> list[Path]:
    """Where ComfyUI's CLIP tokenizer files may be, most specific first."""
    roots: list[Path] = []
    if models_dir:
        roots.append(Path(models_dir).expanduser().resolve().parent)
    here = Path(__file__).absolute()  # not resolved: the pack may be linked into ComfyUI/custom_nodes
    roots.append(here.parents[3] if len(here.parents) > 3 else here.parent)
    repo = Path(__file__).resolve().parents[1]
    roots.append(repo / ".comfyui" / "ComfyUI")  # what scripts/setup.sh installs beside the pack
    spec = importlib.util.find_spec("comfy") if importlib.util.find_spec is not None else None
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p).parent for p in spec.submodule_search_locations)
    out, seen = [], set()
    for root in roots:
        d = root / "comfy" / "sd1_tokenizer"
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def load_clip_tokenizer(folder: str | Path) -> Any:
    """The SD-2 tokenizer from a CLIP tokenizer folder (``vocab.json`` + ``merges.txt``), padded with ``!``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), pad_token="!")
