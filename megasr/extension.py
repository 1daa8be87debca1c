"""What MegaSR adds to one transformer block, and the per-forward guidance context.

Both adapters (diffusers and ComfyUI) call :class:`MegaSRBlockExtension` at the same point: on the
normed hidden tokens ``n`` that enter the block's text cross-attention, adding the returned delta to
that attention's output (before the FFN). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .cism import CismBlock
from .images import resize_bchw
from .layers import expand_batch
from .msgam import NULL_TERMS, MapTerms, MsgamBlock


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


@dataclass
class GuidanceContext:
    """Per-forward inputs shared by every block: image tokens, weighted map terms, strengths.

    ``image_tokens``: connector output [B, T, context_dim]; ``image_keep``: per-sample weight [B] of the CISM²
    term (training's modality dropout: 0 = semantics absent for that sample; None = all kept);
    ``hed_terms`` / ``fused_terms``: (weight, map [B, C, H, W] or None = null map) per SAFT branch, see
    :mod:`megasr.msgam`; ``level_strengths``: CISM² strength per U-Net level (0 = full resolution),
    multiplied by ``cism_strength``; ``image_attention``: block key -> the frozen cross-attention that the
    ControlNet's image path uses (the U-Net's, see :mod:`megasr.adapter_diffusers`);
    ``representation_tokens``: RAM/DAPE representation tokens [B, N, 512] for SeeSR's branch
    (:mod:`megasr.seesr_branch`), read by the U-Net's and the ControlNet's blocks alike.
    """

    latent_hw: tuple[int, int]
    image_tokens: torch.Tensor | None = None
    image_keep: torch.Tensor | None = None
    hed_terms: MapTerms = NULL_TERMS
    fused_terms: MapTerms = NULL_TERMS
    cism_strength: float = 1.0
    level_strengths: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    image_attention: Mapping[str, Callable] | None = field(default=None, repr=False)
    step_invariant: bool = False  # inference: the context is re-used for every sampling step
    representation_tokens: torch.Tensor | None = None
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

    def terms_at(self, name: str, hw: tuple[int, int], batch: int | None, dtype: torch.dtype) -> MapTerms:
        """The named branch's terms with maps resized to ``hw`` and tiled to ``batch``, once per forward.

        ``batch`` None: the maps' own batch (one LR image's maps serve cond and uncond: MS-GAM computes their
        modulations once and broadcasts them, :class:`~megasr.msgam.MsgamBlock`).
        The resize runs in float32 (antialiased resizes exist for no half type on CPU), cast once to ``dtype``.
        """
        key = (name, hw, batch, dtype)
        if key not in self._cache:

            def sized(m: torch.Tensor) -> torch.Tensor:
                r = resize_bchw(m.float(), hw, "bilinear")
                return (r if batch is None else expand_batch(r, batch)).to(dtype)

            self._cache[key] = tuple((w, None if m is None else sized(m)) for w, m in getattr(self, name))
        return self._cache[key]

    def tokens_for(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.image_tokens is None:
            return None
        key = ("tokens", batch, dtype)
        if key not in self._cache:
            self._cache[key] = expand_batch(self.image_tokens, batch).to(dtype)
        return self._cache[key]

    def representation_for(self, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The RAM tokens tiled to the model batch (cond and uncond get the same tokens, as in SeeSR)."""
        if self.representation_tokens is None:
            return None
        key = ("representation", batch, dtype, device)
        if key not in self._cache:
            tokens = self.representation_tokens.to(device=device, dtype=dtype)
            self._cache[key] = expand_batch(tokens, batch)
        return self._cache[key]

    def keep_for(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.image_keep is None else expand_batch(self.image_keep, batch).to(dtype)


#: Memoise the image tokens' K/V projections of every frozen cross-attention over a sampling run (inference
#: only, see :func:`image_attention`); tests switch it off to get the uncached reference.
CACHE_IMAGE_KV = True


def image_attention(
    n: torch.Tensor, ctx: GuidanceContext, cross_attention: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """CA_b(n, I): the block's frozen cross-attention of the hidden tokens ``n`` [B, N, C] over the image tokens.

    A ``cross_attention`` that can be split (``project(tokens) -> (k, v)`` and ``attend(n, k, v)``, the ComfyUI
    adapter's) projects the image tokens at their own batch (one LR image = one projection shared by cond and
    uncond; tiles: one per tile) and broadcasts K/V to the model batch. The tokens and the frozen weights are
    constant over a sampling run, so with a step-invariant context (inference, no grad) K/V are computed at the
    first step and re-used: the cache lives in the context (one per run, per tile stack and per branch) and is
    keyed by the attention module (U-Net and ControlNet blocks of one key share the U-Net's ``attn2``, hence its
    K/V), the dtype and the device. Otherwise (training, the diffusers adapter) it is the plain call.
    """
    b = n.shape[0]
    project = getattr(cross_attention, "project", None)
    if project is None:
        return cross_attention(n, ctx.tokens_for(b, n.dtype))
    key = ("image_kv", cross_attention.key, n.dtype, n.device)

    def kv() -> tuple[torch.Tensor, torch.Tensor]:
        return project(ctx.image_tokens.to(device=n.device, dtype=n.dtype))

    k, v = ctx.memo(key, kv) if CACHE_IMAGE_KV else kv()
    return cross_attention.attend(n, expand_batch(k, b), expand_batch(v, b))


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
    ) -> torch.Tensor:
        """Delta to add to the text cross-attention output of this block.

        MS-GAM always contributes (absent maps are null maps, a trained state) unless its projection is exactly
        zero (:meth:`msgam_adds_nothing`); CISM² only with image tokens and a non-zero strength (its absent state is
        "no term", which strength 0 reproduces exactly). None: nothing to add.
        """
        b = n.shape[0]
        hw = token_grid(ctx.latent_hw, n.shape[1])
        delta = None
        if not self.msgam_adds_nothing(ctx):
            delta = self.msgam(
                n,
                hw,
                ctx.terms_at("hed_terms", hw, None, n.dtype),
                ctx.terms_at("fused_terms", hw, None, n.dtype),
                memo=ctx.memo,
            )
        strength = ctx.level_strength(self.level)
        if ctx.image_tokens is not None and strength != 0.0:
            image = self.cism.output(image_attention(n, ctx, cross_attention), strength)
            keep = ctx.keep_for(b, n.dtype)
            if keep is not None:
                image = image * keep[:, None, None]
            delta = image if delta is None else delta + image
        return delta

    def msgam_adds_nothing(self, ctx: GuidanceContext) -> bool:
        """MS-GAM's projection P_b is exactly zero (its init, as in a converted SeeSR file): its term is exactly zero,
        so inference skips it (SAFT norms and modulations, the projection). Never while training (P_b's gradient
        needs the term's input) nor with a weight patch applied at cast time (a LoRA on P_b); checked once a run."""
        if not ctx.step_invariant or torch.is_grad_enabled():
            return False
        proj = self.msgam.proj
        if getattr(proj, "weight_function", None) or getattr(proj, "bias_function", None):
            return False
        return ctx.memo(("msgam_zero", id(self)), lambda: _all_zero(proj.weight) and _all_zero(proj.bias))


def _all_zero(t: torch.Tensor | None) -> bool:
    """Every element +0.0, read from the bits (so any dtype, fp8 included, without arithmetic)."""
    if t is None:
        return True
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    if bits is None or not t.is_contiguous() or t.is_meta:
        return False
    return not bool(t.detach().view(bits).any())
