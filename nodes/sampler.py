"""MegaSR sampler: LRE start from the encoded, upscaled LR image; ComfyUI samplers; latent tiling."""

from __future__ import annotations

import logging
import math

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
import torch.nn.functional as F

from ..megasr.adapter_comfy import SEMANTICS_KEY
from ..megasr.colorfix import COLOR_FIX_MODES
from ..megasr.colorfix import color_fix as apply_color_fix
from ..megasr.errors import MegaSRInputError
from ..megasr.images import as_rgb_image, to_bchw, to_bhwc
from ..megasr.tiling import TileBlender, tiles
from .api import io
from .common import CATEGORY
from .control import crop_control_chain

log = logging.getLogger("megasr")
WHERE = "MegaSR Sampler"
MIN_TILE = 16  # latent cells; the OOM fallback halves the tile down to this


def upscale_lr(lr: torch.Tensor, scale: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bicubic-upscale [B,3,H,W] by ``scale``; pad (replicate) to a multiple of 8 for the VAE."""
    out_h, out_w = max(1, round(lr.shape[-2] * scale)), max(1, round(lr.shape[-1] * scale))
    up = comfy.utils.common_upscale(lr, out_w, out_h, "bicubic", "disabled").clamp(0, 1)
    ph, pw = math.ceil(out_h / 8) * 8, math.ceil(out_w / 8) * 8
    if (ph, pw) != (out_h, out_w):
        up = F.pad(up, (0, pw - out_w, 0, ph - out_h), mode="replicate")
    return up, (out_h, out_w)


def crop_conditioning(conditioning: list, crop: tuple[float, float, float, float], done: dict) -> list:
    """Conditioning whose ControlNets (MegaSR's and any stacked one) see only ``crop`` of their hints.

    ``done`` maps controls to their cropped copies across positive and negative: a control they share
    stays shared, so ComfyUI still batches cond and uncond in one model call.
    """
    out = []
    for emb, d in conditioning:
        d = d.copy()
        control = d.get("control")
        if control is not None:
            if id(control) not in done:
                done[id(control)] = crop_control_chain(control, crop)
            d["control"] = done[id(control)]
        out.append([emb, d])
    return out


def model_for_tile(model, crop: tuple[float, float, float, float]):
    """The MODEL with CISM² semantics of the tile's region (a clone), or the MODEL itself."""
    binding = model.model_options.get("transformer_options", {}).get(SEMANTICS_KEY)
    if binding is None or binding.semantics is None or getattr(binding.semantics, "encoder", None) is None:
        return model
    m = model.clone()
    m.model_options["transformer_options"][SEMANTICS_KEY] = binding.for_region(crop)
    return m


class MegaSRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRSampler",
            display_name="MegaSR Sampler",
            category=CATEGORY,
            description=(
                "Super-resolves the LR image: upscales it (bicubic), encodes it with the VAE and samples from that "
                "noised latent (MegaSR's LRE start) with any ComfyUI sampler/scheduler, then decodes and fixes "
                "colours. Outputs larger than one tile are sampled tile by tile with overlapping, weighted blending "
                "(guidance maps cropped per tile) and tiled VAE; the output is exactly scale x the input."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from MegaSR CISM² Semantic Injection."),
                io.Conditioning.Input("positive", tooltip="From MegaSR MS-GAM Guidance Fusion."),
                io.Conditioning.Input("negative", tooltip="From MegaSR MS-GAM Guidance Fusion."),
                io.Vae.Input("vae", tooltip="The SD-2 VAE (from Load Checkpoint)."),
                io.Image.Input("lr_image", tooltip="The low-resolution image to upscale."),
                io.Float.Input(
                    "scale",
                    default=4.0,
                    min=1.0,
                    max=8.0,
                    step=0.5,
                    tooltip="Upscale factor; MegaSR is trained for x4.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed; the same seed gives the same result.",
                ),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Sampling steps (paper: DDPM, 50)."),
                io.Float.Input(
                    "cfg",
                    default=5.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale (SeeSR/MegaSR default 5.5).",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="ddpm",
                    tooltip="Any ComfyUI sampler; the paper uses DDPM.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="normal",
                    tooltip="Any ComfyUI scheduler.",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="1.0 starts from the fully noised LR latent (LRE); lower keeps more of the "
                    "bicubic upscale.",
                ),
                io.Int.Input(
                    "tile_size",
                    default=1024,
                    min=64,
                    max=8192,
                    step=64,
                    tooltip="Tile size in output pixels; larger outputs are sampled in tiles.",
                ),
                io.Int.Input(
                    "tile_overlap",
                    default=128,
                    min=0,
                    max=1024,
                    step=8,
                    tooltip="Overlap between tiles in output pixels (blended with linear weights).",
                ),
                io.Combo.Input(
                    "color_fix",
                    options=["adain", "wavelet", "none"],
                    default="adain",
                    tooltip="Colour correction towards the LR image (SeeSR's default: AdaIN).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The super-resolved image (exactly scale x input)."),
                io.Latent.Output(display_name="latent", tooltip="The sampled latent (padded to a multiple of 8 px)."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        vae,
        lr_image,
        scale,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        denoise,
        tile_size,
        tile_overlap,
        color_fix,
    ) -> io.NodeOutput:
        if color_fix not in COLOR_FIX_MODES:
            raise MegaSRInputError(WHERE, "color_fix", f"unknown mode '{color_fix}'")
        if tile_overlap >= tile_size:
            raise MegaSRInputError(WHERE, "tile_overlap", f"{tile_overlap} must be smaller than tile_size {tile_size}")
        lr = to_bchw(as_rgb_image(lr_image, WHERE, "lr_image"))
        up, (out_h, out_w) = upscale_lr(lr, scale)
        pixels = to_bhwc(up)
        # Tiled VAE (ComfyUI's, three offset passes) once the image is larger than 2 x 2 sampling tiles;
        # below that one pass is cheaper, and ComfyUI's VAE falls back to tiles on OOM by itself.
        vae_tile = max(512, tile_size)
        big = up.shape[-2] * up.shape[-1] > 4 * vae_tile * vae_tile
        latent = (
            vae.encode_tiled(pixels, tile_x=vae_tile, tile_y=vae_tile, overlap=min(64, vae_tile // 8))
            if big
            else vae.encode(pixels)
        )
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed, None)

        tile = max(1, tile_size // 8)
        overlap = tile_overlap // 8
        samples = cls._sample_tiled(
            model, noise, latent, positive, negative, steps, cfg, sampler_name, scheduler, denoise, seed, tile, overlap
        )
        if big:
            decoded = vae.decode_tiled(samples, tile_x=vae_tile // 8, tile_y=vae_tile // 8, overlap=8)
        else:
            decoded = vae.decode(samples)
        decoded = decoded.reshape(-1, *decoded.shape[-3:])[:, :out_h, :out_w, :3].float()
        lr_ref = lr.to(decoded.device).repeat(decoded.shape[0] // lr.shape[0], 1, 1, 1)
        image = to_bhwc(apply_color_fix(to_bchw(decoded), lr_ref, color_fix)).clamp(0, 1).contiguous()
        if not torch.isfinite(image).all():
            raise RuntimeError(f"{WHERE}: the result contains NaN/inf (check the checkpoint and the MegaSR file)")
        return io.NodeOutput(image, {"samples": samples})

    @classmethod
    def _sample_tiled(
        cls, model, noise, latent, positive, negative, steps, cfg, sampler_name, scheduler, denoise, seed, tile, overlap
    ) -> torch.Tensor:
        h, w = latent.shape[-2:]
        while True:
            grid = tiles(h, w, tile, min(overlap, tile // 2))
            callback = latent_preview.prepare_callback(model, steps * len(grid))
            try:
                if len(grid) == 1:
                    return comfy.sample.sample(
                        model,
                        noise,
                        steps,
                        cfg,
                        sampler_name,
                        scheduler,
                        positive,
                        negative,
                        latent,
                        denoise=denoise,
                        callback=callback,
                        seed=seed,
                    )
                blender = TileBlender(latent.shape, min(overlap, tile // 2))
                n_tiles = len(grid)
                for i, t in enumerate(grid):
                    crop = t.fractions(h, w)
                    sl = (..., slice(t.y0, t.y1), slice(t.x0, t.x1))

                    def cb(step, x0, x, total, _i=i, _cb=callback, _n=n_tiles):
                        _cb(_i * steps + step, x0, x, steps * _n)

                    cropped: dict = {}
                    out = comfy.sample.sample(
                        model_for_tile(model, crop),
                        noise[sl],
                        steps,
                        cfg,
                        sampler_name,
                        scheduler,
                        crop_conditioning(positive, crop, cropped),
                        crop_conditioning(negative, crop, cropped),
                        latent[sl],
                        denoise=denoise,
                        callback=cb,
                        seed=seed,
                    )
                    blender.add(t, out.cpu())
                return blender.result()
            except comfy.model_management.OOM_EXCEPTION:
                if tile <= MIN_TILE:
                    raise
                tile = max(MIN_TILE, tile // 2)
                log.warning("%s: out of memory; retrying with %d px tiles", WHERE, tile * 8)
                comfy.model_management.soft_empty_cache()
