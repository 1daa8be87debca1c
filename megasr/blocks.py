"""The one mapping between transformer-block names of diffusers and ComfyUI SD U-Nets.

Canonical keys (used in weight files): ``down_{i}_{j}_{t}``, ``mid_0_{t}``, ``up_{i}_{j}_{t}`` =
diffusers ``{down_blocks|mid_block|up_blocks}[i].attentions[j].transformer_blocks[t]``.
ComfyUI's ``UNetModel`` names the same block ``(kind, block_id, transformer_index)`` with kind
``input`` / ``middle`` / ``output`` as set in ``transformer_options["block"]`` and ``["block_index"]``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockSpec:
    key: str  # canonical key
    diffusers_path: str  # e.g. down_blocks.0.attentions.1.transformer_blocks.0
    dim: int
    level: int  # 0 = full latent resolution


def _per_level(value: int | list | tuple, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_blocks(cfg: dict, include_up: bool = True) -> list[BlockSpec]:
    """Transformer blocks of an SD U-Net (or, with ``include_up=False``, its ControlNet) from a
    diffusers ``UNet2DConditionModel`` config dict."""
    channels = list(cfg["block_out_channels"])
    n = len(channels)
    nrb = cfg["layers_per_block"]
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    out: list[BlockSpec] = []
    for i, kind in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in kind:
            for j in range(nrb):
                for t in range(depth[i]):
                    path = f"down_blocks.{i}.attentions.{j}.transformer_blocks.{t}"
                    out.append(BlockSpec(f"down_{i}_{j}_{t}", path, channels[i], i))
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        for t in range(depth[-1]):
            out.append(BlockSpec(f"mid_0_{t}", f"mid_block.attentions.0.transformer_blocks.{t}", channels[-1], n - 1))
    if include_up:
        rev_channels = channels[::-1]
        rev_depth = depth[::-1]
        for i, kind in enumerate(cfg["up_block_types"]):
            if "CrossAttn" in kind:
                for j in range(nrb + 1):
                    for t in range(rev_depth[i]):
                        path = f"up_blocks.{i}.attentions.{j}.transformer_blocks.{t}"
                        out.append(BlockSpec(f"up_{i}_{j}_{t}", path, rev_channels[i], n - 1 - i))
    return out


def comfy_block_key(kind: str, block_id: int, transformer_index: int, num_res_blocks: int) -> str:
    """Canonical key of a ComfyUI transformer block (ComfyUI's own ``block``/``block_index``)."""
    if kind == "input":
        # input_blocks[0] is conv_in; each level has num_res_blocks blocks, then a downsampler.
        level, j = divmod(block_id - 1, num_res_blocks + 1)
        return f"down_{level}_{j}_{transformer_index}"
    if kind == "middle":
        return f"mid_0_{transformer_index}"
    if kind == "output":
        level, j = divmod(block_id, num_res_blocks + 1)
        return f"up_{level}_{j}_{transformer_index}"
    raise ValueError(f"unknown ComfyUI block kind '{kind}'")


def comfy_unet_config(cfg: dict) -> dict:
    """ComfyUI ``UNetModel`` kwargs equivalent to a diffusers SD ``UNet2DConditionModel`` config."""
    channels = list(cfg["block_out_channels"])
    n = len(channels)
    nrb = cfg["layers_per_block"]
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    heads = _per_level(heads, n)
    head_dims = {c // h for c, h in zip(channels, heads)}
    if len(head_dims) != 1:
        raise ValueError(f"ComfyUI needs one head width for all levels, got {sorted(head_dims)}")
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]][::-1]  # ascending level order
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "model_channels": channels[0],
        "num_res_blocks": [nrb] * n,
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": [depth[i] if down_attn[i] else 0 for i in range(n) for _ in range(nrb)],
        "transformer_depth_output": [depth[i] if up_attn[i] else 0 for i in range(n) for _ in range(nrb + 1)],
        "transformer_depth_middle": depth[-1] if mid == "UNetMidBlock2DCrossAttn" else -2,
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "context_dim": cfg["cross_attention_dim"],
        "num_head_channels": head_dims.pop(),
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
