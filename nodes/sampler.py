"""MegaSR sampler: LRE start from the encoded, upscaled LR image; ComfyUI samplers; latent tiling."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import latent_preview
import torch

from ..megasr.adapter_comfy import SEMANTICS_KEY
from ..megasr.colorfix import COLOR_FIX_MODES
from ..megasr.colorfix import color_fix as apply_color_fix
from ..megasr.errors import MegaSRInputError
from ..megasr.images import as_rgb_image, to_bchw, to_bhwc
from ..megasr.memory import (
    GIB,
    REPRESENTATION_BRANCH_FACTOR,
    estimate_sampler_peak_bytes,
    refuse_if_too_large,
    smaller_tiles_that_fit,
)
from ..megasr.tiling import Canvas, to_canvas
from .api import io
from .common import CATEGORY
from .runtime.tiled_model import TiledModelCall

log = logging.getLogger("megasr")
WHERE = "MegaSR Sampler"
WRAPPER_KEY = "megasr_tiles"


def upscale_lr(lr: torch.Tensor, scale: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """Bicubic-upscale [B,3,H,W] by ``scale`` and lay it on the canvas (replicate pad to a multiple of 8).

    The ControlNet hints and maps are laid out by the same :func:`megasr.tiling.to_canvas`, so they match
    the latent to the pixel.
    """
    out_h, out_w = max(1, round(lr.shape[-2] * scale)), max(1, round(lr.shape[-1] * scale))
    return to_canvas(lr, Canvas.for_output(out_h, out_w), "bicubic").clamp(0, 1), (out_h, out_w)


def preflight(model, vae, lr: torch.Tensor, scale, tile_size, tile_overlap, tile_batch) -> bool:
    """Refuse a run that cannot fit in memory before any work; returns whether the VAE must tile.

    On a CPU device everything lives in RAM and running out means the process is killed, so the whole
    estimate must fit the available RAM; on a GPU the canvas-sized parts must fit RAM (the model call and
    VAE fall back to smaller pieces on an out-of-memory error by themselves).
    """
    mm = comfy.model_management
    device = mm.get_torch_device()
    ram = mm.get_free_memory(torch.device("cpu"))
    lat_cells = 64 * 64
    unet_per_cell = model.model.memory_required([1, 4, 64, 64]) / lat_cells * 1.5
    binding = model.model_options.get("transformer_options", {}).get(SEMANTICS_KEY)
    if getattr(binding, "representation", None) is not None:  # SeeSR's branch: a second transformer per block
        unet_per_cell *= REPRESENTATION_BRANCH_FACTOR
    vdtype = getattr(vae, "vae_dtype", torch.float32)
    enc_px = vae.memory_used_encode((1, 3, 64, 64), vdtype) / (64 * 64)
    dec_cell = vae.memory_used_decode((1, 4, 64, 64), vdtype) / lat_cells
    common = dict(
        tile_size=tile_size,
        tile_overlap=tile_overlap,
        tile_batch=tile_batch,
        batch=lr.shape[0],
        dtype=model.model.get_dtype(),
        vae_dtype=vdtype,
        unet_bytes_per_cell=unet_per_cell,
        vae_encode_bytes_per_pixel=enc_px,
        vae_decode_bytes_per_cell=dec_cell,
    )
    lr_hw = tuple(lr.shape[-2:])
    vae_tile = max(512, tile_size)
    whole = estimate_sampler_peak_bytes(lr_hw, scale, vae_tile=None, **common)
    h, w = whole.output_hw
    # Tiled VAE (ComfyUI's, three offset passes) once the image is larger than 2 x 2 VAE tiles, or when a
    # whole-canvas pass would not fit (on a GPU ComfyUI's VAE also falls back to tiles on OOM by itself).
    tiled = h * w > 4 * vae_tile * vae_tile or (device.type == "cpu" and whole.peak > ram)
    est = estimate_sampler_peak_bytes(lr_hw, scale, vae_tile=vae_tile if tiled else None, **common) if tiled else whole
    log.info("%s: memory preflight: %s; %.1f GiB RAM available", WHERE, est.describe(), ram / GIB)
    gpu_free = {"unet_bytes_per_cell": 0, "vae_decode_bytes_per_cell": 0} if device.type != "cpu" else {}
    if device.type != "cpu":
        est = estimate_sampler_peak_bytes(lr_hw, scale, **{**common, **gpu_free}, vae_tile=vae_tile)

    def with_tiles(size: int, batch: int):
        kw = {**common, **gpu_free, "tile_size": size, "tile_overlap": min(tile_overlap, size // 2)}
        return estimate_sampler_peak_bytes(lr_hw, scale, **{**kw, "tile_batch": batch}, vae_tile=max(512, size))

    fit = smaller_tiles_that_fit(with_tiles, tile_size, tile_batch, ram) if est.peak > ram else None
    refuse_if_too_large(est, ram, WHERE, "scale", fit)
    return tiled


def sample_canvas(
    model,
    latent: torch.Tensor,
    positive,
    negative,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float,
    canvas: Canvas,
    tile: int,
    overlap: int,
    tile_batch: int,
    callback=None,
) -> torch.Tensor:
    """One ``comfy.sample.sample`` run over the whole latent canvas, tiled inside every model call.

    The entry point to time tiled sampling (scripts/tools/benchmark.py): ``latent`` is the VAE latent of the
    canvas (:func:`upscale_lr`), ``tile``/``overlap`` are latent cells, ``tile_batch`` tiles go into one
    model call. Noise is drawn once for the canvas (``comfy.sample.prepare_noise``); progress counts steps.
    """
    m = model.clone()  # the user's MODEL keeps no trace of this run's wrapper
    tiling = TiledModelCall(canvas, tile, overlap, tile_batch, WHERE)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, tiling)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    try:
        return comfy.sample.sample(
            m,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent,
            denoise=denoise,
            callback=callback or latent_preview.prepare_callback(m, steps),
            seed=seed,
        )
    finally:
        tiling.release()


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
                "colours. Outputs larger than one tile are sampled in one run with tiling inside every model call "
                "(each tile with its own crop of the hint, maps and CISM² semantics; noise predictions blended "
                "with smooth weights) and tiled VAE; hint and maps are aligned to the latent to the pixel; the "
                "output is exactly scale x the input. A memory preflight refuses outputs that cannot fit."
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
                    tooltip="Tile size in output pixels; larger outputs are cut into tiles inside every model call "
                    "(one sampling run for the whole image).",
                ),
                io.Int.Input(
                    "tile_overlap",
                    default=128,
                    min=0,
                    max=1024,
                    step=8,
                    tooltip="Overlap between tiles in output pixels: the noise predictions are blended there with "
                    "raised-cosine weights (zero on the outer quarter of the overlap).",
                ),
                io.Combo.Input(
                    "color_fix",
                    options=["adain", "wavelet", "none"],
                    default="adain",
                    tooltip="Colour correction towards the LR image (SeeSR's default: AdaIN).",
                ),
                io.Int.Input(
                    "tile_batch",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="Tiles computed together in one model call (more is faster on a GPU, needs more "
                    "memory); on out-of-memory it is halved, then the tile size.",
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
        tile_batch=4,
    ) -> io.NodeOutput:
        if color_fix not in COLOR_FIX_MODES:
            raise MegaSRInputError(WHERE, "color_fix", f"unknown mode '{color_fix}'")
        if tile_overlap >= tile_size:
            raise MegaSRInputError(WHERE, "tile_overlap", f"{tile_overlap} must be smaller than tile_size {tile_size}")
        lr = to_bchw(as_rgb_image(lr_image, WHERE, "lr_image"))
        vae_tiled = preflight(model, vae, lr, scale, tile_size, tile_overlap, tile_batch)
        up, (out_h, out_w) = upscale_lr(lr, scale)
        pixels = to_bhwc(up)
        del up
        vae_tile = max(512, tile_size)
        latent = (
            vae.encode_tiled(pixels, tile_x=vae_tile, tile_y=vae_tile, overlap=min(64, vae_tile // 8))
            if vae_tiled
            else vae.encode(pixels)
        )
        del pixels
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        samples = sample_canvas(
            model, latent, positive, negative, seed, steps, cfg, sampler_name, scheduler, denoise,
            Canvas.for_output(out_h, out_w), max(1, tile_size // 8), tile_overlap // 8, tile_batch,
        )  # fmt: skip
        if vae_tiled:
            decoded = vae.decode_tiled(samples, tile_x=vae_tile // 8, tile_y=vae_tile // 8, overlap=8)
        else:
            decoded = vae.decode(samples)
        decoded = decoded.reshape(-1, *decoded.shape[-3:])[:, :out_h, :out_w, :3].float()
        lr_ref = lr.to(decoded.device).repeat(decoded.shape[0] // lr.shape[0], 1, 1, 1)
        image = to_bhwc(apply_color_fix(to_bchw(decoded), lr_ref, color_fix)).clamp(0, 1).contiguous()
        if not torch.isfinite(image).all():
            raise RuntimeError(f"{WHERE}: the result contains NaN/inf (check the checkpoint and the MegaSR file)")
        return io.NodeOutput(image, {"samples": samples})
