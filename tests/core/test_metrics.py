"""PSNR/SSIM on the Y channel (megasr/metrics/fidelity.py) against an independent numpy/scipy computation.

Catches: wrong luma weights or offset (R/B swapped, full-swing instead of studio-swing), a PSNR without the
toolbox's epsilon or with the wrong peak, an SSIM window of the wrong size/sigma, same-padding instead of
valid positions, a border crop applied to one image only or not at all, a silent resize on size mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.signal.windows import gaussian

from megasr.errors import MegaSRInputError
from megasr.metrics import fidelity as fid


def _np_y(rgb_u8: np.ndarray) -> np.ndarray:
    """BT.601 studio-swing luma from an [H, W, 3] uint8 image, written out from the formula."""
    r, g, b = (rgb_u8[..., i].astype(np.float64) / 255.0 for i in range(3))
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def _np_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((_np_y(a) - _np_y(b)) ** 2)
    return 10.0 * math.log10(255.0**2 / (mse + 1e-8))


def _np_ssim(a: np.ndarray, b: np.ndarray) -> float:
    ya, yb = _np_y(a), _np_y(b)
    g = gaussian(11, 1.5)
    win = np.outer(g, g)
    win /= win.sum()

    def filt(x: np.ndarray) -> np.ndarray:
        # any boundary mode: only the positions where the window fits (5 px in from each side) are kept
        return ndimage.correlate(x, win, mode="nearest")[5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = filt(ya), filt(yb)
    va, vb, cov = filt(ya * ya) - ma**2, filt(yb * yb) - mb**2, filt(ya * yb) - ma * mb
    cs = np.maximum((2 * cov + c2) / (va + vb + c2), 0.0)
    return float(np.mean((2 * ma * mb + c1) / (ma**2 + mb**2 + c1) * cs))


def _t(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(2, 0, 1)[None].to(torch.float32) / 255.0


def _pair(seed: int, h: int = 37, w: int = 29) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 7 % 256, yy * 5 % 256, (xx + yy) * 3 % 256], -1).astype(np.float64)
    ref = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = np.clip(ref + rng.normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
    return out, ref


def test_y_channel_is_bt601_studio_swing() -> None:
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 90]]], np.uint8)
    y = fid.rgb_to_y(_t(px))[0, 0, 0].numpy()
    assert y[:5].tolist() == pytest.approx([16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], abs=1e-4)
    assert y[5] == pytest.approx(16 + (65.481 * 10 + 128.553 * 200 + 24.966 * 90) / 255, abs=1e-4)
    np.testing.assert_allclose(y, _np_y(px)[0], atol=1e-4)


def test_psnr_exact_on_constant_images() -> None:
    a = np.full((16, 16, 3), 138, np.uint8)
    b = np.full((16, 16, 3), 128, np.uint8)
    d = 10 * (65.481 + 128.553 + 24.966) / 255  # Y difference of a grey step of 10
    assert float(fid.psnr_y(_t(a), _t(b))) == pytest.approx(10 * math.log10(255**2 / (d**2 + 1e-8)), abs=1e-6)
    assert float(fid.psnr_y(_t(a), _t(a))) == pytest.approx(fid.psnr_of_identical()) == pytest.approx(128.1308, 1e-4)


def test_ssim_exact_on_constant_images() -> None:
    a = np.full((20, 24, 3), 200, np.uint8)
    b = np.full((20, 24, 3), 50, np.uint8)
    m1, m2 = _np_y(a)[0, 0], _np_y(b)[0, 0]
    c1 = (0.01 * 255) ** 2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)  # no variance: the cs term is exactly 1
    # 1e-8: the float32 input (k/255 rounded to float32) is the only difference
    assert float(fid.ssim_y(_t(a), _t(b))) == pytest.approx(expected, abs=1e-8)
    assert float(fid.ssim_y(_t(a), _t(a))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_ssim_match_numpy_scipy_on_textured_images(seed: int) -> None:
    out, ref = _pair(seed)
    assert float(fid.psnr_y(_t(out), _t(ref))) == pytest.approx(_np_psnr(out, ref), abs=1e-6)
    ssim = float(fid.ssim_y(_t(out), _t(ref)))
    assert ssim == pytest.approx(_np_ssim(out, ref), abs=1e-7)
    assert 0.2 < ssim < 0.99  # a real, non-trivial value


def test_batch_gives_one_value_per_image() -> None:
    (o1, r1), (o2, r2) = _pair(3), _pair(4)
    out = torch.cat([_t(o1), _t(o2)])
    ref = torch.cat([_t(r1), _t(r2)])
    p, s = fid.psnr_y(out, ref), fid.ssim_y(out, ref)
    assert p.shape == s.shape == (2,)
    assert float(p[1]) == pytest.approx(_np_psnr(o2, r2), abs=1e-6)
    assert float(s[0]) == pytest.approx(_np_ssim(o1, r1), abs=1e-7)


def test_border_crop_removes_exactly_that_many_pixels_on_both_images() -> None:
    out, ref = _pair(5, 40, 36)
    b = 4
    spoiled = out.copy()
    spoiled[:b] = 0
    spoiled[-b:] = 255
    spoiled[:, :b] = 0
    spoiled[:, -b:] = 255
    inner = (slice(b, -b), slice(b, -b))
    assert float(fid.psnr_y(_t(spoiled), _t(ref), crop=b)) == pytest.approx(_np_psnr(out[inner], ref[inner]), abs=1e-6)
    assert float(fid.ssim_y(_t(spoiled), _t(ref), crop=b)) == pytest.approx(_np_ssim(out[inner], ref[inner]), 1e-7)
    # one pixel less crop sees the spoiled ring
    assert float(fid.psnr_y(_t(spoiled), _t(ref), crop=b - 1)) < _np_psnr(out[inner], ref[inner]) - 1.0
    assert float(fid.psnr_y(_t(spoiled), _t(ref))) == pytest.approx(_np_psnr(spoiled, ref), abs=1e-6)
    with pytest.raises(ValueError, match="leaves nothing"):
        fid.psnr_y(_t(out), _t(ref), crop=18)


def test_size_mismatch_rule() -> None:
    out, ref = _pair(6, 40, 36)
    bigger = np.concatenate([ref, ref[:3]], axis=0)  # 3 rows more than the output
    with pytest.raises(MegaSRInputError, match="36x40.*36x43"):
        fid.psnr_y(_t(out), _t(bigger))
    # the crop rule compares the top-left common region
    assert float(fid.psnr_y(_t(out), _t(bigger), size_rule="crop")) == pytest.approx(_np_psnr(out, ref), abs=1e-6)
    assert float(fid.ssim_y(_t(bigger), _t(out), size_rule="crop")) == pytest.approx(_np_ssim(ref, out), 1e-7)
    much_bigger = np.concatenate([ref, ref[:4]], axis=0)
    with pytest.raises(MegaSRInputError, match="4 px or more"):
        fid.psnr_y(_t(out), _t(much_bigger), size_rule="crop")
