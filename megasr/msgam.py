"""MS-GAM (multi-stage guidance aggregation), MegaSR Eq. 8 and 9.

Stage 1 (Eq. 8): M^c = concat(depth [1 ch], seg [3 ch]); F^c = ChannelAttn(Conv(M^c)) in
squeeze-and-excitation form; F^r = F^c * M^c.
Stage 2 (Eq. 9): SAFT(x, M) = GN(x) * (1 + gamma(M)) + beta(M), gamma/beta from a small conv net on M
resized to x; F' = SAFT_h(x, HED) + SAFT_m(x, F^r). Our decision: F' enters the block through a
zero-initialised projection P_b (h + P_b(F')), so training starts from the pretrained network.
A missing map contributes nothing: no HED -> the SAFT_h term is dropped; no depth or no segmentation ->
its channels of M^c are zero; neither -> the SAFT_m term is dropped. Per-map strengths scale the HED
term and the depth / segmentation channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ops_or_torch, zero_

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
        hed: torch.Tensor | None,
        fused: torch.Tensor | None,
        hed_strength: float = 1.0,
        memo=None,
    ) -> torch.Tensor | None:
        """Return P_b(F') as tokens [B, N, C] to add to the block, or None when no map is given.

        ``n``: hidden tokens [B, N, C] with N = h * w; ``hed``/``fused``: maps at (h, w);
        ``memo(key, fn)`` may memoise the map-only modulations across sampling steps.
        """
        if hed is None and fused is None:
            return None
        b, _, c = n.shape
        x = n.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        memo = memo or (lambda key, fn: fn())
        f = None
        if hed is not None:
            mod = memo((id(self), "h", hw, b, x.dtype), lambda: self.saft_h.modulation(hed.to(x.dtype)))
            f = hed_strength * self.saft_h(x, modulation=mod)
        if fused is not None:
            mod = memo((id(self), "m", hw, b, x.dtype), lambda: self.saft_m.modulation(fused.to(x.dtype)))
            fm = self.saft_m(x, modulation=mod)
            f = fm if f is None else f + fm
        return self.proj(f.flatten(2).transpose(1, 2))
