"""Latent tiling with overlapping, weighted blending; the result has exactly the input's size."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def tile_weight(t: Tile, h: int, w: int, overlap: int, device=None) -> torch.Tensor:
    """Feathering weight [th, tw]: linear ramps over ``overlap`` cells on sides that have a neighbour."""
    th, tw = t.y1 - t.y0, t.x1 - t.x0

    def ramp(n: int, lo_open: bool, hi_open: bool) -> torch.Tensor:
        r = torch.ones(n, device=device)
        k = min(overlap, n // 2)
        if k > 0:
            steps = (torch.arange(k, device=device, dtype=torch.float32) + 1) / (k + 1)
            if lo_open:
                r[:k] = steps
            if hi_open:
                r[n - k :] = steps.flip(0)
        return r

    wy = ramp(th, t.y0 > 0, t.y1 < h)
    wx = ramp(tw, t.x0 > 0, t.x1 < w)
    return wy[:, None] * wx[None, :]


class TileBlender:
    """Accumulates weighted tile results into a [B, C, H, W] canvas."""

    def __init__(self, shape: tuple[int, ...], overlap: int, dtype=torch.float32, device=None) -> None:
        self.h, self.w = shape[-2], shape[-1]
        self.overlap = overlap
        self.acc = torch.zeros(shape, dtype=dtype, device=device)
        self.norm = torch.zeros((self.h, self.w), dtype=dtype, device=device)

    def add(self, t: Tile, value: torch.Tensor) -> None:
        wgt = tile_weight(t, self.h, self.w, self.overlap, device=self.acc.device).to(self.acc.dtype)
        self.acc[..., t.y0 : t.y1, t.x0 : t.x1] += value.to(self.acc) * wgt
        self.norm[t.y0 : t.y1, t.x0 : t.x1] += wgt

    def result(self) -> torch.Tensor:
        return self.acc / self.norm.clamp_min(1e-8)
