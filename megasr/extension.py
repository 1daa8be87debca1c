"""What MegaSR adds to one transformer block, and the per-forward guidance context.

Both adapters (diffusers and ComfyUI) call :class:`MegaSRBlockExtension` at the same point: on the
normed hidden tokens ``n`` that enter the block's text cross-attention, adding the returned delta to
that attention's output (before the FFN). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .cism import CismBlock
from .images import resize_bchw
from .msgam import MsgamBlock


def token_grid(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """Spatial size of a block with ``n_tokens`` tokens for a latent of ``latent_hw``.

    SD downsamplers are stride-2 convs with padding 1, so each level has ceil(h / 2) x ceil(w / 2).
    """
    h, w = latent_hw
    for _ in range(8):
        if h * w == n_tokens:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"{n_tokens} tokens do not match any level of a {latent_hw} latent")


def expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile ``x`` along the batch to ``batch`` (cond/uncond chunks are stacked in ComfyUI and diffusers)."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0] != 0:
        raise ValueError(f"guidance batch {x.shape[0]} does not divide the model batch {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))


@dataclass
class GuidanceContext:
    """Per-forward inputs shared by every block: image tokens, maps, strengths.

    ``image_tokens``: connector output [B, T, context_dim]; ``hed``: [B, 1, H, W]; ``fused``: stage-1
    output F^r [B, 4, H, W]; ``level_strengths``: CISM² strength per U-Net level (0 = full resolution),
    multiplied by ``cism_strength``.
    """

    latent_hw: tuple[int, int]
    image_tokens: torch.Tensor | None = None
    hed: torch.Tensor | None = None
    fused: torch.Tensor | None = None
    cism_strength: float = 1.0
    level_strengths: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    msgam_strength: float = 1.0
    hed_strength: float = 1.0
    step_invariant: bool = False  # inference: the context is re-used for every sampling step
    _cache: dict = field(default_factory=dict, repr=False)

    def memo(self, key, fn):
        """Memoise a map-only value across steps (never while training: gradients must flow)."""
        if not self.step_invariant or torch.is_grad_enabled():
            return fn()
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def level_strength(self, level: int) -> float:
        s = self.level_strengths
        return self.cism_strength * (s[min(level, len(s) - 1)] if s else 1.0)

    def map_at(self, name: str, hw: tuple[int, int], batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The named map resized to ``hw`` and tiled to ``batch``, computed once per forward.

        The resize runs in float32 (antialiased resizes exist for no half type on CPU), cast once to ``dtype``.
        """
        m = getattr(self, name)
        if m is None:
            return None
        key = (name, hw, batch, dtype)
        if key not in self._cache:
            self._cache[key] = expand_batch(resize_bchw(m.float(), hw, "bilinear"), batch).to(dtype)
        return self._cache[key]

    def tokens_for(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.image_tokens is None:
            return None
        key = ("tokens", batch, dtype)
        if key not in self._cache:
            self._cache[key] = expand_batch(self.image_tokens, batch).to(dtype)
        return self._cache[key]


class MegaSRBlockExtension(nn.Module):
    """CISM² + MS-GAM for one transformer block of width ``dim`` at U-Net ``level``."""

    def __init__(self, dim: int, level: int, msgam_hidden: int = 64, groups: int = 32, operations=None) -> None:
        super().__init__()
        self.level = level
        self.cism = CismBlock(dim, operations)
        self.msgam = MsgamBlock(dim, msgam_hidden, groups, operations)

    def forward(
        self,
        n: torch.Tensor,
        ctx: GuidanceContext,
        cross_attention: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor | None:
        """Delta to add to the text cross-attention output of this block (None if nothing applies)."""
        delta = None
        b = n.shape[0]
        tokens = ctx.tokens_for(b, n.dtype)
        strength = ctx.level_strength(self.level)
        if tokens is not None and strength != 0.0:
            delta = self.cism(n, tokens, cross_attention, strength)
        if ctx.msgam_strength != 0.0 and (ctx.hed is not None or ctx.fused is not None):
            hw = token_grid(ctx.latent_hw, n.shape[1])
            m = self.msgam(
                n,
                hw,
                ctx.map_at("hed", hw, b, n.dtype),
                ctx.map_at("fused", hw, b, n.dtype),
                ctx.hed_strength,
                memo=ctx.memo,
            )
            if m is not None:
                m = ctx.msgam_strength * m
                delta = m if delta is None else delta + m
        return delta
