"""Statistical tests of the Real-ESRGAN second-order degradation (training/degradations.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.degradations import (
    KERNEL_TYPES,
    DegradationConfig,
    DegradationPipeline,
    add_gaussian_noise,
    add_poisson_noise,
    circular_lowpass_kernel,
    jpeg,
    kernel_from_params,
    sample_blur_kernels,
    sample_final_sinc_kernels,
    sample_resize,
    usm_sharpen,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A real photo (bundled with scikit-image), 128x128 crop, [1, 3, H, W] in [0, 1]."""
    skdata = pytest.importorskip("skimage.data")
    img = skdata.astronaut()[100:228, 180:308]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def _moments(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean offset and covariance matrix of kernels [N, K, K] seen as distributions over pixel offsets."""
    size = k.shape[-1]
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    k = k.double()
    mx, my = (k * xx).sum((-2, -1)), (k * yy).sum((-2, -1))
    cxx = (k * (xx - mx.view(-1, 1, 1)) ** 2).sum((-2, -1))
    cyy = (k * (yy - my.view(-1, 1, 1)) ** 2).sum((-2, -1))
    cxy = (k * (xx - mx.view(-1, 1, 1)) * (yy - my.view(-1, 1, 1))).sum((-2, -1))
    cov = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    return torch.stack([mx, my], -1), cov


@pytest.mark.parametrize("stage", [1, 2])
def test_every_sampled_kernel_sums_to_one(stage: int) -> None:
    kernels, params = sample_blur_kernels(2000, DegradationConfig(), _gen(stage), stage=stage)
    assert kernels.shape == (2000, 21, 21)
    torch.testing.assert_close(kernels.double().sum((-2, -1)), torch.ones(2000, dtype=torch.float64), atol=1e-5, rtol=0)
    not_sinc = params["kind"] >= 0
    assert (kernels[not_sinc] >= 0).all()
    # kernels are zero outside their own (odd, 7..21) window
    sizes = params["size"]
    assert set(sizes.tolist()) == set(range(7, 22, 2))
    for i in range(50):
        pad = (21 - int(sizes[i])) // 2
        if pad:
            assert kernels[i, :pad].abs().sum() == 0 and kernels[i, :, -pad:].abs().sum() == 0


def test_isotropic_gaussian_variance_matches_sampled_sigma() -> None:
    cfg = DegradationConfig(kernel_min_size=21, kernel_types=("iso",), kernel_probs=(1.0,), sinc_prob=0.0)
    kernels, params = sample_blur_kernels(400, cfg, _gen(1))
    sigma = params["sigma_x"]
    assert (sigma >= 0.2).all() and (sigma <= 3.0).all()
    mean, cov = _moments(kernels)
    assert mean.abs().max() < 1e-4
    keep = sigma >= 0.6  # below this the kernel is essentially a pixel: the sampled variance is not sigma^2
    rel = (cov[keep, 0, 0] / sigma[keep] ** 2 - 1).abs()
    assert rel.max() < 0.03, float(rel.max())  # 21-tap truncation at sigma=3 loses about 1% of the variance
    torch.testing.assert_close(cov[:, 0, 0], cov[:, 1, 1], atol=1e-6, rtol=0)
    assert cov[:, 0, 1].abs().max() < 1e-6


def test_anisotropic_gaussian_covariance_matches_parameters() -> None:
    n = 64
    sx = torch.linspace(0.8, 2.5, n, dtype=torch.float64)
    sy = torch.linspace(2.2, 0.7, n, dtype=torch.float64)
    theta = torch.linspace(-math.pi, math.pi, n, dtype=torch.float64)
    k = kernel_from_params(torch.ones(n, dtype=torch.long), sx, sy, theta, torch.ones(n), torch.full((n,), 21))
    _, cov = _moments(k)
    eig = torch.linalg.eigvalsh(cov)
    expect = torch.sort(torch.stack([sx**2, sy**2], -1), -1).values
    assert ((eig / expect - 1).abs() < 0.03).all()


def test_generalized_and_plateau_kernels_sum_to_one_and_differ_from_gaussian() -> None:
    n = 3
    sig = torch.full((n,), 1.5, dtype=torch.float64)
    kinds = torch.tensor([0, 2, 4])
    k = kernel_from_params(kinds, sig, sig, torch.zeros(n), torch.tensor([1.0, 3.0, 1.5]), torch.full((n,), 21))
    torch.testing.assert_close(k.sum((-2, -1)), torch.ones(n, dtype=torch.float64))
    assert (k[1] - k[0]).abs().max() > 1e-3 and (k[2] - k[0]).abs().max() > 1e-3
    # generalized with beta = 1 is the gaussian
    k1 = kernel_from_params(torch.tensor([2]), sig[:1], sig[:1], torch.zeros(1), torch.ones(1), torch.tensor([21]))
    torch.testing.assert_close(k1[0], k[0])


def test_kernel_type_frequencies_match_probabilities() -> None:
    n = 6000
    cfg = DegradationConfig()
    _, params = sample_blur_kernels(n, cfg, _gen(7))
    kind = params["kind"]
    sinc_frac = float((kind < 0).double().mean())
    # sinc p = 0.1: binomial std = sqrt(.1*.9/6000) = 0.0039; allow 4 std
    assert abs(sinc_frac - 0.1) < 0.016, sinc_frac
    # kernel types are drawn independently of the sinc switch: test them on a sinc-free config
    _, params = sample_blur_kernels(n, DegradationConfig(sinc_prob=0.0), _gen(8))
    counts = torch.bincount(params["kind"], minlength=len(KERNEL_TYPES)).double()
    expected = torch.tensor(cfg.kernel_probs, dtype=torch.float64) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.52, (chi2, counts.tolist())  # chi-square critical value, 5 dof, p = 0.001


def test_sinc_kernels_sum_to_one_and_are_radially_symmetric() -> None:
    cutoff = torch.tensor([math.pi / 5, math.pi / 3, math.pi / 2, math.pi], dtype=torch.float64)
    k = circular_lowpass_kernel(cutoff, torch.tensor([21, 13, 9, 7]))
    torch.testing.assert_close(k.sum((-2, -1)), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(k, k.transpose(-1, -2))
    torch.testing.assert_close(k, k.flip(-1))
    assert (k[:, 10, 10] == k.amax((-2, -1))).all()
    assert (k < 0).any()  # ringing lobes
    final, use = sample_final_sinc_kernels(3000, DegradationConfig(), _gen(3))
    torch.testing.assert_close(final.double().sum((-2, -1)), torch.ones(3000, dtype=torch.float64), atol=1e-5, rtol=0)
    assert abs(float(use.double().mean()) - 0.8) < 0.03


@pytest.mark.parametrize(
    ("probs", "rng"), [((0.2, 0.7, 0.1), (0.15, 1.5)), ((0.3, 0.4, 0.3), (0.3, 1.2))], ids=["stage1", "stage2"]
)
def test_resize_draws_stay_in_range(probs: tuple[float, float, float], rng: tuple[float, float]) -> None:
    g = _gen(11)
    draws = [sample_resize(g, probs, rng) for _ in range(3000)]
    scales = torch.tensor([s for s, _ in draws], dtype=torch.float64)
    assert float(scales.min()) >= rng[0] and float(scales.max()) <= rng[1]
    up, down, keep = (scales > 1).double().mean(), (scales < 1).double().mean(), (scales == 1).double().mean()
    for got, want in zip((up, down, keep), probs, strict=True):
        assert abs(float(got) - want) < 0.035
    assert {m for _, m in draws} == {"area", "bilinear", "bicubic"}


def test_jpeg_changes_the_image_and_lower_quality_changes_it_more(photo: torch.Tensor) -> None:
    errors = []
    for q in (30.0, 50.0, 70.0, 95.0):
        out = jpeg(photo, torch.tensor([q]))
        assert out.shape == photo.shape and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
        errors.append(float((out - photo).abs().mean()))
    assert errors[-1] > 1e-3  # even quality 95 changes the image
    assert errors == sorted(errors, reverse=True), errors
    # per-image quality in one batch
    both = jpeg(photo.repeat(2, 1, 1, 1), torch.tensor([30.0, 95.0]))
    torch.testing.assert_close(both[0:1], jpeg(photo, torch.tensor([30.0])))


def test_gaussian_noise_std_matches_sigma_and_gray_noise_is_equal_across_channels() -> None:
    x = torch.full((4, 3, 128, 128), 0.5)
    sigma = torch.tensor([1.0, 10.0, 30.0, 20.0], dtype=torch.float64)
    gray = torch.tensor([False, False, True, True])
    out = add_gaussian_noise(x, sigma, gray, _gen(5))
    noise = out - x
    std = noise.flatten(1).std(1).double()
    assert ((std / (sigma / 255) - 1).abs() < 0.02).all(), (std * 255).tolist()
    assert torch.equal(noise[2, 0], noise[2, 1]) and torch.equal(noise[3, 1], noise[3, 2])
    assert not torch.equal(noise[1, 0], noise[1, 1])
    assert abs(float(noise.mean())) < 1e-3


def test_poisson_noise_gray_equal_across_channels_and_scales(photo: torch.Tensor) -> None:
    x = photo.repeat(3, 1, 1, 1)
    scale = torch.tensor([0.5, 2.0, 2.0], dtype=torch.float64)
    gray = torch.tensor([False, False, True])
    noise = add_poisson_noise(x, scale, gray, _gen(6)) - x
    torch.testing.assert_close(noise[2, 0], noise[2, 1], atol=1e-6, rtol=0)  # equal up to (x + n) - x rounding
    assert (noise[1, 0] - noise[1, 1]).abs().max() > 0.01
    s0, s1 = float(noise[0].std()), float(noise[1].std())
    assert 3.0 < s1 / s0 < 5.0  # std is proportional to the scale (4x), up to sampling noise
    assert abs(float(noise[1].mean())) < 0.01


def test_usm_sharpen_increases_edge_contrast_and_keeps_flat_regions() -> None:
    x = torch.full((1, 3, 96, 96), 0.3)
    x[..., 48:] = 0.7
    y = usm_sharpen(x)
    assert float(y[0, 0, 40, 47]) < 0.3 and float(y[0, 0, 40, 48]) > 0.7
    torch.testing.assert_close(y[..., :4], x[..., :4], atol=1e-3, rtol=0)
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize(("h", "w"), [(64, 64), (64, 96)])
def test_pipeline_output_size_range_and_8bit_grid(h: int, w: int, photo: torch.Tensor) -> None:
    hr = torch.nn.functional.interpolate(photo, size=(h, w), mode="bilinear").repeat(2, 1, 1, 1)
    pipe = DegradationPipeline()
    for seed in range(4):
        lr, hr_usm = pipe(hr, _gen(seed))
        assert lr.shape == (2, 3, h // 4, w // 4) and hr_usm.shape == hr.shape
        assert lr.min() >= 0 and lr.max() <= 1 and torch.isfinite(lr).all()
        torch.testing.assert_close(lr * 255, (lr * 255).round(), atol=1e-4, rtol=0)


def test_pipeline_is_bit_reproducible_for_a_seed(photo: torch.Tensor) -> None:
    hr = photo.repeat(2, 1, 1, 1)
    pipe = DegradationPipeline()
    a, a_usm = pipe(hr, _gen(123))
    b, b_usm = pipe(hr, _gen(123))
    c, _ = pipe(hr, _gen(124))
    assert torch.equal(a, b) and torch.equal(a_usm, b_usm)
    assert not torch.equal(a, c)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="kernel_probs"):
        DegradationConfig(kernel_probs=(0.5, 0.5, 0.0, 0.0, 0.0, 0.1))
    with pytest.raises(ValueError, match="blur_sigma2"):
        DegradationConfig(blur_sigma2=(2.0, 1.0))
    with pytest.raises(ValueError, match="kernel_types"):
        DegradationConfig(kernel_types=("box",), kernel_probs=(1.0,))
    with pytest.raises(KeyError, match="blur_sigm"):
        DegradationConfig.from_dict({"blur_sigm": [1, 2]})
    cfg = DegradationConfig.from_dict(DegradationConfig().to_dict())
    assert cfg == DegradationConfig()


def test_pipeline_ignores_autocast(photo: torch.Tensor) -> None:
    pipe = DegradationPipeline()
    plain, _ = pipe(photo, _gen(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = pipe(photo, _gen(5))
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


def test_shape_parameters_stay_in_range() -> None:
    _, p = sample_blur_kernels(4000, DegradationConfig(sinc_prob=0.0), _gen(21))
    kind, beta = p["kind"], p["beta"]
    gen_beta = beta[(kind == 2) | (kind == 3)]
    plat_beta = beta[(kind == 4) | (kind == 5)]
    assert ((gen_beta >= 0.5) & (gen_beta <= 4.0)).all() and ((plat_beta >= 1.0) & (plat_beta <= 2.0)).all()
    assert 0.4 < float((gen_beta < 1).double().mean()) < 0.6  # half the draws below 1
    aniso = (kind % 2) == 1
    assert (p["theta"][aniso].abs() <= math.pi).all() and (p["theta"][~aniso] == 0).all()
    assert torch.equal(p["sigma_x"][~aniso], p["sigma_y"][~aniso])
    assert ((p["sigma_x"] >= 0.2) & (p["sigma_x"] <= 3.0)).all()
    _, p2 = sample_blur_kernels(2000, DegradationConfig(sinc_prob2=0.0), _gen(22), stage=2)
    assert ((p2["sigma_x"] >= 0.2) & (p2["sigma_x"] <= 1.5)).all()
