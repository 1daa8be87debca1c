"""megasr.colorfix against its definitions (AdaIN statistics, wavelet band split), on small tensors."""

from __future__ import annotations

import pytest
import torch

from megasr.colorfix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decompose


def _imgs(seed: int = 0, hw: tuple[int, int] = (24, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, *hw, generator=g) * 0.5 + 0.3
    reference = torch.rand(2, 3, hw[0] // 2, hw[1] // 2, generator=g) * 0.3 + 0.1
    return target, reference


def test_adain_takes_reference_statistics() -> None:
    target, reference = _imgs()
    out = adain_color_fix(target, reference)
    ref = torch.nn.functional.interpolate(reference, size=target.shape[-2:], mode="bicubic", align_corners=False)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), ref.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1)), ref.std(dim=(-2, -1)), atol=1e-4, rtol=1e-3)


def _reference_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The a-trous level written out by hand: (1 2 1)/4 in each direction, taps ``radius`` apart, edges replicated."""
    xp = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    for dy, wy in ((-1, 1.0), (0, 2.0), (1, 1.0)):
        for dx, wx in ((-1, 1.0), (0, 2.0), (1, 1.0)):
            y0, x0 = radius + dy * radius, radius + dx * radius
            out = out + wy * wx / 16.0 * xp[..., y0 : y0 + h, x0 : x0 + w]
    return out


def test_wavelet_bands_follow_the_a_trous_definition() -> None:
    """Catches a wrong kernel, a wrong dilation per level (2**i) or a wrong level count.

    ``high + low == x`` holds for any blur (the sum telescopes), so the bands themselves are checked
    against the hand-written a-trous recursion, and two signals with known answers pin the kernel:
    a constant has no detail, and the Nyquist checkerboard is removed entirely by the first level.
    """
    target, _ = _imgs(1)
    high, low = wavelet_decompose(target, levels=3)
    expected_low = target
    for i in range(3):
        expected_low = _reference_blur(expected_low, 2**i)
    torch.testing.assert_close(low, expected_low, atol=1e-6, rtol=0)
    torch.testing.assert_close(high, target - expected_low, atol=1e-6, rtol=0)

    flat = torch.full((1, 3, 16, 16), 0.37)
    flat_high, flat_low = wavelet_decompose(flat)
    assert flat_high.abs().max() < 1e-6 and (flat_low - 0.37).abs().max() < 1e-6
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((yy + xx) % 2).float().expand(1, 3, 16, 16)
    _, checker_low = wavelet_decompose(checker, levels=1)
    interior = checker_low[..., 2:-2, 2:-2]
    torch.testing.assert_close(interior, torch.full_like(interior, 0.5), atol=1e-6, rtol=0)


def test_wavelet_fix_takes_detail_from_target_and_colour_from_reference() -> None:
    """Catches swapped bands (detail from the LR, colour from the SR) in ``wavelet_color_fix``."""
    target, reference = _imgs(1)
    out = wavelet_color_fix(target, reference)
    t_high, _ = wavelet_decompose(target)
    ref_up = torch.nn.functional.interpolate(reference, size=target.shape[-2:], mode="bicubic", align_corners=False)
    _, r_low = wavelet_decompose(ref_up)
    torch.testing.assert_close(out, t_high + r_low, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["adain", "wavelet"])
def test_color_fix_clamps_what_the_correction_pushes_out_of_range(mode: str) -> None:
    """Catches a removed clamp: the inputs are built so the raw correction leaves [0, 1] on both sides."""
    g = torch.Generator().manual_seed(3)
    target = torch.rand(1, 3, 32, 32, generator=g) ** 4  # skewed: its bright tail lands above 1 after AdaIN
    reference = torch.rand(1, 3, 16, 16, generator=g) * 0.9 + 0.05  # wide colour spread
    raw = adain_color_fix(target, reference) if mode == "adain" else wavelet_color_fix(target, reference)
    assert raw.min() < 0.0 or raw.max() > 1.0, "the case must need the clamp"
    out = color_fix(target, reference, mode)
    torch.testing.assert_close(out, raw.clamp(0.0, 1.0), atol=0, rtol=0)


def test_color_fix_none_is_the_identity() -> None:
    target, reference = _imgs(2)
    assert torch.equal(color_fix(target, reference, "none"), target)


def test_color_fix_rejects_unknown_mode() -> None:
    target, reference = _imgs()
    with pytest.raises(ValueError, match="unknown colour fix"):
        color_fix(target, reference, "histogram")
