"""Per-level CISM² strengths land on the U-Net level they name (issue 27: the old tests used equal levels).

The CISM node's ``strength_full_res`` .. ``strength_eighth_res`` become ``level_strengths`` (level 0 = full latent
resolution). A block at level L runs on (h / 2^L) x (w / 2^L) tokens; whatever the block's name or its place in
the down / mid / up path, the strength it applies must be ``cism_strength * level_strengths[L]``.
"""

from __future__ import annotations

import math

import torch
from megasr_testing import TINY_UNET, inputs, perturb_zero_inits, seeded, tiny_megasr_config

from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet
from megasr.cism import CismBlock
from megasr.model import MegaSRModel, megasr_noise_prediction


@torch.no_grad()
def test_each_block_applies_the_strength_of_its_own_resolution(monkeypatch) -> None:
    from diffusers import UNet2DConditionModel

    with seeded(0):
        unet = UNet2DConditionModel(**TINY_UNET).eval()
    with seeded(1):
        model = MegaSRModel(tiny_megasr_config()).eval()
    perturb_zero_inits(model)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=1, hw=(8, 12))
    levels = (1.0, 0.25)  # unequal: a block reading the mirrored level gets the other value
    cism = 0.8
    ctx = model.prepare_context(
        inp["x"].shape[-2:],
        inp["clip"],
        inp["hed"],
        inp["depth"],
        inp["seg"],
        cism_strength=cism,
        level_strengths=levels,
    )
    seen: list[tuple[int, float]] = []
    output = CismBlock.output

    def recording(self, image_out: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        seen.append((int(image_out.shape[1]), float(strength)))
        return output(self, image_out, strength)

    monkeypatch.setattr(CismBlock, "output", recording)
    megasr_noise_prediction(unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    full = 8 * 12
    by_level: dict[int, set[float]] = {}
    for tokens, strength in seen:
        level = round(math.log(full / tokens, 4))
        assert full / tokens == 4**level, tokens
        by_level.setdefault(level, set()).add(round(strength, 6))
    # both levels are reached (down, mid and up paths, U-Net and ControlNet) and each has its own strength only
    assert by_level == {0: {round(cism * levels[0], 6)}, 1: {round(cism * levels[1], 6)}}, by_level
