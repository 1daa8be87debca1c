"""PSNR and SSIM on the Y channel, the way the paper's toolbox (IQA-PyTorch, ``psnr``/``ssim`` with
``test_y_channel=True, color_space='ycbcr'``) computes them; written here from the definitions.

Protocol (stated in every report the eval command writes, see ``PROTOCOL``):

- Input: RGB in 0..1, [B, 3, H, W]. Files are 8-bit, so a value is k/255.
- Y channel: ITU-R BT.601 "studio swing" luma of YCbCr, as MATLAB's ``rgb2ycbcr``:
  ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in 0..1, so Y is in 16..235 (not rounded).
- PSNR: ``10 log10(255^2 / (MSE + 1e-8))`` over the Y plane, per image (the toolbox adds that 1e-8, so two
  equal images give 128.13 dB, not infinity).
- SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5, normalised to sum 1), constants
  ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, local statistics over "valid" window positions only
  (no padding: the map is (H-10) x (W-10)), contrast-structure term clipped at 0 (as the toolbox does),
  mean of the map; no downsampling (the toolbox's default), computed in float64.
- Border crop: ``crop_border`` pixels are removed from every side of both images *before* the Y conversion
  (the toolbox's default, and ours, is 0; x4 SR papers that crop use 4).
- Size mismatch: the two images must have the same size. ``size_rule="crop"`` allows a difference of less than
  ``max_mismatch`` pixels per side (an SR output of 4 x LR against an HR that was not a multiple of 4) and
  then compares the top-left common region; anything else is an error naming both sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import MegaSRInputError

#: BT.601 studio-swing luma weights (for R, G, B in 0..1, giving Y in 16..235) and offset.
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
DATA_RANGE = 255.0
PSNR_EPS = 1e-8
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SIZE_RULES = ("error", "crop")

PROTOCOL = (
    "PSNR and SSIM on the Y channel of YCbCr (ITU-R BT.601, Y = 16 + 65.481 R + 128.553 G + 24.966 B, R,G,B in "
    "0..1, not rounded), images read as 8-bit; PSNR = 10 log10(255^2 / (MSE + 1e-8)); SSIM with an 11x11 "
    "Gaussian window (sigma 1.5), valid positions only, C1=(0.01*255)^2, C2=(0.03*255)^2, no downsampling; "
    "border crop {crop} px per side; size rule '{size_rule}'."
)


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in 0..1 -> [B, 1, H, W] BT.601 luma in 16..235 (float64)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"rgb_to_y needs [B, 3, H, W], got {tuple(image.shape)}")
    w = torch.tensor(Y_WEIGHTS, dtype=torch.float64, device=image.device).view(1, 3, 1, 1)
    return (image.to(torch.float64) * w).sum(dim=1, keepdim=True) + Y_OFFSET


def crop_border(image: torch.Tensor, border: int) -> torch.Tensor:
    """Remove ``border`` pixels from each side of the last two dimensions (0: unchanged)."""
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return image
    h, w = image.shape[-2:]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"crop_border {border} leaves nothing of a {w}x{h} image")
    return image[..., border : h - border, border : w - border]


def match_sizes(
    image: torch.Tensor,
    reference: torch.Tensor,
    size_rule: str = "error",
    max_mismatch: int = 4,
    where: str = "metrics",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the size-mismatch rule (module docstring) to two [B, C, H, W] images."""
    if size_rule not in SIZE_RULES:
        raise ValueError(f"size_rule must be one of {SIZE_RULES}, got {size_rule!r}")
    (h1, w1), (h2, w2) = image.shape[-2:], reference.shape[-2:]
    if (h1, w1) == (h2, w2):
        return image, reference
    sizes = f"image {w1}x{h1}, reference {w2}x{h2}"
    if size_rule == "error":
        raise MegaSRInputError(where, "reference", f"sizes differ ({sizes}); full-reference metrics need equal sizes")
    if abs(h1 - h2) >= max_mismatch or abs(w1 - w2) >= max_mismatch:
        raise MegaSRInputError(
            where, "reference", f"sizes differ by {max_mismatch} px or more ({sizes}); is it the right reference?"
        )
    h, w = min(h1, h2), min(w1, w2)
    return image[..., :h, :w], reference[..., :h, :w]


def _prepare(image: torch.Tensor, reference: torch.Tensor, border: int, size_rule: str, max_mismatch: int):
    if image.shape[:2] != reference.shape[:2]:
        raise ValueError(f"batch/channels differ: {tuple(image.shape)} vs {tuple(reference.shape)}")
    image, reference = match_sizes(image, reference, size_rule, max_mismatch)
    return rgb_to_y(crop_border(image, border)), rgb_to_y(crop_border(reference, border))


def psnr_y(
    image: torch.Tensor,
    reference: torch.Tensor,
    crop: int = 0,
    size_rule: str = "error",
    max_mismatch: int = 4,
) -> torch.Tensor:
    """PSNR (dB) on the Y channel per image: [B, 3, H, W] x2 in 0..1 -> [B] float64."""
    y1, y2 = _prepare(image, reference, crop, size_rule, max_mismatch)
    mse = ((y1 - y2) ** 2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(DATA_RANGE**2 / (mse + PSNR_EPS))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """[size, size] Gaussian (as MATLAB's ``fspecial('gaussian')``), float64, sums to 1."""
    r = (size - 1) / 2.0
    x = torch.arange(size, dtype=torch.float64) - r
    g = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim_y(
    image: torch.Tensor,
    reference: torch.Tensor,
    crop: int = 0,
    size_rule: str = "error",
    max_mismatch: int = 4,
) -> torch.Tensor:
    """SSIM on the Y channel per image: [B, 3, H, W] x2 in 0..1 -> [B] float64."""
    y1, y2 = _prepare(image, reference, crop, size_rule, max_mismatch)
    if min(y1.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} px after the border crop")
    win = gaussian_window().to(y1.device).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win)  # valid positions only

    mu1, mu2 = filt(y1), filt(y2)
    var1 = filt(y1 * y1) - mu1**2
    var2 = filt(y2 * y2) - mu2**2
    cov = filt(y1 * y2) - mu1 * mu2
    cs = ((2 * cov + c2) / (var1 + var2 + c2)).clamp_min(0.0)
    lum = (2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1)
    return (lum * cs).mean(dim=(1, 2, 3))


def psnr_of_identical() -> float:
    """What ``psnr_y`` gives for two equal images (the toolbox's epsilon makes it finite)."""
    return 10.0 * math.log10(DATA_RANGE**2 / PSNR_EPS)
