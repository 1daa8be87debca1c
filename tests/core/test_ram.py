"""DAPE-equipped RAM (megasr/ram) against RAM's and SeeSR's own published code.

The fixture in tests/fixtures/ram was made by running SeeSR's ``ram_lora`` (RAM + DAPE LoRA) on a tiny
random configuration in the published layout (recipe: tests/fixtures/ram/README.md). These tests read it
with our code only: tags must be equal, logits and tokens equal to 1e-5, every key accounted for; the
full-size key list (from RAM's code, meta device) must match our module tree at full size; and a set of
plausible bugs must each break the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import megasr.ram.swin as swin
import megasr.ram.tagger as tagger
from megasr.errors import WeightFileError
from megasr.ram import RamOutput, seesr_prompt
from megasr.ram.config import SWIN_L_384, RamConfig, infer_config
from megasr.ram.loader import (
    TAG_LIST_FILE,
    THRESHOLD_FILE,
    load_ram,
    lora_deltas,
    ram_from_config,
    read_tag_list,
    read_thresholds,
    read_weight_file,
    select_ram_state,
)
from megasr.ram.tagger import RamModel

FX = Path(__file__).resolve().parents[1] / "fixtures" / "ram"
META = json.loads((FX / "outputs.json").read_text(encoding="utf-8"))
REF = load_file(str(FX / "outputs.safetensors"))
TOL = dict(atol=1e-5, rtol=1e-5)


def _image(name: str) -> torch.Tensor:
    arr = np.array(Image.open(FX / name).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0


IMAGES = [_image(n) for n in META["images"]]


def _load_fixture_model(**kw) -> RamModel:
    return load_ram(
        FX / "ram_tiny.safetensors",
        FX / "dape_tiny.safetensors",
        tag_names=read_tag_list(FX / "tags.txt"),
        thresholds=read_thresholds(FX / "thresholds.txt"),
        **kw,
    )


@pytest.fixture(scope="module")
def model() -> RamModel:
    return _load_fixture_model()


def _mismatches(m: RamModel, antialias: bool = False) -> list[str]:
    """What differs from the reference run (empty when everything matches)."""
    suffix = "_antialias" if antialias else ""
    bad = []
    for i, img in enumerate(IMAGES):
        out = m(img, antialias=antialias)
        if out.tag_text[0] != META[f"tag_text{suffix}"][i]:
            bad.append(f"image {i}: tags {out.tag_text[0]!r}")
        if not torch.allclose(out.logits, REF[f"logits{suffix}_{i}"], **TOL):
            bad.append(f"image {i}: logits off by {(out.logits - REF[f'logits{suffix}_{i}']).abs().max():.3g}")
        if not antialias and f"tokens_{i}" in REF and not torch.allclose(out.tokens, REF[f"tokens_{i}"], **TOL):
            bad.append(f"image {i}: tokens off by {(out.tokens - REF[f'tokens_{i}']).abs().max():.3g}")
    return bad


# --- against the reference implementation ---------------------------------------------------------------
def test_tags_logits_and_tokens_equal_seesr_ram(model: RamModel) -> None:
    assert _mismatches(model) == []
    for i, img in enumerate(IMAGES):
        out = model(img)
        assert isinstance(out, RamOutput)
        assert out.tokens.shape == (1, 145, 512) == (1, model.config.num_tokens, 512)
        assert out.tag_text[0] == META["tag_text"][i] and ", ".join(out.tags[0]) == out.tag_text[0]
        expected = [n for n, t in zip(model.tag_names, META["targets"][i], strict=True) if t]
        assert out.tags[0] == expected and len(expected) > 0
        if f"tokens_{i}" in REF:
            torch.testing.assert_close(out.tokens, REF[f"tokens_{i}"], **TOL)
    # the images were chosen so the tags differ between them (a per-image bug cannot hide)
    assert len(set(META["tag_text"])) == len(IMAGES)


def test_antialias_option_matches_torchvision_default(model: RamModel) -> None:
    # torchvision >= 0.17's Resize on tensors antialiases; SeeSR's pinned 0.15 did not (our default)
    assert _mismatches(model, antialias=True) == []
    # the downscaled image tells the two apart, so the default is really tested
    assert not torch.allclose(REF["logits_2"], REF["logits_antialias_2"], **TOL)


def test_batch_equals_single_images(model: RamModel) -> None:
    batch = torch.cat([F.interpolate(IMAGES[1], size=(150, 200)), IMAGES[1]])
    out = model(batch)
    assert out.tag_text[1] == META["tag_text"][1] and out.tag_text[0] == out.tag_text[1]
    torch.testing.assert_close(out.logits[1:], REF["logits_1"], **TOL)


# --- layout ---------------------------------------------------------------------------------------------
def test_fixture_keys_all_accounted_for() -> None:
    state = read_weight_file(FX / "ram_tiny.safetensors")
    used, report = select_ram_state(state)
    cfg = infer_config(used)
    assert cfg.depths == (2, 2, 2, 2) and cfg.num_heads == (1, 1, 2, 2) and cfg.embed_dim == 4
    assert cfg.num_classes == 40 and cfg.head_hidden_size == 16 and cfg.head_num_layers == 2
    m = RamModel(cfg, [f"t{i}" for i in range(40)], torch.full((40,), 0.5))
    result = m.load_state_dict(used, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert report.unexpected == [] and report.derived == []
    assert report.unused and all(k.startswith(("tag_encoder.", "text_decoder.")) for k in report.unused)

    dape = read_weight_file(FX / "dape_tiny.safetensors")
    deltas, dape_report = lora_deltas(dape, cfg.head_num_layers)
    assert dape_report.unexpected == [] and dape_report.missing == []
    assert sorted(dape_report.used + dape_report.unused) == sorted(dape)
    own = m.state_dict()
    assert deltas and all(k in own and own[k].shape == d.shape for k, d in deltas.items())
    # SeeSR's DAPE: q and v of every Swin qkv, q and k of each tagging-head cross-attention
    assert sum(k.endswith("attn.qkv.weight") for k in deltas) == sum(cfg.depths)
    assert sum(k.startswith("tagging_head.") for k in deltas) == 2 * cfg.head_num_layers


def test_pth_checkpoint_with_derived_buffers(tmp_path: Path, model: RamModel) -> None:
    # the published file is {"model": state_dict} with the Swin's derived buffers; read weights-only
    state = load_file(str(FX / "ram_tiny.safetensors"))
    state["visual_encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(144, 144, dtype=torch.long)
    state["visual_encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(64, 144, 144)
    torch.save({"model": state, "epoch": 3}, tmp_path / "ram.pth")
    torch.save(load_file(str(FX / "dape_tiny.safetensors")), tmp_path / "DAPE.pth")
    m = load_ram(
        tmp_path / "ram.pth",
        tmp_path / "DAPE.pth",
        tag_names=read_tag_list(FX / "tags.txt"),
        thresholds=read_thresholds(FX / "thresholds.txt"),
    )
    assert _mismatches(m) == []


def test_full_size_layout_matches_published_keys() -> None:
    published = {k: tuple(v) for k, v in json.loads((FX / "ram_swin_large_14m_keys.json").read_text()).items()}
    with torch.device("meta"):
        fake = {k: torch.empty(v) for k, v in published.items()}
        used, report = select_ram_state(fake)
        cfg = infer_config(used)
        assert cfg == SWIN_L_384
        m = RamModel(cfg, read_tag_list(), read_thresholds())
        ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in used.items()}
    assert all(k.endswith(("relative_position_index", "attn_mask")) for k in report.derived) and report.derived
    assert cfg.vision_width == 1536 and cfg.num_tokens == 145
    assert published["image_proj.weight"] == (512, 1536) and published["label_embed"] == (4585, 512)

    dape = {k: tuple(v) for k, v in json.loads((FX / "dape_keys.json").read_text()).items()}
    with torch.device("meta"):
        deltas, dape_report = lora_deltas({k: torch.empty(v) for k, v in dape.items()}, cfg.head_num_layers)
    assert dape_report.unexpected == [] and dape_report.missing == []
    assert all(ours[k] == tuple(d.shape) for k, d in deltas.items())
    assert sum(k.endswith("attn.qkv.weight") for k in deltas) == 24  # every Swin-L block
    assert dape["visual_encoder.layers.0.blocks.0.attn.qkv.lora_A"] == (16, 192)  # rank 8 x (q, v)


def test_shipped_tag_list_and_thresholds() -> None:
    names, th = read_tag_list(TAG_LIST_FILE), read_thresholds(THRESHOLD_FILE)
    assert len(names) == len(th) == SWIN_L_384.num_classes and len(set(names)) == len(names)
    assert names[:3] == ["3D CG rendering", "3D glasses", "abacus"]
    # 1.0 disables a class (sigmoid never exceeds it): RAM ships a few such rows
    assert float(th.min()) > 0.0 and float(th.max()) <= 1.0


def test_bad_files_are_named(tmp_path: Path) -> None:
    state = load_file(str(FX / "ram_tiny.safetensors"))
    del state["image_proj.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightFileError, match="broken.safetensors.*image_proj.weight"):
        load_ram(tmp_path / "broken.safetensors", tag_names=[f"t{i}" for i in range(40)], thresholds=[0.5] * 40)
    dape = load_file(str(FX / "dape_tiny.safetensors"))
    dape["visual_encoder.layers.0.blocks.0.mlp.fc1.lora_A"] = torch.zeros(8, 4)
    save_file(dape, str(tmp_path / "dape_odd.safetensors"))
    with pytest.raises(WeightFileError, match="dape_odd.safetensors.*fc1.lora_A"):
        load_ram(
            FX / "ram_tiny.safetensors",
            tmp_path / "dape_odd.safetensors",
            tag_names=[f"t{i}" for i in range(40)],
            thresholds=[0.5] * 40,
        )
    with pytest.raises(WeightFileError, match="pass the matching tag list"):
        load_ram(FX / "ram_tiny.safetensors")


# --- plausible bugs must fail the comparison --------------------------------------------------------------
def _transposed_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 4, 2, 5).reshape(-1, window * window, c)  # window rows/cols swapped


def _transposed_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 4, 2, 3, 5).reshape(b, h, w, c)


def _bicubic_preprocess(image, size=384, antialias=False):
    x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(tagger.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tagger.IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _no_tied_lora(dape, head_layers, alpha=1.0):
    return _ORIG_LORA_DELTAS({k: v for k, v in dape.items() if not k.startswith("tag_encoder.")}, head_layers, alpha)


_ORIG_LORA_DELTAS = lora_deltas


def _merge_swapped(self, x: torch.Tensor) -> torch.Tensor:
    h, w = self.resolution
    b, _, c = x.shape
    x = x.view(b, h, w, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]], dim=-1)  # (0,1)<->(1,0)
    return self.reduction(self.norm(x.view(b, -1, 4 * c)))


@pytest.mark.parametrize(
    "bug",
    [
        "merge_order",
        "transposed_window",
        "bicubic_resize",
        "antialias_default",
        "threshold_shift",
        "no_tied_lora",
        "no_dape",
    ],
)
def test_plausible_bug_breaks_the_match(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import megasr.ram.loader as loader

    kw: dict = {}
    antialias = False
    if bug == "merge_order":
        monkeypatch.setattr(swin.PatchMerging, "forward", _merge_swapped)
    elif bug == "transposed_window":
        monkeypatch.setattr(swin, "window_partition", _transposed_partition)
        monkeypatch.setattr(swin, "window_merge", _transposed_merge)
    elif bug == "bicubic_resize":
        monkeypatch.setattr(tagger, "preprocess", _bicubic_preprocess)
    elif bug == "threshold_shift":
        kw["thresholds"] = torch.roll(read_thresholds(FX / "thresholds.txt"), 1)
    elif bug == "no_tied_lora":
        monkeypatch.setattr(loader, "lora_deltas", _no_tied_lora)
    elif bug == "antialias_default":
        antialias = True
    if bug == "no_dape":
        m = load_ram(
            FX / "ram_tiny.safetensors",
            tag_names=read_tag_list(FX / "tags.txt"),
            thresholds=read_thresholds(FX / "thresholds.txt"),
        )
    else:
        thresholds = kw.pop("thresholds", read_thresholds(FX / "thresholds.txt"))
        m = load_ram(
            FX / "ram_tiny.safetensors",
            FX / "dape_tiny.safetensors",
            tag_names=read_tag_list(FX / "tags.txt"),
            thresholds=thresholds,
        )
    if antialias:
        # the reference (non-antialiased) compared with an antialiased run of the downscaled image
        out = m(IMAGES[2], antialias=True)
        assert not torch.allclose(out.logits, REF["logits_2"], **TOL)
        return
    assert _mismatches(m) != []


# --- small pieces ---------------------------------------------------------------------------------------
def test_seesr_prompt_is_character_exact() -> None:
    assert seesr_prompt("cat, dog") == "cat, dog, ,clean, high-resolution, 8k"
    assert seesr_prompt("cat", "a photo", "") == "cat, a photo,"


def test_from_config_any_input_size() -> None:
    cfg = RamConfig(embed_dim=4, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), head_hidden_size=16,
                    head_intermediate_size=24, num_classes=7)  # fmt: skip
    m = ram_from_config(cfg, seed=1)
    for h, w in [(17, 33), (384, 384), (500, 260)]:
        out = m(torch.rand(2, 3, h, w))
        assert out.tokens.shape == (2, 145, 512) and out.logits.shape == (2, 7)
        assert len(out.tags) == len(out.tag_text) == 2
    with pytest.raises(ValueError, match="RGB"):
        m(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="0..1"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch sizes"):
        RamOutput(tags=[[]], tag_text=["", ""], tokens=torch.zeros(1, 3, 512))


def test_registry_row() -> None:
    from megasr.dage import kinds

    row = kinds.lookup("ram")
    assert row.component == "ram_dape" and row.extractor_class() is RamModel
    assert not row.is_trained and not row.is_map and row.lora
    # RAM is no DAGE: training stages, DAGE components and the DAGE Loader's choices stay the four DAGEs
    assert "ram_dape" not in kinds.DAGE_COMPONENTS and None not in kinds.DAGE_STAGES
    assert None not in kinds.BY_NODE_CHOICE and len(kinds.DAGE_STAGES) == 4
    assert kinds.registry_json()["kinds"][-1]["kind"] == "ram"
