"""Latent tiling: coverage, overlap, weights, exact reconstruction."""

from __future__ import annotations

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


def test_weights_ramp_only_towards_neighbours():
    grid = tiles(40, 40, 24, 8)
    first = tile_weight(grid[0], 40, 40, 8)
    assert first[0, 0] == 1 and first[-1, -1] < first[-9, -9]  # the outer edge is not faded, the inner one is
    assert (first >= 0).all() and first[-1, -1] == 0 and first[-2, -2] == 0  # outer quarter of the overlap: 0
    total = torch.zeros(40, 40)
    for t in grid:
        total[t.y0 : t.y1, t.x0 : t.x1] += tile_weight(t, 40, 40, 8)
    assert (total > 0).all()  # every cell is covered by some tile with a non-zero weight


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError):
        tile_starts(100, 16, 16)
