"""CISM² (customized image-semantics mining), MegaSR Eq. 7.

Image tokens ``I`` come from CLIP ViT-H/14 penultimate hidden states (257 x 1280) through a trainable
Connector to the SD-2 context width (1024). In every transformer block the image path re-uses that
block's frozen cross-attention (the paper's "frozen CA initialised from the text branch"; in the
ControlNet, whose own cross-attention is trained, the frozen U-Net's of the same block) and adds

    s_b * g_b * Z_b(CA_b(n, I))

to the text cross-attention output, with ``Z_b`` a zero-initialised Linear and ``g_b`` a learnable gate
(the later version's "learnable gated weight adaptation"). ``Z_b = 0`` at init, so the model starts as
the pretrained one; ``g_b`` starts at 1 so that ``Z_b`` receives gradient from the first step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layers import cast_like, ops_or_torch, zero_

CONNECTOR_KINDS = ("linear", "mlp")


class Connector(nn.Module):
    """Maps CLIP vision tokens [B, T, clip_dim] to the U-Net context width [B, T, context_dim]."""

    def __init__(
        self,
        clip_dim: int = 1280,
        context_dim: int = 1024,
        kind: str = "linear",
        hidden: int = 1024,
        operations=None,
    ) -> None:
        super().__init__()
        ops = ops_or_torch(operations)
        if kind not in CONNECTOR_KINDS:
            raise ValueError(f"connector kind must be one of {CONNECTOR_KINDS}, got '{kind}'")
        self.kind = kind
        self.norm = ops.LayerNorm(clip_dim)
        if kind == "linear":
            self.net = ops.Linear(clip_dim, context_dim)
        else:
            self.net = nn.Sequential(ops.Linear(clip_dim, hidden), nn.GELU(), ops.Linear(hidden, context_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(tokens))


class CismBlock(nn.Module):
    """The per-block part of CISM²: zero-initialised projection Z_b and gate g_b."""

    def __init__(self, dim: int, operations=None) -> None:
        super().__init__()
        self.proj = ops_or_torch(operations).Linear(dim, dim)
        zero_(self.proj)
        self.gate = nn.Parameter(torch.ones(()))

    def forward(
        self,
        n: torch.Tensor,
        image_tokens: torch.Tensor,
        cross_attention: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Return the image-path term to add to the text cross-attention output.

        ``n``: normed hidden tokens [B, N, C] (the query input of the block's cross-attention);
        ``cross_attention(n, context)``: the block's frozen cross-attention.
        """
        return self.output(cross_attention(n, image_tokens), strength)

    def output(self, image_out: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``s_b * g_b * Z_b(image_out)`` for the cross-attention output ``image_out`` = CA_b(n, I)."""
        return (strength * cast_like(self.gate, image_out)) * self.proj(image_out)


class ImageSemantics:
    """CLIP penultimate tokens of the LR image(s), [B, T, clip_dim]: the value CISM² consumes.

    With ``image`` ([B, H, W, 3]) and ``encoder`` (image -> tokens) it can also give the semantics of a
    region (tiled sampling: each tile is described by what it shows, not by the whole picture).
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        source: str = "",
        image: torch.Tensor | None = None,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.tokens = tokens
        self.source = source
        self.image = image
        self.encoder = encoder

    def for_region(self, crop: tuple[float, float, float, float]) -> ImageSemantics:
        """Semantics of the region ``crop`` (fractions); the whole image's when it cannot re-encode."""
        if self.encoder is None or self.image is None:
            return self
        from .tiling import crop_fraction

        region = crop_fraction(self.image.movedim(-1, 1), crop).movedim(1, -1)
        return ImageSemantics(self.encoder(region), f"{self.source} region {crop}")

    def __deepcopy__(self, memo: dict) -> ImageSemantics:
        return self  # immutable once made; model options are deep-copied on every MODEL clone

    def __repr__(self) -> str:
        return f"ImageSemantics(tokens={list(self.tokens.shape)}, source={self.source!r})"
