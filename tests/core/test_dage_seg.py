"""DAGE segmentation extractor: Mask2Former with a tiny Swin, semantic combination, pluggability."""

from __future__ import annotations

import pytest
import torch
from dage_fixtures import TINY_SEG_CONFIG, tiny_seg, write_dage_weight_files

from megasr.dage import dage_loss, load_extractor
from megasr.dage.common import upsample_labels
from megasr.dage.encodings import seg_labels_to_image
from megasr.dage.seg import (
    MASK2FORMER_SWIN_TINY_ADE_CONFIG,
    SegExtractor,
    Segmentor,
    build_mask2former_config,
    register_segmentor,
    semantic_scores,
)
from megasr.errors import WeightFileError
from megasr.weights import save_weight_file


@pytest.fixture(scope="module")
def seg():
    return tiny_seg()[0]


def test_odd_size_batch2_labels_and_scores(seg):
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = seg(x)
    assert out.map.shape == (2, 37, 53) and out.map.dtype == torch.long
    assert out.map.min() >= 0 and out.map.max() < 150
    # scores stay at the working size (short side 64, multiple of 32); labels are upsampled by nearest neighbour
    assert out.raw.shape == (2, 150, 64, 96) and (out.raw >= 0).all()
    assert torch.equal(out.map, upsample_labels(out.raw.argmax(1), (37, 53)))
    assert len(out.features) == 4 + 3 + 1  # Swin stages, pixel-decoder levels, mask features
    img = seg_labels_to_image(out.map)
    assert img.shape == (2, 37, 53, 3)


def test_semantic_scores_equation():
    g = torch.Generator().manual_seed(3)
    cls = torch.randn(2, 5, 4 + 1, generator=g)  # 5 queries, 4 classes + no-object
    masks = torch.randn(2, 5, 3, 6, generator=g)
    got = semantic_scores(cls, masks)
    ref = torch.zeros(2, 4, 3, 6)
    for b in range(2):
        p = torch.softmax(cls[b], -1)
        for k in range(4):
            for q in range(5):
                ref[b, k] += p[q, k] * torch.sigmoid(masks[b, q])
    assert torch.allclose(got, ref, atol=1e-6)
    up = semantic_scores(cls, masks, (7, 11))
    assert up.shape == (2, 4, 7, 11)
    assert torch.allclose(semantic_scores(cls, masks, (7, 11), query_chunk=2), up, atol=1e-6)


def test_weight_file_round_trip(tmp_path, seg):
    paths = write_dage_weight_files(str(tmp_path), ("dage_seg",))
    loaded = load_extractor(paths["dage_seg"])
    assert isinstance(loaded, SegExtractor)
    x = torch.rand(1, 3, 33, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x).raw, seg(x).raw)
    bad = str(tmp_path / "bad.safetensors")
    cfg = {**TINY_SEG_CONFIG, "mask2former": {**TINY_SEG_CONFIG["mask2former"], "num_queries": 9}}
    save_weight_file(bad, seg.segmentor.state_dict(), "dage_seg", cfg)
    with pytest.raises(
        WeightFileError, match=r"2 shape mismatches: .*queries_embedder.weight \(file \[8, 32\], model \[9, 32\]\)"
    ):
        SegExtractor.load(bad)


def test_base_with_legacy_swin_names(tmp_path, seg):
    from safetensors.torch import save_file

    old = {}
    for k, v in seg.segmentor.model.state_dict().items():
        if "pixel_level_module.encoder." in k:
            k = k.replace("attention.q_proj", "attention.self.query").replace("attention.k_proj", "attention.self.key")
            k = k.replace("attention.v_proj", "attention.self.value").replace(
                "attention.o_proj", "attention.output.dense"
            )
            k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        old[k] = v.contiguous()
    p = str(tmp_path / "m2f.safetensors")
    save_file(old, p)
    m = SegExtractor.from_base(p, TINY_SEG_CONFIG["mask2former"], resolution=64).eval()
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(m(x).raw, seg(x).raw, atol=1e-6)
    # a base file lacking weights is refused, never loaded half random
    del old[next(k for k in old if "intermediate.dense" in k)]
    save_file(old, p)
    with pytest.raises(WeightFileError, match="missing key"):
        SegExtractor.from_base(p, TINY_SEG_CONFIG["mask2former"])


class ToySegmentor(torch.nn.Module):
    size_multiple = 8
    num_classes = 150

    def __init__(self, config):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 150, 3, padding=1)

    def segment(self, pixels, out_size):
        f = self.conv(pixels)
        return torch.nn.functional.interpolate(f, size=out_size, mode="bilinear").softmax(1), [f]

    def segmentor_config(self):
        return {}


def test_pluggable_segmentor(tmp_path):
    register_segmentor("toy", ToySegmentor)
    assert isinstance(ToySegmentor({}), Segmentor)
    ex = SegExtractor.from_config({"segmentor": "toy", "resolution": 16})
    x = torch.rand(2, 3, 13, 9)
    out = ex(x)
    assert out.map.shape == (2, 13, 9)
    p = str(tmp_path / "toy.safetensors")
    ex.save(p)
    back = SegExtractor.load(p)
    assert torch.equal(back(x).map, out.map)
    with pytest.raises(TypeError, match="Segmentor protocol"):
        SegExtractor(torch.nn.Linear(1, 1))


def test_dage_loss_full_finetune():
    student, _ = tiny_seg(seed=0)
    teacher, _ = tiny_seg(seed=0)
    teacher.requires_grad_(False)
    hr = torch.rand(1, 3, 32, 32)
    losses = dage_loss("seg", student(hr * 0.8), teacher(hr))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert sum(p.grad is not None for p in student.parameters()) > 0.8 * len(list(student.parameters()))


def test_real_config_builds():
    cfg = build_mask2former_config(MASK2FORMER_SWIN_TINY_ADE_CONFIG)
    assert cfg.num_labels == 150 and cfg.backbone_config.embed_dim == 96
