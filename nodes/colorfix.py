"""MegaSR colour fix node: AdaIN or wavelet colour correction towards a reference image."""

from __future__ import annotations

from ..megasr.colorfix import COLOR_FIX_MODES, color_fix
from ..megasr.images import as_rgb_image, match_batch, to_bchw, to_bhwc
from .api import io


class MegaSRColorFix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRColorFix",
            display_name="MegaSR Colour Fix",
            category="MegaSR",
            description=(
                "Corrects the colours of an upscaled image towards a reference (usually the LR input). "
                "AdaIN matches per-channel mean and spread; wavelet keeps the image's fine detail and takes "
                "the low frequencies (colour, shading) from the reference."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The image to correct (e.g. the MegaSR output)."),
                io.Image.Input(
                    "reference",
                    tooltip="Colour reference, usually the LR input; resized to the image's size.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(COLOR_FIX_MODES[1:]) + ["none"],
                    default="adain",
                    tooltip="adain: match mean/std per channel (SeeSR's default). wavelet: swap the low "
                    "frequency bands. none: pass the image through.",
                ),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The colour-corrected image.")],
        )

    @classmethod
    def execute(cls, image, reference, mode) -> io.NodeOutput:
        where = "MegaSR Colour Fix"
        img = as_rgb_image(image, where, "image")
        ref = match_batch(as_rgb_image(reference, where, "reference"), img.shape[0], where, "reference")
        out = color_fix(to_bchw(img), to_bchw(ref), mode)
        return io.NodeOutput(to_bhwc(out).contiguous())
