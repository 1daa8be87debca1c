"""DAGE CLIP image semantics: CLIP ViT-H/14 penultimate tokens of the LR image, for CISM²."""

from __future__ import annotations

import comfy.model_management
import torch

from ..megasr.cism import ImageSemantics
from ..megasr.errors import MegaSRInputError
from ..megasr.images import as_rgb_image
from .api import io
from .common import CATEGORY, DageModelType, SemanticsType

WHERE = "MegaSR DAGE CLIP Image Semantics"


def patched_clip_vision(clip_vision, dage_lora, where: str = WHERE):
    """A CLIP_VISION whose patcher carries the DAGE LoRA as ComfyUI weight patches (the original is untouched);
    errors name ``where`` (the calling node)."""
    import copy

    from ..megasr.dage import clip as dage_clip

    deltas = dage_lora.info.get("weight_deltas")
    if deltas is None:
        raise MegaSRInputError(where, "dage_lora", "this DAGE model is not a CLIP LoRA (load one with kind clip_lora)")
    shapes = {k: tuple(v.shape) for k, v in clip_vision.patcher.model.state_dict().items()}
    patches = {}
    for key, delta in deltas.items():
        comfy_key = dage_clip.comfy_clip_vision_key(key)
        if comfy_key not in shapes:
            raise MegaSRInputError(where, "dage_lora", f"the LoRA targets '{key}', which this CLIP vision model lacks")
        if tuple(delta.shape) != shapes[comfy_key]:  # ComfyUI would only log "SHAPE MISMATCH" and drop it
            raise MegaSRInputError(
                where,
                "dage_lora",
                f"the LoRA '{dage_lora.filename}' does not fit this CLIP vision model: '{key}' is "
                f"{list(delta.shape)} in the LoRA but {list(shapes[comfy_key])} in clip_vision (a LoRA for another "
                "CLIP width; use the ViT-H/14 clip_vision it was trained for)",
            )
        patches[comfy_key] = ("diff", (delta,))
    cv = copy.copy(clip_vision)
    cv.patcher = clip_vision.patcher.clone()
    cv.patcher.add_patches(patches, 1.0)
    return cv


class MegaSRClipSemantics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRClipSemantics",
            display_name="MegaSR DAGE CLIP Image Semantics",
            category=CATEGORY,
            description=(
                "Extracts the LR image's semantics for CISM²: the penultimate hidden states of a CLIP vision "
                "tower (ViT-H/14, the clip_vision file IPAdapter users already have), optionally with the "
                "degradation-aware DAGE LoRA applied."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The LR image (each image of a batch gets its own semantics)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision model from Load CLIP Vision (ViT-H/14)."),
                io.Combo.Input(
                    "crop",
                    options=["none", "center"],
                    default="none",
                    tooltip="none: the whole image is resized to the CLIP input; center: centre square only.",
                ),
                DageModelType.Input(
                    "dage_lora",
                    optional=True,
                    tooltip="Optional DAGE CLIP LoRA (MegaSR DAGE Loader, kind clip_lora) for degraded inputs.",
                ),
            ],
            outputs=[SemanticsType.Output(display_name="semantics", tooltip="Image semantics for CISM².")],
        )

    @classmethod
    def execute(cls, image, clip_vision, crop, dage_lora=None) -> io.NodeOutput:
        img = as_rgb_image(image, WHERE, "image")
        cv = patched_clip_vision(clip_vision, dage_lora) if dage_lora is not None else clip_vision

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = cv.encode_image(pixels, crop=crop == "center")
            tokens = out["penultimate_hidden_states"].to(comfy.model_management.intermediate_device()).float()
            if not torch.isfinite(tokens).all():
                raise MegaSRInputError(WHERE, "clip_vision", "the CLIP vision model produced NaN/inf")
            return tokens

        tokens = encode(img)
        # Keeping the image and encoder lets the tiled sampler describe each tile by its own content.
        return io.NodeOutput(ImageSemantics(tokens, f"clip_vision {list(tokens.shape)}", image=img, encoder=encode))
