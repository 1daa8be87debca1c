"""DAGE depth extractor: Depth-Anything layout with a tiny DINOv2, LoRA r=8, SILog."""

from __future__ import annotations

import pytest
import torch
from dage_fixtures import TINY_DEPTH_CONFIG, tiny_depth, write_dage_weight_files
from safetensors.torch import save_file

from megasr.dage import dage_loss, load_extractor
from megasr.dage.depth import DEPTH_ANYTHING_V2_SMALL_CONFIG, DepthExtractor, build_depth_config, silog_loss
from megasr.errors import WeightFileError


@pytest.fixture(scope="module")
def depth():
    return tiny_depth()[0]


def test_odd_size_batch2_range_and_shape(depth):
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = depth(x)
        out_hi = depth(x, resolution=70)
    assert out.map.shape == (2, 1, 37, 53) and out_hi.map.shape == (2, 1, 37, 53)
    for b in range(2):  # normalised per image
        assert out.map[b].min() == 0 and out.map[b].max() == 1
    assert out.raw.shape == (2, 1, 56, 84) and (out.raw >= 0).all()  # at the working size (short side 56)
    assert len(out.features) == TINY_DEPTH_CONFIG["depth_anything"]["backbone_config"]["num_hidden_layers"]


def test_only_lora_trainable_on_backbone_attention(depth):
    trainable = [n for n, p in depth.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(".backbone.encoder.layer." in n and ".attention." in n for n in trainable)
    projections = {n.split(".attention.")[1].split(".")[0] for n in trainable}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj"}
    state = depth.lora_state()
    a = next(v for k, v in state.items() if k.endswith("lora_A.weight"))
    assert a.shape[0] == 8  # r = 8
    assert all(".default" not in k for k in state)


def test_lora_file_round_trip_with_base_file(tmp_path, depth):
    paths = write_dage_weight_files(str(tmp_path), ("dage_depth_lora",))
    loaded = load_extractor(paths["dage_depth_lora"], base_path=paths["depth_base"])
    assert isinstance(loaded, DepthExtractor)
    x = torch.rand(1, 3, 29, 41)
    with torch.no_grad():
        assert torch.allclose(loaded(x).raw, depth(x).raw, atol=0, rtol=0)
    # the file holds only the LoRA (small) and the base config
    from megasr.weights import read_weight_header

    info = read_weight_header(paths["dage_depth_lora"])
    assert all(".lora_" in k for k in info.tensors)
    assert info.config["depth_anything"]["backbone_config"]["hidden_size"] == 32
    # wrong base: LoRA shapes cannot match another backbone width
    other_cfg = {**TINY_DEPTH_CONFIG["depth_anything"]}
    other_cfg["backbone_config"] = {**other_cfg["backbone_config"], "hidden_size": 48}
    other = DepthExtractor.from_config({**TINY_DEPTH_CONFIG, "depth_anything": other_cfg})
    with pytest.raises(WeightFileError, match="shape mismatch"):
        other.set_lora_state(depth.lora_state(), "x.safetensors")


def test_base_with_transformers4_key_names_is_converted(tmp_path, depth):
    """A Depth-Anything checkpoint with 4.x attention names loads through from_pretrained."""
    old = {}
    for k, v in depth.base_state().items():
        k = k.replace("attention.q_proj", "attention.attention.query").replace(
            "attention.k_proj", "attention.attention.key"
        )
        k = k.replace("attention.v_proj", "attention.attention.value").replace(
            "attention.o_proj", "attention.output.dense"
        )
        old[k] = v.contiguous()
    assert any("attention.attention.query" in k for k in old)
    p = str(tmp_path / "old.safetensors")
    save_file(old, p)
    m = DepthExtractor.from_base(p, TINY_DEPTH_CONFIG["depth_anything"])
    m.set_lora_state(depth.lora_state())
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(m(x, 56).raw, depth(x, 56).raw, rtol=1e-5, atol=1e-7)


def test_silog():
    p = torch.rand(2, 1, 8, 8) + 0.1
    assert silog_loss(p, p) < 1e-5
    t = torch.rand(2, 1, 8, 8) + 0.1
    # lambda 1: fully scale-invariant
    assert torch.allclose(silog_loss(3 * p, t, lambd=1.0), silog_loss(p, t, lambd=1.0), atol=1e-5)
    d = torch.log(p + 1e-6) - torch.log(t + 1e-6)
    d = d.flatten(1)
    ref = torch.sqrt((d**2).mean(1) - 0.5 * d.mean(1) ** 2).mean()
    assert torch.allclose(silog_loss(p, t), ref, atol=1e-6)
    pr = p.clone().requires_grad_(True)
    silog_loss(pr, t).backward()
    assert torch.isfinite(pr.grad).all()


def test_dage_loss_reaches_only_lora():
    student, _ = tiny_depth(seed=0)
    teacher, _ = tiny_depth(seed=0, lora_nonzero=False)
    teacher.requires_grad_(False)
    hr = torch.rand(1, 3, 28, 28)
    losses = dage_loss("depth", student(hr * 0.9), teacher(hr))
    losses["loss"].backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


def test_real_config_builds():
    cfg = build_depth_config(DEPTH_ANYTHING_V2_SMALL_CONFIG)
    assert cfg.backbone_config.hidden_size == 384 and cfg.backbone_config.reshape_hidden_states is False
    assert cfg.neck_hidden_sizes == [48, 96, 192, 384]


def test_base_from_transformers_folder(tmp_path, depth):
    from transformers import DepthAnythingForDepthEstimation

    from megasr.dage.depth import build_depth_config

    plain = DepthAnythingForDepthEstimation(build_depth_config(TINY_DEPTH_CONFIG["depth_anything"]))
    plain.load_state_dict(depth.base_state())
    plain.save_pretrained(str(tmp_path / "da"))
    m = DepthExtractor.from_base(str(tmp_path / "da")).eval()
    m.set_lora_state(depth.lora_state())
    x = torch.rand(1, 3, 28, 42)
    with torch.no_grad():
        assert torch.allclose(m(x, 56).raw, depth(x, 56).raw, rtol=1e-5, atol=1e-7)
    with pytest.raises(WeightFileError, match="no model.safetensors"):
        DepthExtractor.from_base(str(tmp_path))
