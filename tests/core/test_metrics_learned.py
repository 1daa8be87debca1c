"""Learned metrics (megasr/metrics/lpips.py, the registry's file handling).

Catches: a key layout that differs from the published ``lpips`` package (its weights would not load), a backbone
that is not torchvision's (index-preserving slices), a missing weight file that crashes instead of one line, a
distance that is not zero for equal images or ignores the lin weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from megasr.metrics import MetricUnavailable, compute_metrics
from megasr.metrics.lpips import LPIPS, combine_parts, load_lpips

# the published lpips v0.1 linear layers: lin{i}.model.1.weight, [1, C, 1, 1] (model.0 is a Dropout)
LIN_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# index of each torchvision conv in features -> lpips slice
SLICE_OF = {
    "alex": {0: 1, 3: 2, 6: 3, 8: 4, 10: 5},
    "vgg": {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5},
}


def _published_keys(net: str, tv: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    keys = {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(LIN_CHANNELS[net])}
    keys.update({"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)})
    for k, v in tv.features.state_dict().items():
        idx, what = k.split(".")
        keys[f"net.slice{SLICE_OF[net][int(idx)]}.{idx}.{what}"] = tuple(v.shape)
    return keys


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_layout_is_the_published_one(net: str) -> None:
    tv = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    ours = {k: tuple(v.shape) for k, v in LPIPS(net).state_dict().items()}
    assert ours == _published_keys(net, tv)


def test_loads_from_random_parts_with_zero_missing_or_unexpected_keys_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.alexnet()  # random init, torchvision's own layout (incl. classifier keys, dropped)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LIN_CHANNELS["alex"])}
    full = combine_parts(lin, tv.state_dict())
    save_file(full, str(tmp_path / "lpips_alex.safetensors"))
    model = load_lpips(tmp_path / "lpips_alex.safetensors")
    assert torch.equal(getattr(model.net.slice3, "6").weight, tv.features[6].weight)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    d = model(a, b)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(model(a, a), torch.zeros(2), atol=1e-7)
    model.lin2.model[1].weight.data.zero_()
    assert (model(a, b) < d).all()  # the lin weights count

    # lin-only file (as the package ships it): one line saying what is missing and how to combine
    save_file(lin, str(tmp_path / "lin_only.safetensors"))
    with pytest.raises(MetricUnavailable, match="missing key.*combine_parts"):
        load_lpips(tmp_path / "lin_only.safetensors")


def test_missing_weight_file_is_a_one_line_skip_and_other_metrics_run(caplog) -> None:
    a = torch.rand(1, 3, 32, 32)
    res = compute_metrics(["psnr", "lpips", "ssim"], a, a, folders=["/nonexistent/metrics"])
    assert set(res.values) == {"psnr", "ssim"}
    line = res.skipped["lpips"]
    assert "\n" not in line and "lpips_alex.safetensors" in line and "/nonexistent/metrics" in line
    assert "python -m megasr fetch --eval" in line
    assert sum("lpips_alex.safetensors" in r.getMessage() for r in caplog.records) == 1


def test_conversion_command_writes_a_loadable_file(tmp_path: Path) -> None:
    from megasr.metrics.lpips import main

    torch.manual_seed(1)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LIN_CHANNELS["alex"])}
    torch.save(lin, tmp_path / "alex.pth")  # the package ships a .pth, read with weights_only=True
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet-owt.pth")
    out = tmp_path / "metrics" / "lpips_alex.safetensors"
    args = ["--lin", str(tmp_path / "alex.pth"), "--backbone", str(tmp_path / "alexnet-owt.pth"), "--output", str(out)]
    assert main(args) == 0
    a = torch.rand(1, 3, 32, 32)
    res = compute_metrics(["lpips"], a, torch.rand(1, 3, 32, 32), folders=[out.parent])
    assert not res.skipped and res.values["lpips"][0] > 0


def test_dists_layout_loads_from_random_parts_and_runs(tmp_path: Path) -> None:
    from megasr.metrics.dists import CHANNELS, DISTS, combine_parts, load_dists

    torch.manual_seed(2)
    vgg = torchvision.models.vgg16()
    ours = DISTS().state_dict()
    # every torchvision conv lands in its stage under its own index; L2 pooling filters where the pools were
    convs = {k for k in vgg.features.state_dict()}
    assert {k.split(".", 1)[1] for k in ours if k.startswith("stage") and not k.endswith("filter")} == convs
    assert sorted(k for k in ours if k.endswith("filter")) == [
        f"stage{n}.{i}.filter" for n, i in ((2, 4), (3, 9), (4, 16), (5, 23))
    ]
    assert ours["alpha"].shape == ours["beta"].shape == (1, sum(CHANNELS), 1, 1) == (1, 1475, 1, 1)
    ab = {"alpha": torch.rand(1, 1475, 1, 1), "beta": torch.rand(1, 1475, 1, 1)}
    save_file(combine_parts(ab, vgg.state_dict()), str(tmp_path / "dists_vgg16.safetensors"))
    model = load_dists(tmp_path / "dists_vgg16.safetensors")
    a, b = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    d = model(a, b)
    assert d.shape == (2,) and (d > 0).all() and (d < 1).all()
    assert torch.allclose(model(a, a), torch.zeros(2), atol=1e-5)
    res = compute_metrics(["dists", "lpips"], a[:1], b[:1], folders=[tmp_path])
    assert res.values["dists"][0] == pytest.approx(float(d[0]), abs=1e-5)
    assert "lpips_alex.safetensors" in res.skipped["lpips"]  # the other learned metric, missing: one line
    save_file(ab, str(tmp_path / "only_ab.safetensors"))
    with pytest.raises(MetricUnavailable, match="missing key"):
        load_dists(tmp_path / "only_ab.safetensors")
