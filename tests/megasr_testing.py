"""Tiny, structurally real configs for the megasr/ unit tests (no ComfyUI needed to import this)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = ROOT / ".comfyui" / "ComfyUI"

# SD-2 layout (linear projections, cross-attention, mid block), shrunk: 2 levels of 32/64 channels.
TINY_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 48,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "sample_size": 8,
}


def tiny_megasr_config(unet: dict | None = None):
    from megasr.model import MegaSRConfig

    return MegaSRConfig(
        unet=dict(unet or TINY_UNET),
        clip_dim=40,
        connector="linear",
        msgam_hidden=8,
        conditioning_embedding_out_channels=(8, 8, 16, 16),
    )


def seeded(seed: int):
    """A context in which module initialisation is seeded without touching the global RNG outside."""
    fork = torch.random.fork_rng()

    class _Ctx:
        def __enter__(self):
            fork.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return fork.__exit__(*exc)

    return _Ctx()


def perturb_zero_inits(model, seed: int = 1, scale: float = 0.05) -> None:
    """Give every zero-initialised part (projections, zero convs, gates stay) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def import_comfy():
    """Make the ComfyUI tree importable (installed by scripts/setup.sh)."""
    if not (COMFY_DIR / "comfy").is_dir():
        raise RuntimeError(f"ComfyUI is not installed at {COMFY_DIR}; run scripts/setup.sh")
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args

    args.cpu = True  # no CUDA here; must be set before comfy.model_management is imported
    import comfy.model_patcher
    import comfy.ops
    import comfy.utils  # noqa: F401

    return sys.modules["comfy"]


def inputs(batch: int = 2, hw: tuple[int, int] = (8, 12), seed: int = 0, cfg: dict | None = None):
    cfg = cfg or TINY_UNET
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    return {
        "x": torch.randn(batch, 4, h, w, generator=g),
        "t": torch.tensor([500.0] * batch),
        "text": torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g),
        "hint": torch.rand(batch, 3, h * 8, w * 8, generator=g),
        "clip": torch.randn(batch, 9, 40, generator=g),
        "hed": torch.rand(batch, 1, h * 8, w * 8, generator=g),
        "depth": torch.rand(batch, 1, h * 8, w * 8, generator=g),
        "seg": torch.rand(batch, 3, h * 8, w * 8, generator=g),
    }
