"""Colour correction of a super-resolved image towards its LR reference.

None of the papers specifies it; SeeSR ships AdaIN (default) and a wavelet variant. Both work on
[B, C, H, W] tensors; the reference is resized to the target first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_MODES = ("none", "adain", "wavelet")


def _match_size(reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if reference.shape[-2:] != target.shape[-2:]:
        reference = F.interpolate(reference, size=target.shape[-2:], mode="bicubic", align_corners=False)
    return reference


def adain_color_fix(target: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give ``target`` the per-channel mean and std of ``reference`` (AdaIN)."""
    reference = _match_size(reference, target)
    t_mean = target.mean(dim=(-2, -1), keepdim=True)
    t_std = target.std(dim=(-2, -1), keepdim=True) if target[0, 0].numel() > 1 else torch.ones_like(t_mean)
    r_mean = reference.mean(dim=(-2, -1), keepdim=True)
    r_std = reference.std(dim=(-2, -1), keepdim=True) if reference[0, 0].numel() > 1 else torch.ones_like(r_mean)
    return (target - t_mean) / (t_std + eps) * r_std + r_mean


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    # 3x3 binomial kernel dilated by `radius` (a trous wavelet); replicate padding keeps size.
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16.0
    c = x.shape[1]
    k = k.expand(c, 1, 3, 3)
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    if pad_h < radius or pad_w < radius:
        # Image smaller than the dilation: fall back to the global mean (the coarsest band).
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, k, groups=c, dilation=radius)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into (high frequency, low frequency) with ``levels`` a trous blurs."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _wavelet_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(target: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """High frequencies of ``target`` plus low frequencies (colour) of ``reference``."""
    reference = _match_size(reference, target)
    high, _ = wavelet_decompose(target, levels)
    _, low = wavelet_decompose(reference, levels)
    return high + low


def color_fix(target: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply the named colour fix; the result is clamped to [0, 1]."""
    if mode == "none":
        return target
    if mode == "adain":
        out = adain_color_fix(target, reference)
    elif mode == "wavelet":
        out = wavelet_color_fix(target, reference)
    else:
        raise ValueError(f"unknown colour fix '{mode}', expected one of {COLOR_FIX_MODES}")
    return out.clamp(0.0, 1.0)
