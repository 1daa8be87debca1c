"""Peak-memory estimate of one MegaSR Sampler run, made before any work (size/memory preflight).

The estimate counts what grows with the output (the upscaled image, the hint and guidance maps laid out
on the canvas, the latent canvas and the sampler's copies of it, the decoded image and its colour-fixed
copies), the working memory of one model call (tile x tile batch x cond/uncond) and of one VAE pass
(whole canvas or one VAE tile). Model weights are not counted: ComfyUI's model management loads and
offloads them. The figures are deliberately on the safe side (ComfyUI's own VAE/U-Net formulas are).

Used by the sampler node and by the headless runner (which knows only sizes and widget values), so the
signature of :func:`estimate_sampler_peak_bytes` is kept stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import MegaSRInputError

GIB = 1024**3
# ComfyUI's AutoencoderKL formulas (comfy/sd.py): bytes per pixel (encode) / per latent cell (decode),
# times the dtype size.
KL_VAE_ENCODE_PER_PIXEL = 1767
KL_VAE_DECODE_PER_CELL = 2178 * 64
# ComfyUI's SD U-Net formula (model_base.memory_required) with efficient attention: 0.01 MiB per latent
# cell and dtype byte; x1.5 for the ControlNet (a copy of the encoder) and the CISM²/MS-GAM additions.
UNET_PER_CELL_PER_DTYPE_BYTE = 0.01 * 1024 * 1024 * 1.5
# SeeSR's representation branch (megasr/seesr_branch.py) runs a second transformer (self-attention, cross-attention
# over RAM's 145 tokens, feed-forward) after every text transformer of the U-Net and the ControlNet: with efficient
# attention the transformers hold roughly a third of a call's working memory, so a model with the branch needs about
# a third more per latent cell (an estimate on the safe side; the tokens themselves are 145 x 512 floats per image).
REPRESENTATION_BRANCH_FACTOR = 4 / 3
GUIDANCE_CHANNELS = 8  # LR hint (3) + HED (1) + depth (1) + segmentation (3), float32 on the canvas
CLIP_TOKENS_BYTES = 257 * 1280 * 4  # one tile's ViT-H/14 penultimate tokens, float32


@dataclass(frozen=True)
class SamplerMemoryEstimate:
    """Bytes of each phase of a sampler run; ``peak`` is the largest phase."""

    output_hw: tuple[int, int]  # exact output size (h, w) in pixels
    tiles: int  # sampling tiles on the canvas
    tile_batch: int  # tiles per model call
    vae_tiled: bool  # whether the estimate assumes tiled VAE encode/decode
    encode_bytes: int  # upscaled image + VAE encode working memory
    sampling_bytes: int  # canvas-resident hint/maps/latents/semantics + one model call
    model_call_bytes: int  # of which: activations of one model call
    decode_bytes: int  # decoded image, its copies (tiled passes, colour fix) + VAE decode working memory

    @property
    def peak(self) -> int:
        return max(self.encode_bytes, self.sampling_bytes, self.decode_bytes)

    def describe(self) -> str:
        h, w = self.output_hw
        return (
            f"output {w}x{h} px ({self.tiles} tile(s), {self.tile_batch} per model call, "
            f"{'tiled' if self.vae_tiled else 'untiled'} VAE): peak ~{self.peak / GIB:.1f} GiB "
            f"(VAE encode {self.encode_bytes / GIB:.1f}, sampling {self.sampling_bytes / GIB:.1f} of which one "
            f"model call {self.model_call_bytes / GIB:.1f}, decode {self.decode_bytes / GIB:.1f} GiB)"
        )


def _tile_count(size: int, tile: int, overlap: int) -> int:
    if size <= tile:
        return 1
    return -(-(size - tile) // max(1, tile - overlap)) + 1


def estimate_sampler_peak_bytes(
    lr_hw: tuple[int, int],
    scale: float,
    *,
    tile_size: int = 1024,
    tile_overlap: int = 128,
    tile_batch: int = 1,
    batch: int = 1,
    dtype: torch.dtype = torch.float16,
    vae_dtype: torch.dtype | None = None,
    vae_tile: int | None = None,
    guidance_channels: int = GUIDANCE_CHANNELS,
    cfg: bool = True,
    unet_bytes_per_cell: float | None = None,
    vae_encode_bytes_per_pixel: float | None = None,
    vae_decode_bytes_per_cell: float | None = None,
) -> SamplerMemoryEstimate:
    """Estimate the peak memory of one MegaSR Sampler run, from sizes only (no model needed).

    ``lr_hw``: LR size (h, w) in pixels; ``scale``, ``tile_size``, ``tile_overlap`` (output pixels) and
    ``tile_batch`` as the sampler's inputs; ``batch``: images in the LR batch; ``dtype``: the U-Net's
    compute dtype; ``vae_dtype``: the VAE's (default ``dtype``); ``vae_tile``: VAE tile in output pixels,
    None = untiled VAE; ``guidance_channels``: float32 channels laid out on the canvas for the ControlNets
    (8 = LR hint + HED + depth + segmentation; add 3 per stacked core ControlNet); ``cfg``: cond and uncond
    in one call. The ``*_bytes_per_*`` overrides take a loaded model's own figures (the sampler passes
    ComfyUI's ``memory_required`` / ``memory_used_encode`` / ``memory_used_decode``); the defaults are
    ComfyUI's formulas for SD-2's U-Net and KL VAE (on the safe side: real use is often lower).
    """
    out_h, out_w = max(1, round(lr_hw[0] * scale)), max(1, round(lr_hw[1] * scale))
    ph, pw = math.ceil(out_h / 8) * 8, math.ceil(out_w / 8) * 8
    lat_h, lat_w = ph // 8, pw // 8
    tile = max(1, tile_size // 8)
    overlap = min(tile_overlap // 8, tile // 2)
    th, tw = min(tile, lat_h), min(tile, lat_w)
    n_tiles = _tile_count(lat_h, th, overlap) * _tile_count(lat_w, tw, overlap)
    per_call = max(1, min(tile_batch, n_tiles))
    dsize = torch.empty((), dtype=dtype).element_size()
    vsize = torch.empty((), dtype=vae_dtype or dtype).element_size()

    image = batch * 3 * ph * pw * 4  # one float32 RGB image of the (padded) output
    latent = batch * 4 * lat_h * lat_w * 4
    per_cell = unet_bytes_per_cell if unet_bytes_per_cell is not None else UNET_PER_CELL_PER_DTYPE_BYTE * dsize
    model_call = int(per_cell * th * tw * per_call * batch * (2 if cfg else 1))
    enc_px = vae_encode_bytes_per_pixel if vae_encode_bytes_per_pixel is not None else KL_VAE_ENCODE_PER_PIXEL * vsize
    dec_cell = vae_decode_bytes_per_cell if vae_decode_bytes_per_cell is not None else KL_VAE_DECODE_PER_CELL * vsize
    if vae_tile is None:
        enc_work, dec_work = enc_px * ph * pw * batch, dec_cell * lat_h * lat_w * batch
    else:
        v = min(vae_tile, max(ph, pw))
        enc_work, dec_work = enc_px * v * v, dec_cell * (v // 8) ** 2
    # Encode: the upscaled image and its VAE input copy. Sampling: guidance canvases, ~12 latent-sized
    # tensors (x, noise, denoised, cond/uncond outputs and counts, blend accumulators, sampler history),
    # per-tile CLIP tokens. Decode: 3 offset passes of tiled decode + their sum, or one pass; then the
    # crop, the colour fix and the clamped result.
    encode = 2 * image + int(enc_work)
    sampling = image * guidance_channels // 3 + 12 * latent + n_tiles * batch * CLIP_TOKENS_BYTES + model_call
    decode = (6 if vae_tile is not None else 2) * image + 3 * image + int(dec_work)
    return SamplerMemoryEstimate(
        output_hw=(out_h, out_w),
        tiles=n_tiles,
        tile_batch=per_call,
        vae_tiled=vae_tile is not None,
        encode_bytes=int(encode),
        sampling_bytes=int(sampling),
        model_call_bytes=model_call,
        decode_bytes=int(decode),
    )


def smaller_tiles_that_fit(
    estimate_with: Callable[[int, int], SamplerMemoryEstimate], tile_size: int, tile_batch: int, available: int
) -> tuple[int, int, SamplerMemoryEstimate] | None:
    """The largest tile setting (tile_size halved down to 256 px, tile_batch 1) whose estimate fits, if any:
    ``estimate_with(tile_size, tile_batch)`` re-estimates the same run with other tiles."""
    size = tile_size
    while size >= 256:
        for batch in sorted({tile_batch, 1}, reverse=True):
            est = estimate_with(size, batch)
            if est.peak <= available and (size, batch) != (tile_size, tile_batch):
                return size, batch, est
        size //= 2
    return None


def refuse_if_too_large(
    estimate: SamplerMemoryEstimate,
    available_bytes: int,
    where: str,
    name: str,
    fit: tuple[int, int, SamplerMemoryEstimate] | None = None,
) -> None:
    """Raise :class:`MegaSRInputError` naming the numbers and the input to change when the run cannot fit.

    ``fit`` (from :func:`smaller_tiles_that_fit`): a tile setting that would fit; then the message names
    'tile_size' (most of the memory is the per-call part) and that setting, not 'scale'."""
    if estimate.peak <= available_bytes:
        return
    h, w = estimate.output_hw
    need = (
        f"the {w}x{h} px output would need about {estimate.peak / GIB:.1f} GiB of memory but only "
        f"{available_bytes / GIB:.1f} GiB are available ({estimate.describe()})"
    )
    if fit is not None:
        size, batch, est = fit
        raise MegaSRInputError(
            where,
            "tile_size",
            f"{need}. Most of it is one model call over the tiles: tile_size {size}"
            + (f" with tile_batch {batch}" if batch != estimate.tile_batch else "")
            + f" would need about {est.peak / GIB:.1f} GiB and fits; 'scale' can stay.",
        )
    raise MegaSRInputError(
        where,
        name,
        f"{need}. Lower 'scale' or use a smaller 'lr_image' (e.g. Upscale Image By < 1 before this node); no "
        "smaller tile_size or tile_batch fits either (they only change the per-call part).",
    )
