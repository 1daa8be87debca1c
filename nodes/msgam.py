"""MS-GAM guidance fusion: sets the MegaSR ControlNet (with HED / depth / segmentation maps) on conditioning."""

from __future__ import annotations

import logging

from ..megasr.errors import MegaSRInputError
from ..megasr.images import as_rgb_image, match_batch, to_bchw
from .api import io
from .common import CATEGORY, MegaSRModelType, strength_input
from .control import MegaSRControl

log = logging.getLogger("megasr")

MAPS = (
    ("hed", "HED edge map (white edges on black), e.g. from MegaSR DAGE HED or any HED/soft-edge preprocessor."),
    ("depth", "Depth map (relative inverse depth, near = bright), e.g. MegaSR DAGE Depth or Depth Anything."),
    ("seg", "Segmentation map in the ADE20K 150-class colour palette, e.g. MegaSR DAGE Segmentation."),
)


def map_to_network(name: str, image, where: str, lr_hw: tuple[int, int], batch: int):
    """IMAGE map -> [B, C, H, W] as the network reads it (HED/depth 1 channel, seg 3 channels)."""
    img = match_batch(as_rgb_image(image, where, name), batch, where, name)
    if tuple(img.shape[1:3]) != lr_hw:
        log.warning(
            "%s: %s map is %dx%d, LR is %dx%d; it is resized",
            where,
            name,
            img.shape[2],
            img.shape[1],
            lr_hw[1],
            lr_hw[0],
        )
    x = to_bchw(img)
    return x if name == "seg" else x.mean(dim=1, keepdim=True)


class MegaSRGuidanceFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRGuidanceFusion",
            display_name="MegaSR MS-GAM Guidance Fusion",
            category=CATEGORY,
            description=(
                "Sets the MegaSR ControlNet on positive and negative conditioning, with the LR image and the "
                "expressive guidance maps fused by MS-GAM (depth + segmentation first, then HED and the fused "
                "map modulate every attention block). Any map may be left out. Maps of another size are resized "
                "to the LR image. Stacks with other ControlNets."
            ),
            inputs=[
                io.Conditioning.Input(
                    "positive", tooltip="Positive conditioning (e.g. tags + 'clean, high-resolution, 8k')."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="Negative conditioning (e.g. 'dotted, noise, blur, lowres, smooth')."
                ),
                MegaSRModelType.Input("megasr_model", tooltip="From MegaSR Model Loader (the same one as CISM²)."),
                io.Image.Input("lr_image", tooltip="The low-resolution input image."),
                strength_input("strength", "Strength of the ControlNet residuals."),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress at which guidance starts.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress at which guidance ends.",
                ),
                strength_input("hed_strength", "Weight of the HED map."),
                strength_input("depth_strength", "Weight of the depth map."),
                strength_input("seg_strength", "Weight of the segmentation map."),
                *[
                    io.Image.Input(name, optional=True, tooltip=tip + " Optional; resized to the LR size.")
                    for name, tip in MAPS
                ],
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning with MegaSR guidance."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning with MegaSR guidance."),
            ],
        )

    @classmethod
    def execute(
        cls,
        positive,
        negative,
        megasr_model,
        lr_image,
        strength,
        start_percent,
        end_percent,
        hed_strength,
        depth_strength,
        seg_strength,
        hed=None,
        depth=None,
        seg=None,
    ) -> io.NodeOutput:
        where = "MegaSR MS-GAM Guidance Fusion"
        if start_percent > end_percent:
            raise MegaSRInputError(where, "start_percent", f"{start_percent} is after end_percent {end_percent}")
        lr = as_rgb_image(lr_image, where, "lr_image")
        lr_hw = tuple(lr.shape[1:3])
        maps = {}
        for name, image in (("hed", hed), ("depth", depth), ("seg", seg)):
            if image is not None:
                maps[name] = map_to_network(name, image, where, lr_hw, lr.shape[0])
        strengths = {"hed": hed_strength, "depth": depth_strength, "seg": seg_strength}
        hint = to_bchw(lr)

        cache: dict = {}
        out = []
        for conditioning in (positive, negative):
            c = []
            for t in conditioning:
                d = t[1].copy()
                prev = d.get("control", None)
                if prev in cache:
                    control = cache[prev]
                else:
                    control = MegaSRControl(megasr_model, maps, strengths).set_cond_hint(
                        hint, strength, (start_percent, end_percent)
                    )
                    control.set_previous_controlnet(prev)
                    cache[prev] = control
                d["control"] = control
                d["control_apply_to_uncond"] = False
                c.append([t[0], d])
            out.append(c)
        return io.NodeOutput(out[0], out[1])
