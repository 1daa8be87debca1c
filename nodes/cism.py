"""CISM² semantic injection: patches a cloned MODEL with MegaSR's per-block image-semantics path."""

from __future__ import annotations

import logging

import torch

from ..megasr.adapter_comfy import SEMANTICS_KEY, apply_megasr_to_comfy_unet
from ..megasr.errors import MegaSRInputError
from .api import io
from .common import CATEGORY, MegaSRModelType, RamSemanticsType, SemanticsType, strength_input
from .runtime.control import SemanticsBinding, attention_in_dtype, unet_compute_dtype

log = logging.getLogger("megasr")

LEVEL_INPUTS = (
    ("strength_full_res", "blocks at full latent resolution (fine texture)"),
    ("strength_half_res", "blocks at 1/2 latent resolution"),
    ("strength_quarter_res", "blocks at 1/4 latent resolution"),
    ("strength_eighth_res", "blocks at 1/8 latent resolution and the middle block (global semantics)"),
)


def check_base(where: str, model, megasr) -> None:
    """Refuse a MegaSR model made for another base U-Net, naming what differs."""
    unet_config = model.model.model_config.unet_config
    base = megasr.module.config.base()
    have = {
        "context_dim": unet_config.get("context_dim"),
        "block_out_channels": [unet_config["model_channels"] * m for m in unet_config.get("channel_mult", [])],
    }
    for k, v in have.items():
        if v != base[k]:
            raise MegaSRInputError(
                where,
                "megasr_model",
                f"'{megasr.filename}' was made for a base with {k}={base[k]}, but this MODEL has {k}={v}; "
                "use an SD-2 (512 px, epsilon) checkpoint or a MegaSR file made for this base",
            )


class MegaSRCismInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRCismInjection",
            display_name="MegaSR CISM² Semantic Injection",
            category=CATEGORY,
            description=(
                "Adds MegaSR's customized image semantics (CISM²) to every attention block of the U-Net: the "
                "LR image's CLIP tokens go through each block's frozen cross-attention with a per-block learned "
                "projection and gate. Returns a patched copy of the MODEL; other attention patches still apply. "
                "Use together with MS-GAM Guidance Fusion on the conditioning."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD-2 (512 px, epsilon) model, e.g. from Load Checkpoint."),
                MegaSRModelType.Input("megasr_model", tooltip="From MegaSR Model Loader."),
                SemanticsType.Input(
                    "semantics",
                    optional=True,
                    tooltip="Image semantics of the LR image, from MegaSR DAGE CLIP Image Semantics. Leave it "
                    "unconnected for a SeeSR file (its CISM² is at zero init: nothing reads it).",
                ),
                strength_input("strength", "Global CISM² strength (0 turns the image-semantics path off)."),
                *[strength_input(name, f"CISM² strength on {what}.") for name, what in LEVEL_INPUTS],
                RamSemanticsType.Input(
                    "ram_semantics",
                    optional=True,
                    tooltip="RAM/DAPE representation tokens of the LR image, from MegaSR RAM Tags: required by a "
                    "model with SeeSR's representation branch (a SeeSR file, or MegaSR trained from SeeSR).",
                ),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched MODEL (a clone).")],
        )

    @classmethod
    def execute(
        cls, model, megasr_model, semantics=None, strength: float = 1.0, ram_semantics=None, **levels
    ) -> io.NodeOutput:
        where = "MegaSR CISM² Semantic Injection"
        check_base(where, model, megasr_model)
        if semantics is not None:
            tokens = semantics.tokens
            clip_dim = megasr_model.module.config.clip_dim
            if tokens.ndim != 3 or tokens.shape[-1] != clip_dim:
                raise MegaSRInputError(where, "semantics", clip_width_problem(clip_dim, list(tokens.shape)))
        representation = representation_tokens(where, megasr_model, ram_semantics)
        m = model.clone()
        patch = apply_megasr_to_comfy_unet(m, megasr_model.module, megasr_model.owner_id)
        m.set_additional_models("megasr", [megasr_model.patcher])
        level_strengths = tuple(float(levels[name]) for name, _ in LEVEL_INPUTS)
        # the ControlNet's image path calls the U-Net's attention in the MegaSR model's compute dtype
        attention = attention_in_dtype(patch.image_attention, unet_compute_dtype(m), megasr_model.dtype)
        m.model_options["transformer_options"][SEMANTICS_KEY] = SemanticsBinding(
            semantics, megasr_model.owner_id, float(strength), level_strengths, attention, representation
        )
        return io.NodeOutput(m)


def representation_tokens(where: str, megasr_model, ram_semantics):
    """The RAM tokens [B, N, width] SeeSR's branch of this model reads (None: the model has no branch)."""
    width = int(getattr(megasr_model.module.config, "representation_dim", 0) or 0)
    if not width:
        if ram_semantics is not None:
            log.info("%s: '%s' has no representation branch; ram_semantics is not used", where, megasr_model.filename)
        return None
    if ram_semantics is None:
        raise MegaSRInputError(
            where,
            "ram_semantics",
            f"'{megasr_model.filename}' carries SeeSR's representation branch, which reads RAM/DAPE tokens of the LR "
            "image: connect MegaSR RAM Tags' ram_semantics output (with MegaSR RAM Loader's model) to this input",
        )
    tokens = getattr(ram_semantics, "tokens", None)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[-1] != width:
        shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(ram_semantics).__name__
        raise MegaSRInputError(
            where, "ram_semantics", f"expected RAM tokens [batch, tokens, {width}] from MegaSR RAM Tags, got {shape}"
        )
    return tokens


#: CLIP vision token width -> the tower that has it and a file the Load CLIP Vision node can take
CLIP_TOWERS = {
    1024: "ViT-L/14 (e.g. clip_vision_l.safetensors / openai CLIP-ViT-L-14)",
    1280: "ViT-H/14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, the IP-Adapter image encoder)",
    1664: "ViT-bigG/14 (CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)",
}


def clip_width_problem(clip_dim: int, shape: list[int]) -> str:
    """Which CLIP vision file fits this MegaSR model, when the semantics come from another tower."""
    msg = f"expected CLIP tokens [batch, tokens, {clip_dim}], got {shape}"
    if len(shape) != 3:
        return msg
    want = CLIP_TOWERS.get(clip_dim, f"a {clip_dim}-wide CLIP vision tower")
    got = CLIP_TOWERS.get(shape[-1], f"a {shape[-1]}-wide tower")
    return (
        f"{msg}: this MegaSR model was trained with {want}, the semantics come from {got}. Load the matching file "
        "in Load CLIP Vision (or use MegaSR weights trained with the CLIP you have)"
    )
