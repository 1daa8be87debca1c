"""Inputs checked, never silently changed (issue 18): seg palette snapping, one value-range rule, stacked fusions."""

from __future__ import annotations

import logging

import pytest
import torch
from megasr_fixtures import MEGASR_NAME, megasr_env

WHERE = "MegaSR MS-GAM Guidance Fusion"


@pytest.fixture(scope="module")
def fusion(comfy_runner, tiny_sd2_ckpt, object_info):
    """The real node classes as ComfyUI registered them, plus the arguments a minimal fusion needs."""
    megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    import nodes

    megasr = nodes.NODE_CLASS_MAPPINGS["MegaSRModelLoader"].execute(MEGASR_NAME).args[0]
    cond = [[torch.zeros(1, 7, 1024), {}]]
    args = dict(
        positive=cond,
        negative=cond,
        megasr_model=megasr,
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
        hed_strength=1.0,
        depth_strength=1.0,
        seg_strength=1.0,
    )
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
