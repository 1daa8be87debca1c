"""Latent tiling with overlapping, weighted blending, and the canvas layout shared by latent, hint and maps.

The canvas is the upscaled LR image (exact output size) replicate-padded to a multiple of 8 px; the VAE
latent is made from it, and every hint and map is laid out on the same canvas by :func:`to_canvas`, so
pixel (y, x) of any of them and latent cell (y // 8, x // 8) show the same place, for every LR size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size`` with at least ``overlap`` shared cells."""
    if size <= tile:
        return [0]
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    stride = tile - overlap
    n = -(-(size - tile) // stride) + 1  # ceil
    # Spread the tiles evenly so every overlap is at least `overlap` and the last tile ends at `size`.
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def crop_fraction(x: torch.Tensor, crop: tuple[float, float, float, float] | None) -> torch.Tensor:
    """The region ``crop`` = (top, left, bottom, right) fractions of a [..., H, W] tensor (at least 1 px)."""
    if crop is None:
        return x
    h, w = x.shape[-2:]
    top, left, bottom, right = crop
    y0, x0 = round(top * h), round(left * w)
    return x[..., y0 : max(round(bottom * h), y0 + 1), x0 : max(round(right * w), x0 + 1)]


@dataclass(frozen=True)
class Tile:
    y0: int
    y1: int
    x0: int
    x1: int

    def fractions(self, h: int, w: int) -> tuple[float, float, float, float]:
        return self.y0 / h, self.x0 / w, self.y1 / h, self.x1 / w


def tiles(h: int, w: int, tile: int, overlap: int) -> list[Tile]:
    th, tw = min(tile, h), min(tile, w)
    return [Tile(y, y + th, x, x + tw) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]


def blend_ramp(k: int, device=None) -> torch.Tensor:
    """Weights of the ``k`` cells next to a tile edge that has a neighbour, from the edge inwards.

    The outer quarter (``k // 4`` cells) is 0: a U-Net prediction there sees the tile's zero padding
    within its receptive field, so the neighbour's interior prediction is used alone. The rest rises as a
    raised cosine (Hann) to 1, smooth at both ends, so no seam or ridge appears in the blended prediction.
    """
    margin = k // 4
    n = k - margin
    rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(n, device=device, dtype=torch.float32) + 1) / (n + 1))
    return torch.cat([torch.zeros(margin, device=device), rise])


def tile_weight(t: Tile, h: int, w: int, overlap: int, device=None) -> torch.Tensor:
    """Blend weight [th, tw]: :func:`blend_ramp` over ``overlap`` cells on sides that have a neighbour."""
    th, tw = t.y1 - t.y0, t.x1 - t.x0

    def ramp(n: int, lo_open: bool, hi_open: bool) -> torch.Tensor:
        r = torch.ones(n, device=device)
        k = min(overlap, n // 2)
        if k > 0:
            steps = blend_ramp(k, device)
            if lo_open:
                r[:k] = steps
            if hi_open:
                r[n - k :] = steps.flip(0)
        return r

    wy = ramp(th, t.y0 > 0, t.y1 < h)
    wx = ramp(tw, t.x0 > 0, t.x1 < w)
    return wy[:, None] * wx[None, :]


class TileBlender:
    """Accumulates weighted tile results into a [B, C, H, W] canvas: the tiled sampler's blend (every model call
    of nodes/tiled_model.py goes through it). ``weights`` caches tile weights across calls (keyed by tile, size,
    overlap, device, dtype)."""

    def __init__(
        self, shape: tuple[int, ...], overlap: int, dtype=torch.float32, device=None, weights: dict | None = None
    ) -> None:
        self.h, self.w = shape[-2], shape[-1]
        self.overlap = overlap
        self.acc = torch.zeros(shape, dtype=dtype, device=device)
        self.norm = torch.zeros((self.h, self.w), dtype=dtype, device=device)
        self.weights = {} if weights is None else weights

    def _weight(self, t: Tile) -> torch.Tensor:
        k = (t, self.h, self.w, self.overlap, self.acc.device, self.acc.dtype)
        if k not in self.weights:
            self.weights[k] = tile_weight(t, self.h, self.w, self.overlap, device=self.acc.device)
        return self.weights[k]

    def add(self, t: Tile, value: torch.Tensor) -> None:
        wgt = self._weight(t).to(self.acc.dtype)
        self.acc[..., t.y0 : t.y1, t.x0 : t.x1] += value.to(self.acc) * wgt
        self.norm[t.y0 : t.y1, t.x0 : t.x1] += wgt

    def result(self) -> torch.Tensor:
        return self.acc / self.norm.clamp_min(1e-8)


@dataclass(frozen=True)
class Canvas:
    """Output size (h, w) in pixels and the padded size the VAE sees (a multiple of 8)."""

    out_hw: tuple[int, int]
    padded_hw: tuple[int, int]

    @classmethod
    def for_output(cls, out_h: int, out_w: int) -> Canvas:
        return cls((out_h, out_w), (math.ceil(out_h / 8) * 8, math.ceil(out_w / 8) * 8))


def to_canvas(x: torch.Tensor, canvas: Canvas, mode: str) -> torch.Tensor:
    """[B, C, h, w] resized to the output size (``mode``: bicubic, bilinear, nearest-exact) and
    replicate-padded at the bottom/right to the padded size: the layout the VAE latent is made from."""
    oh, ow = canvas.out_hw
    ph, pw = canvas.padded_hw
    if tuple(x.shape[-2:]) != (oh, ow):
        x = F.interpolate(
            x, size=(oh, ow), mode=mode, **({} if mode.startswith("nearest") else {"align_corners": False})
        )
    if (ph, pw) != (oh, ow):
        x = F.pad(x, (0, pw - ow, 0, ph - oh), mode="replicate")
    return x


def per_tile_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-image tensor of batch 1 or ``batch`` brought to ``batch`` (tiles are stacked tile-major)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    return x.repeat(-(-batch // x.shape[0]), *([1] * (x.ndim - 1)))[:batch]


def stack_tiles(canvas_tensor: torch.Tensor, group: list[Tile], batch: int, scale: int = 8) -> torch.Tensor:
    """The group's tiles cut from a canvas-sized tensor (``scale`` px per latent cell), stacked tile-major."""
    return torch.cat(
        [
            per_tile_batch(canvas_tensor[..., t.y0 * scale : t.y1 * scale, t.x0 * scale : t.x1 * scale], batch)
            for t in group
        ]
    )
