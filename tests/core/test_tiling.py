"""Latent tiling: coverage, overlap, weights, exact reconstruction."""

from __future__ import annotations

import math

import pytest
import torch

from megasr.tiling import TileBlender, tile_starts, tile_weight, tiles


@pytest.mark.parametrize(("size", "tile", "overlap"), [(20, 16, 4), (64, 64, 8), (100, 32, 8), (33, 8, 3), (5, 64, 8)])
def test_tiles_cover_the_canvas_with_at_least_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    t = min(tile, size)
    assert starts[0] == 0 and starts[-1] + t == size
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + t - b >= overlap  # consecutive tiles share at least `overlap` cells


def test_blending_a_constant_gives_the_constant_and_the_exact_size():
    h, w = 37, 51
    canvas = TileBlender((2, 4, h, w), overlap=6)
    for t in tiles(h, w, 16, 6):
        canvas.add(t, torch.full((2, 4, t.y1 - t.y0, t.x1 - t.x0), 3.0))
    out = canvas.result()
    assert out.shape == (2, 4, h, w)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))


def _hand_ramp(k: int) -> torch.Tensor:
    """The documented ramp written out: k // 4 zeros, then a raised cosine rising towards 1 (never 1 itself)."""
    margin, n = k // 4, k - k // 4
    return torch.tensor([0.0] * margin + [0.5 - 0.5 * math.cos(math.pi * j / (n + 1)) for j in range(1, n + 1)])


def test_weights_ramp_only_towards_neighbours():
    """Every tile of a 2 x 3 grid, every side: a side with a neighbour carries the ramp (edge inwards), a side on
    the canvas border stays at 1. Catches a ramp on a border side (faded output edge), a missing or mirrored
    ramp on an inner side, a linear instead of a raised-cosine ramp, and a missing zero margin."""
    h, w, tile, overlap = 40, 56, 24, 8
    grid = tiles(h, w, tile, overlap)
    assert {(t.y0, t.x0) for t in grid} == {(0, 0), (16, 0), (0, 16), (16, 16), (0, 32), (16, 32)}
    ramp = _hand_ramp(overlap)
    for t in grid:
        th, tw = t.y1 - t.y0, t.x1 - t.x0
        wy, wx = torch.ones(th), torch.ones(tw)
        if t.y0 > 0:
            wy[:overlap] = ramp
        if t.y1 < h:
            wy[-overlap:] = ramp.flip(0)
        if t.x0 > 0:
            wx[:overlap] = ramp
        if t.x1 < w:
            wx[-overlap:] = ramp.flip(0)
        torch.testing.assert_close(tile_weight(t, h, w, overlap), wy[:, None] * wx[None, :], atol=1e-6, rtol=0)


def test_blending_weights_the_overlap_by_the_ramp_not_the_average():
    """Two tiles side by side with constant predictions 1 and 5: in the overlap every column is the ramp-weighted
    mean, where a tile's zero margin leaves the neighbour's value alone. Catches averaging the overlap
    (3.0 everywhere in it), weights applied to the wrong tile, and a blender that drops the normalisation."""
    h, w, tile, overlap = 8, 40, 24, 8
    left, right = tiles(h, w, tile, overlap)
    assert (left.x0, left.x1, right.x0, right.x1) == (0, 24, 16, 40)
    canvas = TileBlender((1, 1, h, w), overlap=overlap)
    canvas.add(left, torch.full((1, 1, h, 24), 1.0))
    canvas.add(right, torch.full((1, 1, h, 24), 5.0))
    out = canvas.result()[0, 0, 0]
    ramp = _hand_ramp(overlap)
    w_left, w_right = ramp.flip(0), ramp  # over columns 16..23
    want = torch.cat(
        [torch.full((16,), 1.0), (w_left * 1.0 + w_right * 5.0) / (w_left + w_right), torch.full((16,), 5.0)]
    )
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert out[16] == 1.0 and out[23] == 5.0  # the zero margins: each side's edge cells are the neighbour's alone


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError):
        tile_starts(100, 16, 16)
