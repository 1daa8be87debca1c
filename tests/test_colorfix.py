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


def test_wavelet_decomposition_is_exact_and_fix_keeps_target_detail() -> None:
    target, reference = _imgs(1)
    high, low = wavelet_decompose(target)
    torch.testing.assert_close(high + low, target, atol=1e-6, rtol=0)
    out = wavelet_color_fix(target, reference)
    out_high, _ = wavelet_decompose(out)
    # The detail band of the result is close to the target's (the low band of the reference adds little detail).
    assert (out_high - high).abs().mean() < 0.5 * high.abs().mean()


@pytest.mark.parametrize("mode", ["adain", "wavelet", "none"])
def test_color_fix_modes_stay_in_range(mode: str) -> None:
    target, reference = _imgs(2)
    out = color_fix(target, reference, mode)
    assert out.shape == target.shape
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    if mode == "none":
        assert torch.equal(out, target)


def test_color_fix_rejects_unknown_mode() -> None:
    target, reference = _imgs()
    with pytest.raises(ValueError, match="unknown colour fix"):
        color_fix(target, reference, "histogram")
