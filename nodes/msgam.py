"""MS-GAM guidance fusion: sets the MegaSR ControlNet (with HED / depth / segmentation maps) on conditioning."""

from __future__ import annotations

import logging

from ..megasr.dage.encodings import snap_seg_image
from ..megasr.errors import MegaSRInputError
from ..megasr.images import as_rgb_image, match_batch, normalise_depth_map, to_bchw
from .api import io
from .common import CATEGORY, MegaSRModelType, strength_input
from .runtime.control import MegaSRControl

log = logging.getLogger("megasr")

STRENGTH_MEANING = (
    " 0 = exactly as if the map were left out (its null map, a trained state); 1 = as trained; values between "
    "interpolate the map's contribution to the features (not its pixels), above 1 extrapolate it."
)
#: Multimodal CFG (MMSR): what the negative branch keeps of the guidance. Id -> (drop maps, drop semantics).
NEGATIVE_GUIDANCE = {
    "same as positive": (False, False),
    "without maps": (True, False),
    "without image semantics": (False, True),
    "without maps and image semantics": (True, True),
}

MAPS = (
    ("hed", "HED edge map (white edges on black), e.g. from MegaSR DAGE HED or any HED/soft-edge preprocessor."),
    ("depth", "Depth map (relative inverse depth, near = bright), e.g. MegaSR DAGE Depth or Depth Anything."),
    (
        "seg",
        "Segmentation map in the ADE20K 150-class colour palette, e.g. MegaSR DAGE Segmentation; other colours are snapped to the nearest palette colour (logged).",
    ),
)


def map_to_network(name: str, image, where: str, lr_hw: tuple[int, int], batch: int):
    """IMAGE map -> [B, C, H, W] as the network reads it (HED/depth 1 channel, seg 3 channels).

    Segmentation maps are snapped to the nearest ADE20K palette colour (the network was trained on clean
    palette colours); how many pixels were off-palette is logged.
    """
    if name == "depth" and hasattr(image, "is_floating_point"):
        image = normalise_depth_map(image, where, name)
    img = as_rgb_image(image, where, name)
    if name == "seg":
        img, off = snap_seg_image(img)
        if off:
            log.info(
                "%s: seg map has %d of %d pixels off the ADE20K palette; snapped to the nearest palette colour",
                where,
                off,
                img.shape[0] * img.shape[1] * img.shape[2],
            )
    img = match_batch(img, batch, where, name)
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


def refuse_stacked_fusion(conditioning, where: str, name: str) -> None:
    """A second MegaSR fusion on one conditioning would run the MegaSR ControlNet twice (residuals added
    twice, maps of both fusions); that is no trained state, so it is refused wherever the first one sits in
    the ``previous_controlnet`` chain (other ControlNets in between included)."""
    for t in conditioning:
        control = t[1].get("control", None) if len(t) > 1 and isinstance(t[1], dict) else None
        while control is not None:
            if isinstance(control, MegaSRControl):
                raise MegaSRInputError(
                    where,
                    name,
                    "this conditioning already carries a MegaSR ControlNet from another MS-GAM Guidance Fusion; "
                    "stacking two would apply it twice. Connect the conditioning from before the first fusion "
                    "(other ControlNets may be stacked freely)",
                )
            control = getattr(control, "previous_controlnet", None)


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
                "map modulate every attention block). Any map may be left out (training drops each map at random, "
                "so every subset is a trained state); a map strength of 0 equals leaving it out. Maps of another "
                "size are resized to the LR image. Multimodal CFG: the negative branch may run without the maps "
                "and/or the image semantics, so CFG pushes along the guidance. Stacks with other ControlNets; a "
                "conditioning that already went through an MS-GAM Guidance Fusion is refused."
            ),
            inputs=[
                io.Conditioning.Input(
                    "positive", tooltip="Positive conditioning (e.g. tags + 'clean, high-resolution, 8k')."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="Negative conditioning (e.g. 'dotted, noise, blur, lowres, smooth')."
                ),
                MegaSRModelType.Input("megasr_model", tooltip="From MegaSR Model Loader (the same one as CISM²)."),
                io.Image.Input(
                    "lr_image", tooltip="The low-resolution input image (0..1; 0..255 floats are rescaled, logged)."
                ),
                strength_input(
                    "strength",
                    "Strength of the ControlNet residuals (as in Apply ControlNet: 0 = no residuals from the MegaSR "
                    "ControlNet; the MS-GAM map strengths below act in both networks).",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip=(
                        "Sampling progress at which the MegaSR ControlNet and the guidance maps start "
                        "(CISM² image semantics stay on for the whole run)."
                    ),
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress at which the MegaSR ControlNet and the guidance maps end.",
                ),
                strength_input("hed_strength", "Strength of the HED map." + STRENGTH_MEANING),
                strength_input("depth_strength", "Strength of the depth map." + STRENGTH_MEANING),
                strength_input("seg_strength", "Strength of the segmentation map." + STRENGTH_MEANING),
                *[
                    io.Image.Input(
                        name,
                        optional=True,
                        tooltip=tip
                        + " Optional; resized to the LR size; "
                        + (
                            "a float range other than 0..1 (MiDaS-style relative depth, metres) is min-max normalised "
                            "to 0..1 (logged)."
                            if name == "depth"
                            else "0..255 floats are rescaled (logged)."
                        ),
                    )
                    for name, tip in MAPS
                ],
                strength_input(
                    "msgam_strength",
                    "Global MS-GAM strength, all three maps at once: 0 = exactly as if every map were left out, "
                    "1 = as trained (times the per-map strengths), values between interpolate the maps' contribution.",
                ),
                io.Combo.Input(
                    "negative_guidance",
                    options=list(NEGATIVE_GUIDANCE),
                    default="same as positive",
                    tooltip=(
                        "Multimodal CFG: what the negative branch gets. 'same as positive' shares maps and image "
                        "semantics (SeeSR's way); the others leave the maps and/or the CLIP image semantics out of "
                        "the negative branch only, so CFG also amplifies what they add (MMSR). Costs a separate "
                        "model call for the negative branch."
                    ),
                ),
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
        msgam_strength=1.0,
        negative_guidance="same as positive",
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
        if negative_guidance not in NEGATIVE_GUIDANCE:
            raise MegaSRInputError(
                where, "negative_guidance", f"'{negative_guidance}' is not one of {list(NEGATIVE_GUIDANCE)}"
            )
        for branch, conditioning in (("positive", positive), ("negative", negative)):
            refuse_stacked_fusion(conditioning, where, branch)
        strengths = {"hed": hed_strength, "depth": depth_strength, "seg": seg_strength, "msgam": msgam_strength}
        hint = to_bchw(lr)
        drop_maps, drop_semantics = NEGATIVE_GUIDANCE[negative_guidance]
        shared = not (drop_maps or drop_semantics)

        cache: dict = {}  # (branch, previous control) -> ours; shared controls let ComfyUI batch cond + uncond
        out = []
        for branch, conditioning in (("positive", positive), ("negative", negative)):
            negative_only = branch == "negative" and not shared
            c = []
            for t in conditioning:
                d = t[1].copy()
                prev = d.get("control", None)
                key = (negative_only, prev)
                if key in cache:
                    control = cache[key]
                else:
                    control = MegaSRControl(
                        megasr_model,
                        {} if negative_only and drop_maps else maps,
                        strengths,
                        drop_semantics=negative_only and drop_semantics,
                    ).set_cond_hint(hint, strength, (start_percent, end_percent))
                    control.set_previous_controlnet(prev)
                    cache[key] = control
                d["control"] = control
                d["control_apply_to_uncond"] = False
                c.append([t[0], d])
            out.append(c)
        return io.NodeOutput(out[0], out[1])
