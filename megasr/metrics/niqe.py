"""NIQE (Mittal, Soundararajan, Bovik, IEEE SPL 2013, "Making a 'Completely Blind' Image Quality Analyzer"),
written in torch (float64) from the paper and the published MATLAB release's procedure, as IQA-PyTorch scores it:

- the image's Y channel (BT.601, 0..255, rounded to integers as the MATLAB-consistent toolboxes do), optional
  border crop, then cropped to whole 96 x 96 blocks;
- at two scales (the image, then MATLAB's ``imresize(.., 0.5)``: bicubic, antialiased, symmetric borders):
  MSCN coefficients ``(I - mu) / (sigma + 1)`` with a 7 x 7 Gaussian window (sigma 7/6, replicated borders),
  and per block 18 features: the generalised Gaussian fit (shape, mean of the two scales) of the MSCN values and
  the asymmetric generalised Gaussian fit (shape, mean, left and right scale) of the products of each value with
  its right, lower, lower-right and lower-left neighbours (wrapping around the block);
- the 36 features of all blocks give a multivariate Gaussian (mean over blocks, covariance over the blocks
  without a NaN); the score is the Mahalanobis-like distance to the pristine model's
  ``sqrt((mu_p - mu) ((cov_p + cov) / 2)^+ (mu_p - mu)^T)``. Lower is better.

The pristine model (``mu_pris_param`` [36], ``cov_pris_param`` [36, 36]) is data the authors fitted on pristine
photos; it is not in the pack: ``python -m megasr fetch --eval`` builds ``niqe_pris_params.safetensors`` from
the copy BasicSR publishes (see the manifest entry ``metric_niqe`` for source and licence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

BLOCK = 96
#: block-feature shifts (row, column) of the pairwise products, as in the MATLAB release
SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
_GAM = torch.arange(0.2, 10.001, 0.001, dtype=torch.float64)


def _gamma(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.lgamma(x))


_R_GAM = _gamma(2 / _GAM) ** 2 / (_gamma(1 / _GAM) * _gamma(3 / _GAM))


def gaussian_window(size: int = 7, sigma: float = 7 / 6) -> torch.Tensor:
    """MATLAB's ``fspecial('gaussian', size, sigma)`` (normalised to sum 1), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _cubic(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.where(
        a <= 1,
        1.5 * a**3 - 2.5 * a**2 + 1,
        torch.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, torch.zeros_like(a)),
    )


def imresize_matrix(in_len: int, scale: float) -> torch.Tensor:
    """[out, in] weights of MATLAB's ``imresize`` along one axis: bicubic, antialiased when shrinking,
    output sample i (1-based) at input position ``i / scale + 0.5 (1 - 1 / scale)``, symmetric borders."""
    out_len = math.ceil(in_len * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    taps = math.ceil(width) + 2
    x = torch.arange(1, out_len + 1, dtype=torch.float64) / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(x - width / 2)
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    d = x[:, None] - idx
    w = scale * _cubic(scale * d) if scale < 1 else _cubic(d)
    w = w / w.sum(dim=1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])  # symmetric padding
    cols = mirror[torch.remainder(idx.long() - 1, 2 * in_len)]
    m = torch.zeros(out_len, in_len, dtype=torch.float64)
    m.scatter_add_(1, cols, w)
    return m


def imresize_half(img: torch.Tensor) -> torch.Tensor:
    """[H, W] -> MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased)."""
    return imresize_matrix(img.shape[0], 0.5) @ img @ imresize_matrix(img.shape[1], 0.5).T


def aggd_fit(x: torch.Tensor) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching: (shape alpha, left scale, right scale)."""
    x = x.reshape(-1).double()
    left_std = torch.sqrt((x[x < 0] ** 2).mean())
    right_std = torch.sqrt((x[x > 0] ** 2).mean())
    gammahat = left_std / right_std
    rhat = x.abs().mean() ** 2 / (x**2).mean()
    rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
    alpha = _GAM[torch.argmin((_R_GAM - rhatnorm) ** 2)]
    k = torch.sqrt(_gamma(1 / alpha) / _gamma(3 / alpha))
    return float(alpha), float(left_std * k), float(right_std * k)


def block_features(block: torch.Tensor) -> list[float]:
    """The 18 NIQE features of one block of MSCN coefficients."""
    alpha, bl, br = aggd_fit(block)
    feats = [alpha, (bl + br) / 2]
    for shift in SHIFTS:
        a, bl, br = aggd_fit(block * torch.roll(block, shifts=shift, dims=(0, 1)))
        mean = (br - bl) * float(_gamma(torch.tensor(2 / a)) / _gamma(torch.tensor(1 / a)))
        feats += [a, mean, bl, br]
    return feats


def _mscn(img: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    k = window.shape[0] // 2
    pad = lambda t: F.pad(t[None, None], (k, k, k, k), mode="replicate")  # noqa: E731 - 'nearest' borders
    mu = F.conv2d(pad(img), window[None, None])[0, 0]
    var = F.conv2d(pad(img * img), window[None, None])[0, 0] - mu * mu
    return (img - mu) / (var.abs().sqrt() + 1)


def niqe_features(y: torch.Tensor) -> torch.Tensor:
    """[blocks, 36] features of a Y image [H, W] in 0..255 (already cropped to whole blocks)."""
    window = gaussian_window()
    nh, nw = y.shape[0] // BLOCK, y.shape[1] // BLOCK
    per_scale = []
    img = y
    for scale in (1, 2):
        norm = _mscn(img, window)
        size = BLOCK // scale
        feats = [
            block_features(norm[i * size : (i + 1) * size, j * size : (j + 1) * size])
            for j in range(nw)
            for i in range(nh)
        ]
        per_scale.append(torch.tensor(feats, dtype=torch.float64))
        if scale == 1:
            img = imresize_half(img / 255.0) * 255.0
    return torch.cat(per_scale, dim=1)


def niqe_score(y: torch.Tensor, mu_pris: torch.Tensor, cov_pris: torch.Tensor) -> float:
    """NIQE of one Y image [H, W] (0..255) against the pristine model."""
    from . import MetricUnavailable

    nh, nw = y.shape[0] // BLOCK, y.shape[1] // BLOCK
    if nh * nw < 2:
        raise MetricUnavailable(f"NIQE needs at least two {BLOCK} x {BLOCK} blocks; the image is {tuple(y.shape)}")
    feats = niqe_features(y[: nh * BLOCK, : nw * BLOCK].double())
    mu = torch.nanmean(feats, dim=0)
    clean = feats[~torch.isnan(feats).any(dim=1)]
    cov = torch.cov(clean.T)
    diff = (mu_pris.double().reshape(-1) - mu)[None]
    inv = torch.linalg.pinv((cov_pris.double() + cov) / 2)
    return float(torch.sqrt(diff @ inv @ diff.T))


def to_y255(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] RGB 0..1 -> Y (BT.601, 16..235) rounded to integers, float64."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64)
    return torch.round(16.0 + torch.einsum("chw,c->hw", image.double(), w))


class NIQE:
    """``NIQE(mu, cov)(image [B, 3, H, W] in 0..1, reference ignored) -> [B]``."""

    def __init__(self, mu_pris: torch.Tensor, cov_pris: torch.Tensor) -> None:
        self.mu_pris = mu_pris.double().reshape(-1)
        self.cov_pris = cov_pris.double()

    def __call__(self, image: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        scores = [niqe_score(to_y255(im.cpu()), self.mu_pris, self.cov_pris) for im in image]
        return torch.tensor(scores, dtype=torch.float64)


def load_niqe(path: str | Path) -> NIQE:
    """The pristine model from ``niqe_pris_params.safetensors`` (``mu_pris_param`` [36], ``cov_pris_param``
    [36, 36]); a wrong file raises ``MetricUnavailable`` with one line."""
    from ..files import read_state_dict
    from . import MetricUnavailable

    try:
        sd = read_state_dict(Path(path))
        mu, cov = sd["mu_pris_param"], sd["cov_pris_param"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise MetricUnavailable(f"'{path}' is not a NIQE pristine model ({type(err).__name__}: {err})") from err
    if mu.numel() != 36 or tuple(cov.shape) != (36, 36):
        raise MetricUnavailable(f"'{path}': mu_pris_param must have 36 values and cov_pris_param be 36 x 36")
    return NIQE(mu, cov)


def write_from_npz(parts: Sequence[Path], output: Path) -> Path:
    """Build ``niqe_pris_params.safetensors`` from BasicSR's ``niqe_pris_params.npz`` (read without pickle);
    its Gaussian window, when present, must be the one this module computes."""
    import numpy as np
    from safetensors.torch import save_file

    from ..files import atomic_write

    with np.load(parts[0], allow_pickle=False) as data:
        mu = torch.from_numpy(np.asarray(data["mu_pris_param"], dtype=np.float64)).reshape(-1)
        cov = torch.from_numpy(np.asarray(data["cov_pris_param"], dtype=np.float64))
        window = data["gaussian_window"] if "gaussian_window" in data.files else None
    if window is not None and not torch.allclose(torch.from_numpy(np.asarray(window, np.float64)), gaussian_window()):
        raise ValueError("its gaussian_window is not the 7 x 7, sigma 7/6 window of NIQE")
    state = {"mu_pris_param": mu.contiguous(), "cov_pris_param": cov.contiguous()}
    atomic_write(output, lambda tmp: save_file(state, tmp, metadata={"megasr.component": "metric_niqe"}))
    load_niqe(output)
    return Path(output)
