"""Real-ESRGAN second-order degradation, written in torch + kornia from the paper's description.

Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data" (ICCVW 2021),
section 3: the HR image goes twice through blur -> resize -> noise -> JPEG, with a final 2-D sinc filter
(ringing / overshoot) placed before or after the last JPEG; the ground truth is USM-sharpened.
The defaults of :class:`DegradationConfig` are the paper's "x4plus" settings (see docs/ARCHITECTURE.md).

Conventions:

- images are float batches ``[B, 3, H, W]`` in ``[0, 1]`` on any device;
- every random draw comes from the explicit ``torch.Generator`` passed in (never the global RNG).
  Scalar parameters are drawn on the generator's device and noise fields too, then moved to the image's
  device, so a seed gives bit-identical output for a given generator device / image device pair;
- per image: blur kernels (type, size, sigma, beta, rotation, sinc cutoff), noise level, gray-noise flag,
  JPEG quality; per batch (all images share a tensor size): the resize scale and interpolation mode,
  gaussian vs poisson noise, whether the second blur happens, the order of the final stage.

JPEG uses :func:`kornia.enhance.jpeg_codec_differentiable`, not a PIL round trip: it runs batched on the
training device with a per-image quality (a PIL round trip would copy every image to the CPU and encode it
one at a time in each step), it is deterministic, and Real-ESRGAN itself uses a differentiable JPEG
(DiffJPEG) in its online pipeline. Like DiffJPEG it models the JPEG quantisation (8x8 DCT, quality-scaled
tables, 4:2:0 chroma), not the byte stream.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import kornia
import torch
import torch.nn.functional as F

__all__ = [
    "KERNEL_TYPES",
    "DegradationConfig",
    "DegradationPipeline",
    "add_gaussian_noise",
    "add_poisson_noise",
    "circular_lowpass_kernel",
    "filter2d",
    "jpeg",
    "kernel_from_params",
    "pulse_kernel",
    "quantize_8bit",
    "resize",
    "sample_blur_kernels",
    "sample_final_sinc_kernels",
    "sample_resize",
    "usm_sharpen",
]

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")


@dataclass
class DegradationConfig:
    """All parameters of the second-order pipeline; defaults are Real-ESRGAN x4plus.

    Ranges are ``[low, high]`` (uniform); noise sigmas are on the 0..255 scale as in the paper.
    """

    scale: int = 4
    # -- first degradation --------------------------------------------------------------------------
    kernel_size: int = 21  # largest kernel; each kernel's own size is drawn from the odd sizes 7..kernel_size
    kernel_min_size: int = 7
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # -- second degradation -------------------------------------------------------------------------
    second_blur_prob: float = 0.8
    kernel_types2: tuple[str, ...] = KERNEL_TYPES
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # -- final stage ----------------------------------------------------------------------------------
    final_sinc_prob: float = 0.8
    final_sinc_first_prob: float = 0.5  # P(resize + sinc, then JPEG); otherwise JPEG, then resize + sinc
    # -- ground truth ---------------------------------------------------------------------------------
    usm_radius: int = 50
    usm_weight: float = 0.5
    usm_threshold: float = 10.0
    degrade_from_usm: bool = True  # Real-ESRGAN degrades the USM-sharpened HR

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of its domain."""

        def _range(name: str, lo_min: float = 0.0) -> None:
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or not (lo_min <= value[0] <= value[1]):
                raise ValueError(f"{name} must be [low, high] with {lo_min} <= low <= high, got {list(value)}")
            setattr(self, name, value)

        def _prob(name: str) -> None:
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
            setattr(self, name, value)

        def _probs(name: str, n: int) -> None:
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != n or any(v < 0 for v in value) or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
                raise ValueError(f"{name} must be {n} non-negative probabilities summing to 1, got {list(value)}")
            setattr(self, name, value)

        if int(self.scale) < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if (
            self.kernel_size % 2 != 1
            or self.kernel_min_size % 2 != 1
            or not 3 <= self.kernel_min_size <= self.kernel_size
        ):
            raise ValueError(
                f"kernel_size / kernel_min_size must be odd with 3 <= min <= size, got {self.kernel_min_size}, "
                f"{self.kernel_size}"
            )
        for suffix in ("", "2"):
            types = tuple(getattr(self, f"kernel_types{suffix}"))
            unknown = [t for t in types if t not in KERNEL_TYPES]
            if unknown:
                raise ValueError(f"kernel_types{suffix}: unknown kernel type(s) {unknown}; known: {list(KERNEL_TYPES)}")
            setattr(self, f"kernel_types{suffix}", types)
            _probs(f"kernel_probs{suffix}", len(types))
            _probs(f"resize_prob{suffix}", 3)
            for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
                _prob(name + suffix)
            _range(f"blur_sigma{suffix}", 1e-3)
            _range(f"betag_range{suffix}", 1e-3)
            _range(f"betap_range{suffix}", 1e-3)
            _range(f"resize_range{suffix}", 1e-3)
            _range(f"noise_range{suffix}")
            _range(f"poisson_scale_range{suffix}")
            _range(f"jpeg_range{suffix}", 1.0)
            if getattr(self, f"jpeg_range{suffix}")[1] > 100:
                raise ValueError(
                    f"jpeg_range{suffix} must lie in [1, 100], got {list(getattr(self, 'jpeg_range' + suffix))}"
                )
        for name in ("second_blur_prob", "final_sinc_prob", "final_sinc_first_prob"):
            _prob(name)
        if self.usm_radius < 1 or self.usm_weight < 0 or self.usm_threshold < 0:
            raise ValueError("usm_radius must be >= 1, usm_weight and usm_threshold >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples as lists)."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DegradationConfig:
        """Build from a dict, rejecting unknown keys (``KeyError`` naming them)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown degradation option(s) {unknown}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# random helpers (explicit generator only)
# ----------------------------------------------------------------------------------------------


def _rand(generator: torch.Generator, n: int) -> torch.Tensor:
    """``n`` uniforms in [0, 1) drawn from ``generator`` as a float64 CPU tensor."""
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu()


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * _rand(generator, n)


def _choice(generator: torch.Generator, n: int, probs: tuple[float, ...]) -> torch.Tensor:
    """``n`` indices drawn with the given probabilities (inverse CDF on uniforms)."""
    cdf = torch.tensor(probs, dtype=torch.float64).cumsum(0)
    cdf[-1] = 1.0 + 1e-12
    return torch.searchsorted(cdf, _rand(generator, n), right=True).clamp_(max=len(probs) - 1)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _size_mask(sizes: torch.Tensor, full: int) -> torch.Tensor:
    """[N, full, full] mask that keeps the centred ``sizes[i]`` x ``sizes[i]`` window (zero padding)."""
    xx, yy = _grid(full)
    half = ((sizes.to(torch.float64) - 1) / 2).view(-1, 1, 1)
    return ((xx.abs() <= half) & (yy.abs() <= half)).to(torch.float64)


def kernel_from_params(
    kind: torch.Tensor,
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    beta: torch.Tensor,
    sizes: torch.Tensor,
    full_size: int = 21,
) -> torch.Tensor:
    """Batch of normalised blur kernels ``[N, full_size, full_size]`` (float64, CPU).

    ``kind`` holds indices into :data:`KERNEL_TYPES`; with ``q = c^T Sigma^-1 c`` for the pixel offset ``c``
    and ``Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T``:
    gaussian ``exp(-q/2)``, generalized ``exp(-q^beta / 2)``, plateau ``1 / (1 + q^beta)``.
    Each kernel has its own odd size ``sizes[i]`` and is zero-padded to ``full_size``.
    """
    xx, yy = _grid(full_size)
    c, s = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    sx2, sy2 = (sigma_x**2).view(-1, 1, 1), (sigma_y**2).view(-1, 1, 1)
    # rotate offsets into the kernel's principal axes: u = R^T c
    u = c * xx + s * yy
    v = -s * xx + c * yy
    q = u**2 / sx2 + v**2 / sy2
    b = beta.view(-1, 1, 1)
    family = torch.div(kind, 2, rounding_mode="floor").view(-1, 1, 1)  # 0 gaussian, 1 generalized, 2 plateau
    gauss = torch.exp(-0.5 * q)
    general = torch.exp(-0.5 * q.pow(b))
    plateau = 1.0 / (1.0 + q.pow(b))
    k = torch.where(family == 0, gauss, torch.where(family == 1, general, plateau))
    k = k * _size_mask(sizes, full_size)
    return k / k.sum(dim=(-2, -1), keepdim=True)


def circular_lowpass_kernel(cutoff: torch.Tensor, sizes: torch.Tensor, full_size: int = 21) -> torch.Tensor:
    """2-D sinc (ideal circular low-pass) kernels ``[N, full_size, full_size]``, each summing to one.

    ``k(r) = w J1(w r) / (2 pi r)`` with the cutoff frequency ``w`` (radians per pixel), ``k(0) = w^2 / (4 pi)``.
    """
    xx, yy = _grid(full_size)
    r = torch.sqrt(xx**2 + yy**2).unsqueeze(0)
    w = cutoff.to(torch.float64).view(-1, 1, 1)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    k = w * torch.special.bessel_j1(w * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r == 0, (w**2 / (4 * math.pi)).expand_as(k), k)
    k = k * _size_mask(sizes, full_size)
    return k / k.sum(dim=(-2, -1), keepdim=True)


def pulse_kernel(n: int, full_size: int = 21) -> torch.Tensor:
    """Identity kernels ``[n, full_size, full_size]``."""
    k = torch.zeros(n, full_size, full_size, dtype=torch.float64)
    k[:, full_size // 2, full_size // 2] = 1.0
    return k


def _sample_sizes(generator: torch.Generator, n: int, min_size: int, max_size: int) -> torch.Tensor:
    options = torch.arange(min_size, max_size + 1, 2)
    idx = torch.floor(_rand(generator, n) * len(options)).long().clamp_(max=len(options) - 1)
    return options[idx]


def sample_blur_kernels(
    n: int, cfg: DegradationConfig, generator: torch.Generator, stage: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw ``n`` first- (``stage=1``) or second-stage (``stage=2``) blur kernels.

    Returns kernels ``[n, K, K]`` (float32, CPU, each summing to one) and the drawn parameters
    (``kind`` index into :data:`KERNEL_TYPES` or ``-1`` for a sinc kernel, ``size``, ``sigma_x``, ``sigma_y``,
    ``theta``, ``beta``, ``cutoff``).
    """
    sfx = "" if stage == 1 else "2"
    types: tuple[str, ...] = getattr(cfg, f"kernel_types{sfx}")
    probs: tuple[float, ...] = getattr(cfg, f"kernel_probs{sfx}")
    sig_lo, sig_hi = getattr(cfg, f"blur_sigma{sfx}")
    bg_lo, bg_hi = getattr(cfg, f"betag_range{sfx}")
    bp_lo, bp_hi = getattr(cfg, f"betap_range{sfx}")
    sinc_prob: float = getattr(cfg, f"sinc_prob{sfx}")
    full = cfg.kernel_size

    sizes = _sample_sizes(generator, n, cfg.kernel_min_size, full)
    use_sinc = _rand(generator, n) < sinc_prob
    # sinc cutoff: [pi/3, pi] for small kernels, [pi/5, pi] for kernels of 13 and more (fewer ringing lobes)
    u = _rand(generator, n)
    lo = torch.where(sizes < 13, torch.full_like(u, math.pi / 3), torch.full_like(u, math.pi / 5))
    cutoff = lo + (math.pi - lo) * u
    kind_local = _choice(generator, n, probs)
    kind = torch.tensor([KERNEL_TYPES.index(types[int(i)]) for i in kind_local], dtype=torch.long)
    sigma_x = _uniform(generator, n, sig_lo, sig_hi)
    sigma_y = _uniform(generator, n, sig_lo, sig_hi)
    theta = _uniform(generator, n, -math.pi, math.pi)
    # shape beta (generalized and plateau alike): with p 0.5 drawn below 1, else above 1, each within the range;
    # for the plateau range [1, 2] the "below 1" half is exactly 1
    half = _rand(generator, n) < 0.5
    bg = torch.where(
        half, _uniform(generator, n, bg_lo, min(1.0, bg_hi)), _uniform(generator, n, max(1.0, bg_lo), bg_hi)
    )
    half = _rand(generator, n) < 0.5
    bp = torch.where(
        half, _uniform(generator, n, bp_lo, min(1.0, bp_hi)), _uniform(generator, n, max(1.0, bp_lo), bp_hi)
    )
    iso = kind % 2 == 0
    sigma_y = torch.where(iso, sigma_x, sigma_y)
    theta = torch.where(iso, torch.zeros_like(theta), theta)
    family = torch.div(kind, 2, rounding_mode="floor")
    beta = torch.where(family == 1, bg, torch.where(family == 2, bp, torch.ones_like(bp)))

    kernels = kernel_from_params(kind, sigma_x, sigma_y, theta, beta, sizes, full)
    sinc = circular_lowpass_kernel(cutoff, sizes, full)
    kernels = torch.where(use_sinc.view(-1, 1, 1), sinc, kernels)
    params = {
        "kind": torch.where(use_sinc, torch.full_like(kind, -1), kind),
        "size": sizes,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "theta": theta,
        "beta": beta,
        "cutoff": cutoff,
    }
    return kernels.float(), params


def sample_final_sinc_kernels(
    n: int, cfg: DegradationConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-stage kernels: a sinc (cutoff in [pi/3, pi], odd size 7..K) with ``final_sinc_prob``, else a pulse.

    Returns kernels ``[n, K, K]`` (float32) and the boolean "is sinc" mask.
    """
    full = cfg.kernel_size
    sizes = _sample_sizes(generator, n, cfg.kernel_min_size, full)
    cutoff = _uniform(generator, n, math.pi / 3, math.pi)
    use = _rand(generator, n) < cfg.final_sinc_prob
    k = torch.where(use.view(-1, 1, 1), circular_lowpass_kernel(cutoff, sizes, full), pulse_kernel(n, full))
    return k.float(), use


# ----------------------------------------------------------------------------------------------
# image operations
# ----------------------------------------------------------------------------------------------


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-image correlation with ``kernels`` ``[B, K, K]`` (or ``[1, K, K]``), reflect-padded.

    Falls back to replicate padding when the image is not larger than the kernel radius.
    """
    k = kernels.to(device=x.device, dtype=x.dtype)
    pad = k.shape[-1] // 2
    border = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    return kornia.filters.filter2d(x, k, border_type=border)


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_separable(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Blur with the separable kernel ``g (x) g`` (1-D, odd length), reflect-padded."""
    k = g.to(device=x.device, dtype=x.dtype)
    pad = k.numel() // 2
    border = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    x = kornia.filters.filter2d(x, k.view(1, 1, -1), border_type=border)
    return kornia.filters.filter2d(x, k.view(1, -1, 1), border_type=border)


def usm_sharpen(x: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking as in Real-ESRGAN's ground-truth sharpening.

    Gaussian blur whose size is ``radius`` rounded up to odd (50 -> 51, Real-ESRGAN's convention) with the
    sigma OpenCV derives from the size, ``0.3*((k-1)/2-1)+0.8`` (8.0 for 51);
    ``sharp = clamp(x + weight * (x - blur))`` applied only where ``|x - blur| * 255 > threshold``, with that
    mask softened by the same blur: ``out = m * sharp + (1 - m) * x``.
    """
    size = radius if radius % 2 == 1 else radius + 1
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    g = _gaussian_1d(size, sigma)
    blur = _filter_separable(x, g)
    residual = x - blur
    mask = (residual.abs() * 255 > threshold).to(x.dtype)
    soft = _filter_separable(mask, g)
    sharp = (x + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * x


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize to ``size`` (H, W) with ``area`` / ``bilinear`` / ``bicubic`` interpolation."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def sample_resize(
    generator: torch.Generator, probs: tuple[float, float, float], scale_range: tuple[float, float]
) -> tuple[float, str]:
    """Draw one (scale, mode): up in ``[1, high]``, down in ``[low, 1]`` or keep (1), with ``probs``."""
    direction = int(_choice(generator, 1, probs)[0])
    u = float(_rand(generator, 1)[0])
    if direction == 0:
        scale = 1.0 + (scale_range[1] - 1.0) * u
    elif direction == 1:
        scale = scale_range[0] + (1.0 - scale_range[0]) * u
    else:
        scale = 1.0
    mode = RESIZE_MODES[int(_choice(generator, 1, (1 / 3, 1 / 3, 1 / 3))[0])]
    return scale, mode


def _noise(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def add_gaussian_noise(
    x: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Add gaussian noise with per-image std ``sigma / 255``; images with ``gray`` get one field for all channels."""
    b, c, h, w = x.shape
    color = _noise((b, c, h, w), generator, x.device, x.dtype)
    mono = _noise((b, 1, h, w), generator, x.device, x.dtype).expand(b, c, h, w)
    noise = torch.where(gray.to(x.device).view(b, 1, 1, 1), mono, color)
    return x + noise * (sigma.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 1) / 255.0)


def _poisson(img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson noise field of an image batch (quantised to 8 bit first; photon count from its distinct levels)."""
    img = (img.clamp(0, 1) * 255).round() / 255
    out = torch.empty_like(img)
    for i in range(img.shape[0]):
        levels = torch.unique(img[i]).numel()
        vals = float(2 ** math.ceil(math.log2(max(levels, 2))))
        lam = (img[i] * vals).to(generator.device)
        out[i] = (torch.poisson(lam, generator=generator).to(img.device) / vals) - img[i]
    return out


def add_poisson_noise(
    x: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Add poisson (shot) noise scaled per image by ``scale``; ``gray`` images get noise of their luma."""
    b, c, _, _ = x.shape
    color = _poisson(x, generator)
    luma = kornia.color.rgb_to_grayscale(x.clamp(0, 1)) if c == 3 else x.mean(1, keepdim=True)
    mono = _poisson(luma, generator).expand_as(x)
    noise = torch.where(gray.to(x.device).view(b, 1, 1, 1), mono, color)
    return x + noise * scale.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 1)


def jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG encode/decode (kornia's differentiable codec) with per-image ``quality`` in [1, 100]."""
    q = quality.to(device=x.device, dtype=torch.float32).reshape(-1)
    return kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), q)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 8-bit grid, as a saved LR image would be."""
    return (x * 255.0).round().clamp(0, 255) / 255.0


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------


class DegradationPipeline:
    """Callable second-order degradation: ``hr [B,3,H,W] -> (lr [B,3,H/s,W/s], hr_usm [B,3,H,W])``.

    ``H`` and ``W`` should be multiples of ``cfg.scale``. Output LR is clamped and quantised to 8 bit.
    """

    def __init__(self, cfg: DegradationConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else DegradationConfig()

    def _noise_stage(self, x: torch.Tensor, generator: torch.Generator, sfx: str) -> torch.Tensor:
        """Gaussian (p ``gaussian_noise_prob``) or poisson noise, gray per image, then clipped to [0, 1]."""
        cfg = self.cfg
        b = x.shape[0]
        use_gauss = float(_rand(generator, 1)[0]) < getattr(cfg, f"gaussian_noise_prob{sfx}")
        gray = _rand(generator, b) < getattr(cfg, f"gray_noise_prob{sfx}")
        if use_gauss:
            sigma = _uniform(generator, b, *getattr(cfg, f"noise_range{sfx}"))
            return add_gaussian_noise(x, sigma, gray, generator).clamp_(0, 1)
        scale = _uniform(generator, b, *getattr(cfg, f"poisson_scale_range{sfx}"))
        return add_poisson_noise(x, scale, gray, generator).clamp_(0, 1)

    def __call__(self, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # in float32 even inside a mixed-precision training step (the LR must not depend on the autocast dtype)
        with torch.autocast(device_type=hr.device.type, enabled=False):
            return self._degrade(hr, generator)

    def _degrade(self, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if hr.ndim != 4 or hr.shape[1] != 3:
            raise ValueError(f"hr must be [B, 3, H, W], got {list(hr.shape)}")
        b, _, h, w = hr.shape
        out_h, out_w = h // cfg.scale, w // cfg.scale
        if out_h < 1 or out_w < 1:
            raise ValueError(f"hr of size {h}x{w} is smaller than the scale {cfg.scale}")
        hr = hr.float()
        hr_usm = usm_sharpen(hr, cfg.usm_radius, cfg.usm_weight, cfg.usm_threshold)
        x = hr_usm if cfg.degrade_from_usm else hr

        # all per-image kernels up front (fixed draw order)
        k1, _ = sample_blur_kernels(b, cfg, generator, stage=1)
        k2, _ = sample_blur_kernels(b, cfg, generator, stage=2)
        k_final, _ = sample_final_sinc_kernels(b, cfg, generator)

        # ---- first degradation
        x = filter2d(x, k1)
        scale, mode = sample_resize(generator, cfg.resize_prob, cfg.resize_range)
        x = resize(x, (int(h * scale), int(w * scale)), mode)
        x = self._noise_stage(x, generator, "")
        q1 = _uniform(generator, b, *cfg.jpeg_range)
        x = jpeg(x, q1)

        # ---- second degradation
        if float(_rand(generator, 1)[0]) < cfg.second_blur_prob:
            x = filter2d(x, k2)
        scale, mode = sample_resize(generator, cfg.resize_prob2, cfg.resize_range2)
        x = resize(x, (int(h / cfg.scale * scale), int(w / cfg.scale * scale)), mode)
        x = self._noise_stage(x, generator, "2")

        # ---- final: [resize + sinc, JPEG] or [JPEG, resize + sinc]
        sinc_first = float(_rand(generator, 1)[0]) < cfg.final_sinc_first_prob
        mode = RESIZE_MODES[int(_choice(generator, 1, (1 / 3, 1 / 3, 1 / 3))[0])]
        q2 = _uniform(generator, b, *cfg.jpeg_range2)
        if sinc_first:
            x = filter2d(resize(x, (out_h, out_w), mode), k_final)
            x = jpeg(x, q2)
        else:
            x = jpeg(x, q2)
            x = filter2d(resize(x, (out_h, out_w), mode), k_final)
        lr = quantize_8bit(x)
        return lr.contiguous(), hr_usm
