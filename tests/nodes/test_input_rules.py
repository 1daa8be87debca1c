"""Inputs checked, never silently changed (issue 18): seg palette snapping, one value-range rule, stacked fusions."""

from __future__ import annotations

import logging

import pytest
import torch
from megasr_fixtures import MEGASR_NAME, fusion_args, megasr_env

WHERE = "MegaSR MS-GAM Guidance Fusion"


@pytest.fixture(scope="module")
def fusion(comfy_runner, tiny_sd2_ckpt, object_info):
    """The real node classes as ComfyUI registered them, plus the arguments a minimal fusion needs."""
    megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    import nodes

    megasr = nodes.NODE_CLASS_MAPPINGS["MegaSRModelLoader"].execute(MEGASR_NAME).args[0]
    args = fusion_args(megasr)
    return nodes.NODE_CLASS_MAPPINGS["MegaSRGuidanceFusion"], args


def _labels(h: int = 6, w: int = 8) -> torch.Tensor:
    return torch.randint(0, 150, (1, h, w), generator=torch.Generator().manual_seed(1))


def test_seg_map_is_snapped_to_the_palette_and_on_palette_is_bit_exact(fusion, caplog):
    """Catches a node that feeds off-palette seg colours to MS-GAM raw (the issue's finding), one that snaps
    to the wrong class (compared against the palette colour of the known label), one that alters clean
    palette maps at all (bit-exact), and a missing or wrong off-palette count in the log."""
    from megasr.dage.encodings import palette_tensor, seg_labels_to_image

    node, args = fusion
    labels = _labels()
    clean = seg_labels_to_image(labels)
    lr = torch.rand(1, 6, 8, 3, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.INFO, logger="megasr"):
        pos, _ = node.execute(lr_image=lr, seg=clean, **args).args
    got = pos[0][1]["control"].maps["seg"]
    assert torch.equal(got, clean.movedim(-1, 1))
    assert not any("off the ADE20K palette" in r.getMessage() for r in caplog.records)

    caplog.clear()
    noisy = clean.clone()
    noisy[0, :2] += 3.0 / 255.0  # two rows off-palette (a resized or hand-painted map), still nearest its class
    noisy = noisy.clamp(0, 1)
    off = int((noisy != clean).any(-1).sum())
    assert off > 0
    with caplog.at_level(logging.INFO, logger="megasr"):
        pos, _ = node.execute(lr_image=lr, seg=noisy, **args).args
    got = pos[0][1]["control"].maps["seg"]
    assert torch.equal(got, palette_tensor()[labels].movedim(-1, 1))
    msgs = [r.getMessage() for r in caplog.records if "off the ADE20K palette" in r.getMessage()]
    assert len(msgs) == 1 and f"{off} of 48 pixels" in msgs[0] and WHERE in msgs[0]


def test_value_range_rule_unit(caplog):
    """Catches a helper that clamps 0..255 floats to 1 (washed out, the issue's finding), one that treats
    resampling overshoot (1.1) as 0..255 (a black image), and one that lets >255, negative or NaN through;
    every refusal names the node and the input."""
    from megasr.errors import MegaSRInputError
    from megasr.images import as_rgb_image

    x = torch.rand(1, 4, 5, 3, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="megasr"):
        got = as_rgb_image(x * 255.0, "Node A", "image")
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)
    assert any(
        "Node A" in r.getMessage() and "'image'" in r.getMessage() and "0..255" in r.getMessage()
        for r in caplog.records
    )
    over = x.clone()
    over[0, 0, 0] = 1.1
    assert torch.equal(as_rgb_image(over, "Node A", "image"), over.clamp(0, 1))
    for bad, word in ((x * 300.0, "255"), (x - 0.5, "negative"), (x * float("nan"), "NaN")):
        with pytest.raises(MegaSRInputError) as e:
            as_rgb_image(bad, "Node A", "lr_image")
        assert "Node A" in str(e.value) and "'lr_image'" in str(e.value) and word in str(e.value)


def test_saturated_image_warns_about_16_bit_png(caplog):
    """Catches a pack that passes a saturated (all-white, as a 16-bit PNG through core Load Image arrives)
    image on without a hint, and one that warns on an ordinary bright image."""
    from megasr.images import as_rgb_image

    with caplog.at_level(logging.WARNING, logger="megasr"):
        as_rgb_image(torch.ones(1, 3, 3, 3), "Node B", "lr_image")
        almost = torch.ones(1, 3, 3, 3)
        almost[0, 1, 1, 2] = 0.99
        as_rgb_image(almost, "Node B", "hed")
    msgs = [r.getMessage() for r in caplog.records if "16-bit PNG" in r.getMessage()]
    assert len(msgs) == 1 and "'lr_image'" in msgs[0] and "Node B" in msgs[0]


def test_fusion_reads_0_255_float_image_and_map_by_the_rule(fusion):
    """Through the real node: a 0..255 float LR image and HED map reach the ControlNet as the 0..1 image
    (not clamped to white), and an out-of-range map is refused naming the node and 'depth'."""
    node, args = fusion
    g = torch.Generator().manual_seed(4)
    lr, hed = torch.rand(1, 6, 8, 3, generator=g), torch.rand(1, 6, 8, 3, generator=g)
    pos, _ = node.execute(lr_image=lr * 255.0, hed=hed * 255.0, **args).args
    control = pos[0][1]["control"]
    torch.testing.assert_close(control.cond_hint_original, lr.movedim(-1, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(control.maps["hed"], hed.mean(-1, keepdim=True).movedim(-1, 1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError) as e:  # the pack's own MegaSRInputError (imported under ComfyUI's module name)
        node.execute(lr_image=lr, hed=hed * 1000.0, **args)
    assert type(e.value).__name__ == "MegaSRInputError" and WHERE in str(e.value) and "'hed'" in str(e.value)
    # depth has its own documented rule: any other float range (relative depth 0..6.96, metres) is min-max normalised
    depth = hed * 6.96
    pos, _ = node.execute(lr_image=lr, depth=depth, **args).args
    want = ((depth - depth.min()) / (depth.max() - depth.min())).mean(-1, keepdim=True).movedim(-1, 1)
    torch.testing.assert_close(pos[0][1]["control"].maps["depth"], want, rtol=0, atol=1e-6)


def test_stacked_fusion_is_refused_anywhere_in_the_chain(fusion):
    """Catches a second MS-GAM Guidance Fusion silently applying the MegaSR ControlNet twice (the issue's
    finding: output moved by 0.90), also when a core ControlNet sits between the two, and a check that names
    the wrong input; a core ControlNet alone before the fusion still stacks."""
    import comfy.controlnet
    from megasr_fixtures import ensure_tiny_controlnet

    node, args = fusion
    lr = torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(5))
    pos, neg = node.execute(lr_image=lr, **args).args
    for name, overrides in (("positive", {"positive": pos}), ("negative", {"negative": neg})):
        with pytest.raises(ValueError) as e:
            node.execute(lr_image=lr, **{**args, **overrides})
        assert type(e.value).__name__ == "MegaSRInputError" and WHERE in str(e.value)
        assert f"'{name}'" in str(e.value) and "twice" in str(e.value)

    core = comfy.controlnet.load_controlnet(str(ensure_tiny_controlnet()))
    core = core.copy().set_cond_hint(lr.movedim(-1, 1), 1.0, (0.0, 1.0))
    core.set_previous_controlnet(pos[0][1]["control"])  # MegaSR fusion, then Apply ControlNet
    via_core = [[pos[0][0], {**pos[0][1], "control": core}]]
    with pytest.raises(ValueError) as e:
        node.execute(lr_image=lr, **{**args, "positive": via_core})
    assert "'positive'" in str(e.value)

    core_only = core.copy()
    core_only.set_previous_controlnet(None)
    out, _ = node.execute(lr_image=lr, **{**args, "positive": [[pos[0][0], {"control": core_only}]]}).args
    assert out[0][1]["control"].previous_controlnet is core_only
