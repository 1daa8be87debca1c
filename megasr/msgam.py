"""MS-GAM (multi-stage guidance aggregation), MegaSR Eq. 8 and 9.

Stage 1 (Eq. 8): M^c = concat(depth [1 ch], seg [3 ch]); F^c = ChannelAttn(Conv(M^c)) in
squeeze-and-excitation form; F^r = F^c * M^c.
Stage 2 (Eq. 9): SAFT(x, M) = GN(x) * (1 + gamma(M)) + beta(M), gamma/beta from a small conv net on M
resized to x; F' = SAFT_h(x, HED) + SAFT_m(x, F^r). Our decision: F' enters the block through a
zero-initialised projection P_b (h + P_b(F')), so training starts from the pretrained network.

Absent maps and strengths (our decision, docs/ARCHITECTURE.md "Strengths and absent guidance"):
an absent map is the *null map*, all zeros (then F^r = 0 too, since F^r = F^c * M^c). Training feeds
it through modality dropout, so every subset of maps is a trained state. A strength interpolates a
map's contribution relative to that null state: each SAFT branch gets the modulation
sum_i w_i * (gamma, beta)(M_i) over a few *terms* (map variants, the null among them) whose weights sum
to 1 -- e.g. HED at strength s: (1 - s) * mod(null) + s * mod(HED). SAFT is affine in (gamma, beta),
so this is exactly the interpolation of the branch's output; strength 0 is bit-identical to absent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import expand_batch, ops_or_torch, zero_

DEPTH_CHANNELS = 1
SEG_CHANNELS = 3
HED_CHANNELS = 1
FUSED_CHANNELS = DEPTH_CHANNELS + SEG_CHANNELS


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(W2 relu(W1 avgpool(x)))."""

    def __init__(self, channels: int, reduction: int = 1, operations=None) -> None:
        super().__init__()
        ops = ops_or_torch(operations)
        hidden = max(1, channels // reduction)
        self.fc1 = ops.Linear(channels, hidden)
        self.fc2 = ops.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(-2, -1))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w[:, :, None, None]


class FusionStage(nn.Module):
    """Stage 1 (Eq. 8): fuse depth and segmentation into F^r."""

    def __init__(self, se_reduction: int = 1, operations=None) -> None:
        super().__init__()
        ops = ops_or_torch(operations)
        self.conv = ops.Conv2d(FUSED_CHANNELS, FUSED_CHANNELS, kernel_size=3, padding=1)
        self.attention = ChannelAttention(FUSED_CHANNELS, se_reduction, operations)

    def forward(self, depth: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        m_c = torch.cat([depth, seg], dim=1)
        f_c = self.attention(self.conv(m_c))
        return f_c * m_c


class SaftBlock(nn.Module):
    """Spatially adaptive feature transform (Eq. 9): GN(x) * (1 + gamma(M)) + beta(M)."""

    def __init__(self, channels: int, map_channels: int, hidden: int = 64, groups: int = 32, operations=None) -> None:
        super().__init__()
        ops = ops_or_torch(operations)
        # affine=False: no weights to store or cast, so the plain torch class serves every dtype setup
        self.norm = nn.GroupNorm(min(groups, channels), channels, affine=False, eps=1e-6)
        self.shared = nn.Sequential(ops.Conv2d(map_channels, hidden, 3, padding=1), nn.SiLU())
        self.gamma = ops.Conv2d(hidden, channels, 3, padding=1)
        self.beta = ops.Conv2d(hidden, channels, 3, padding=1)

    def modulation(self, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(M), beta(M)): they depend on the map only, so inference computes them once per run."""
        a = self.shared(guide)
        return self.gamma(a), self.beta(a)

    def forward(
        self,
        x: torch.Tensor,
        guide: torch.Tensor | None = None,
        modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x`` [B, C, H, W]; ``guide`` [B, Cm, H, W] at x's size (see ``megasr.images.resize_bchw``), or its ``modulation``."""
        gamma, beta = modulation if modulation is not None else self.modulation(guide.to(x.dtype))
        return self.norm(x) * (1 + gamma) + beta


#: One SAFT branch's input: (weight, map at the block's size or None = the null map), weights sum to 1.
MapTerms = tuple[tuple[float, "torch.Tensor | None"], ...]
NULL_TERMS: MapTerms = ((1.0, None),)


def blended_modulation(
    saft: SaftBlock, terms: MapTerms, like: torch.Tensor, map_channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i w_i * (gamma, beta)(M_i): the branch's modulation for weighted map terms.

    ``like``: the block features [B, C, h, w] (size, dtype, device of the null map). A single term of
    weight 1 is the plain modulation of that map (no arithmetic), so a trained state is reproduced exactly.
    Computed at the maps' own batch (the null map: batch 1, the same for every sample); the caller broadcasts
    it to the features' batch (cond and uncond share one LR image's maps: one modulation, not two).
    """
    gamma = beta = None
    for w, m in terms:
        if w == 0.0:
            continue
        if m is None:
            _, _, h, wd = like.shape
            m = like.new_zeros(1, map_channels, h, wd)
        g, bt = saft.modulation(m.to(like.dtype))
        if w != 1.0:
            g, bt = w * g, w * bt
        gamma, beta = (g, bt) if gamma is None else (gamma + g, beta + bt)
    if gamma is None:  # every weight 0 cannot happen (they sum to 1); be explicit rather than wrong
        raise ValueError("MS-GAM: map terms with zero total weight")
    return gamma, beta


def _to_batch(mod: tuple[torch.Tensor, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) of the maps' batch for features of ``batch``: batch 1 broadcasts as it is; another batch
    that divides it is tiled like the maps would have been (cond/uncond chunks are stacked)."""
    gamma, beta = (t if t.shape[0] == 1 else expand_batch(t, batch) for t in mod)
    return gamma, beta


class MsgamBlock(nn.Module):
    """The per-block part of MS-GAM: SAFT_h, SAFT_m and the zero-initialised projection P_b."""

    def __init__(self, channels: int, hidden: int = 64, groups: int = 32, operations=None) -> None:
        super().__init__()
        self.saft_h = SaftBlock(channels, HED_CHANNELS, hidden, groups, operations)
        self.saft_m = SaftBlock(channels, FUSED_CHANNELS, hidden, groups, operations)
        self.proj = ops_or_torch(operations).Linear(channels, channels)
        zero_(self.proj)

    def forward(
        self,
        n: torch.Tensor,
        hw: tuple[int, int],
        hed_terms: MapTerms = NULL_TERMS,
        fused_terms: MapTerms = NULL_TERMS,
        memo=None,
    ) -> torch.Tensor:
        """Return P_b(F') as tokens [B, N, C] to add to the block.

        ``n``: hidden tokens [B, N, C] with N = h * w; ``hed_terms`` / ``fused_terms``: weighted HED maps
        [B, 1, h, w] and stage-1 outputs F^r [B, 4, h, w] (None = null map); ``memo(key, fn)`` may memoise
        the map-only modulations across sampling steps.
        """
        b, _, c = n.shape
        x = n.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        memo = memo or (lambda key, fn: fn())
        key = (id(self), hw, b, x.dtype)
        mod_h = memo(key + ("h",), lambda: _to_batch(blended_modulation(self.saft_h, hed_terms, x, HED_CHANNELS), b))
        mod_m = memo(
            key + ("m",), lambda: _to_batch(blended_modulation(self.saft_m, fused_terms, x, FUSED_CHANNELS), b)
        )
        f = self.saft_h(x, modulation=mod_h) + self.saft_m(x, modulation=mod_m)
        return self.proj(f.flatten(2).transpose(1, 2))
