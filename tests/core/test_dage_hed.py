"""DAGE HED extractor (ControlNetHED_Apache2 layout) on tiny widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dage_fixtures import TINY_HED_CONFIG, tiny_hed

from megasr.dage import dage_loss, load_extractor
from megasr.dage.hed import HedExtractor
from megasr.errors import WeightFileError
from megasr.weights import save_weight_file


@pytest.fixture(scope="module")
def hed():
    return tiny_hed()[0]


def test_odd_size_batch2_range_and_shape(hed):
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hed(x)
        out2 = hed(x, resolution=32)
    assert out.map.shape == (2, 1, 37, 53) and out2.map.shape == (2, 1, 37, 53)
    assert out.map.min() >= 0 and out.map.max() <= 1 and torch.isfinite(out.map).all()
    assert len(out.features) == 5 and out.features[0].shape[1] == TINY_HED_CONFIG["widths"][0]
    assert not torch.allclose(out.map, out2.map)  # resolution matters
    assert torch.allclose(out.map[1:], hed(x[1:]).map, atol=1e-5)  # batch items independent


def test_map_is_sigmoid_of_mean_side_outputs(hed):
    """Independent computation through controlnet_aux's own forward (five projections)."""
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        sides = hed.net(x * 255.0)  # resolution 48 = the short side: no resize
        out = hed(x, resolution=48)
    ups = [F.interpolate(s, size=(48, 64), mode="bilinear", align_corners=False) for s in sides]
    expect = torch.sigmoid(torch.stack(ups).mean(0))
    assert torch.allclose(out.map, expect, atol=1e-5)


def test_weight_file_round_trip(tmp_path, hed):
    p = str(tmp_path / "hed.safetensors")
    hed.save(p, {"run": "test"})
    loaded = load_extractor(p)
    assert isinstance(loaded, HedExtractor)
    x = torch.rand(1, 3, 21, 30)
    with torch.no_grad():
        assert torch.equal(loaded(x).map, hed(x).map)
    # a file with the wrong widths in its config does not fit its tensors
    bad = str(tmp_path / "bad.safetensors")
    save_weight_file(bad, hed.net.state_dict(), "dage_hed", {**TINY_HED_CONFIG, "widths": [4, 8, 8, 16, 32]})
    with pytest.raises(WeightFileError, match="shape mismatch"):
        HedExtractor.load(bad)


def test_load_original_pth(tmp_path, hed):
    p = str(tmp_path / "ControlNetHED.pth")
    torch.save(hed.net.state_dict(), p)
    fresh = HedExtractor.from_config(TINY_HED_CONFIG)
    fresh.load_original(p)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x).map, hed(x).map)


def test_dage_loss_trains_student_only():
    student, _ = tiny_hed(seed=1)
    teacher, _ = tiny_hed(seed=2)
    teacher.requires_grad_(False)
    hr = torch.rand(1, 3, 32, 32)
    lr = (hr + 0.1 * torch.randn_like(hr)).clamp(0, 1)
    losses = dage_loss("hed", student(lr), teacher(hr), output_weight=0.5)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
