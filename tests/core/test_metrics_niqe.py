"""NIQE (megasr/metrics/niqe.py) against fixed expectations and an independent numpy/scipy computation.

Catches: an imresize whose sample positions are shifted (the 0.5 (1 - 1/scale) offset) or not antialiased, an
AGGD fit with left/right swapped or the wrong moment ratio (a Gaussian must give shape 2, a Laplacian 1), the
pairwise products taken with the wrong neighbour, MSCN with zero-padded borders, the covariance over the wrong
axis, the Y channel not rounded, a missing pristine file that crashes instead of one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import ndimage, special

from megasr.metrics import MetricUnavailable, build_metric_file, compute_metrics
from megasr.metrics import niqe as N


def test_imresize_half_matches_matlab_positions_and_antialiasing() -> None:
    m = N.imresize_matrix(16, 0.5)
    assert m.shape == (8, 16)
    assert torch.allclose(m.sum(1), torch.ones(8, dtype=torch.float64))
    # the cubic kernel reproduces a linear ramp: output i (1-based) sits at input position 2i - 0.5 (MATLAB)
    ramp = torch.arange(1, 17, dtype=torch.float64)
    got = m @ ramp
    assert torch.allclose(got[2:-2], torch.tensor([2 * i - 0.5 for i in range(3, 7)], dtype=torch.float64))
    # antialiased: 8 taps of the 2x-stretched kernel, whose weights are h(x) = cubic(x / 2) / 2 before normalising
    row = m[3]
    x = 2 * 4 - 0.5  # output 4's position
    expect = torch.zeros(16, dtype=torch.float64)
    for k in range(1, 17):
        d = abs(x - k) / 2
        expect[k - 1] = (1.5 * d**3 - 2.5 * d**2 + 1) if d <= 1 else (-0.5 * d**3 + 2.5 * d**2 - 4 * d + 2) * (d <= 2)
    assert torch.allclose(row, expect / expect.sum())
    # symmetric borders: a constant stays constant, the first output mixes mirrored samples
    assert torch.allclose(m @ torch.full((16,), 7.0, dtype=torch.float64), torch.full((8,), 7.0, dtype=torch.float64))


@pytest.mark.parametrize(("shape", "expect"), [(2.0, 2.0), (1.0, 1.0)])
def test_aggd_fit_recovers_the_shape_of_a_generalised_gaussian(shape: float, expect: float) -> None:
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = torch.randn(n, generator=g, dtype=torch.float64) if shape == 2.0 else torch.empty(n, dtype=torch.float64)
    if shape == 1.0:  # Laplacian
        u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    alpha, bl, br = N.aggd_fit(x)
    assert alpha == pytest.approx(expect, abs=0.05)
    # scale of a GGD with unit variance: sqrt(Gamma(1/a) / Gamma(3/a)) * std; Gaussian: sqrt(2)
    std = float(x.std())
    assert bl == pytest.approx(br, rel=0.03)
    assert bl == pytest.approx(std * math.sqrt(math.gamma(1 / expect) / math.gamma(3 / expect)), rel=0.05)


def test_aggd_fit_left_and_right_are_not_swapped() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=g, dtype=torch.float64)
    x = torch.where(x < 0, 3 * x, x)  # a wide left side
    _, bl, br = N.aggd_fit(x)
    assert bl / br == pytest.approx(3.0, rel=0.05)


# ------------------------------------------------------------------ an independent computation (numpy / scipy)


def _np_aggd(x: np.ndarray) -> tuple[float, float, float]:
    x = x.ravel()
    gam = np.arange(0.2, 10.001, 0.001)
    r_gam = special.gamma(2 / gam) ** 2 / (special.gamma(1 / gam) * special.gamma(3 / gam))
    lstd, rstd = np.sqrt(np.mean(x[x < 0] ** 2)), np.sqrt(np.mean(x[x > 0] ** 2))
    g = lstd / rstd
    r = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    rn = r * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    a = gam[np.argmin((r_gam - rn) ** 2)]
    k = np.sqrt(special.gamma(1 / a) / special.gamma(3 / a))
    return a, lstd * k, rstd * k


def _np_features(block: np.ndarray) -> list[float]:
    a, bl, br = _np_aggd(block)
    out = [a, (bl + br) / 2]
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, bl, br = _np_aggd(block * np.roll(block, (dy, dx), axis=(0, 1)))
        out += [a, (br - bl) * special.gamma(2 / a) / special.gamma(1 / a), bl, br]
    return out


def _np_niqe(rgb_u8: np.ndarray, mu_p: np.ndarray, cov_p: np.ndarray) -> float:
    y = np.round(16 + (rgb_u8.astype(np.float64) / 255) @ np.array([65.481, 128.553, 24.966]))
    nh, nw = y.shape[0] // 96, y.shape[1] // 96
    img = y[: nh * 96, : nw * 96]
    ax = np.arange(7) - 3
    win = np.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / (2 * (7 / 6) ** 2))
    win /= win.sum()
    scales = []
    for s in (1, 2):
        mu = ndimage.convolve(img, win, mode="nearest")
        sd = np.sqrt(np.abs(ndimage.convolve(img * img, win, mode="nearest") - mu * mu))
        norm = (img - mu) / (sd + 1)
        b = 96 // s
        scales.append(
            [_np_features(norm[i * b : (i + 1) * b, j * b : (j + 1) * b]) for i in range(nh) for j in range(nw)]
        )
        if s == 1:  # the resize is checked on its own above
            img = N.imresize_half(torch.from_numpy(img / 255)).numpy() * 255
    feats = np.concatenate([np.array(f) for f in scales], axis=1)
    mu = np.nanmean(feats, axis=0)
    cov = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
    d = mu_p - mu
    return float(np.sqrt(d @ np.linalg.pinv((cov_p + cov) / 2) @ d))


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:200, 0:300] / 40.0
    base = np.stack([np.sin(xx + yy), np.cos(2 * xx), np.sin(3 * yy)], -1) * 80 + 128
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _pristine(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    mu = rng.normal(1.0, 0.5, 36)
    a = rng.normal(0, 0.3, (36, 36))
    cov = a @ a.T + np.eye(36) * 0.05
    path = tmp_path / "metrics" / "niqe_pris_params.safetensors"
    path.parent.mkdir()
    save_file({"mu_pris_param": torch.from_numpy(mu), "cov_pris_param": torch.from_numpy(cov)}, str(path))
    return path, mu, cov


def test_niqe_equals_an_independent_numpy_computation(tmp_path: Path) -> None:
    path, mu, cov = _pristine(tmp_path)
    img = _image()
    expected = _np_niqe(img, mu, cov)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    res = compute_metrics(["niqe"], t, folders=[path.parent])
    assert not res.skipped and res.values["niqe"][0] == pytest.approx(expected, rel=1e-9)
    # and it sees the image: a noisier one scores differently
    noisy = compute_metrics(["niqe"], (t + 0.1 * torch.rand_like(t)).clamp(0, 1), folders=[path.parent])
    assert abs(noisy.values["niqe"][0] - expected) > 1e-3


def test_niqe_without_its_file_or_on_a_small_image_is_one_line(tmp_path: Path) -> None:
    img = torch.rand(1, 3, 200, 300)
    res = compute_metrics(["psnr", "niqe"], img, img, folders=[tmp_path])
    assert set(res.values) == {"psnr"}
    assert "niqe_pris_params.safetensors" in res.skipped["niqe"] and "\n" not in res.skipped["niqe"]
    path, _, _ = _pristine(tmp_path)
    small = compute_metrics(["niqe"], torch.rand(1, 3, 96, 100), folders=[path.parent])
    assert "two 96 x 96 blocks" in small.skipped["niqe"]


def test_pristine_file_is_built_from_basicsr_npz_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    mu, cov = rng.normal(size=(1, 36)), np.eye(36)
    npz = tmp_path / "niqe_pris_params.npz"
    np.savez(npz, mu_pris_param=mu, cov_pris_param=cov, gaussian_window=N.gaussian_window().numpy())
    out = build_metric_file("niqe", [npz], tmp_path / "niqe_pris_params.safetensors")
    model = N.load_niqe(out)
    assert torch.equal(model.mu_pris, torch.from_numpy(mu).reshape(-1))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu_pris_param=mu, cov_pris_param=cov, gaussian_window=np.ones((7, 7)) / 49)
    with pytest.raises(MetricUnavailable, match="gaussian_window"):
        build_metric_file("niqe", [bad], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
