"""The sampler's memory preflight estimate (megasr/memory.py): what it counts and how it refuses."""

from __future__ import annotations

import pytest
import torch

from megasr.errors import MegaSRInputError
from megasr.memory import GIB, estimate_sampler_peak_bytes, refuse_if_too_large


def test_canvas_parts_grow_with_the_output_and_model_call_only_with_the_tile():
    """Catches an estimate that ignores the output size (what killed the server at 4096x4096 x4) or that
    charges the model call for the whole canvas instead of one tile batch."""
    small = estimate_sampler_peak_bytes((256, 256), 4.0, tile_size=512, vae_tile=1024, vae_decode_bytes_per_cell=0)
    big = estimate_sampler_peak_bytes((1024, 1024), 4.0, tile_size=512, vae_tile=1024, vae_decode_bytes_per_cell=0)
    assert big.output_hw == (4096, 4096) and big.tiles > small.tiles
    assert big.model_call_bytes == small.model_call_bytes  # one 512 px tile x cond/uncond either way
    assert big.decode_bytes > 10 * small.decode_bytes
    assert big.sampling_bytes - big.model_call_bytes > 10 * (small.sampling_bytes - small.model_call_bytes)
    batched = estimate_sampler_peak_bytes((1024, 1024), 4.0, tile_size=512, tile_batch=4, vae_tile=1024)
    assert batched.model_call_bytes == pytest.approx(4 * big.model_call_bytes, rel=1e-6)
    fp32 = estimate_sampler_peak_bytes((1024, 1024), 4.0, tile_size=512, dtype=torch.float32, vae_tile=1024)
    assert fp32.model_call_bytes == pytest.approx(2 * big.model_call_bytes, rel=1e-6)
    tiled_vae = estimate_sampler_peak_bytes((1024, 1024), 4.0, tile_size=512, vae_tile=1024)
    untiled_vae = estimate_sampler_peak_bytes((1024, 1024), 4.0, tile_size=512)
    assert untiled_vae.decode_bytes > tiled_vae.decode_bytes  # a whole-canvas VAE pass costs more than a tile's


def test_the_decoded_image_alone_is_counted_at_float32():
    """Catches a unit slip (bytes vs elements, fp16 vs the float32 IMAGE ComfyUI holds)."""
    e = estimate_sampler_peak_bytes((100, 100), 4.0, vae_tile=512, vae_decode_bytes_per_cell=0)
    image = 3 * 400 * 400 * 4
    assert e.decode_bytes == 9 * image  # 3 tiled passes + their sum + crop, colour fix, result


def test_a_4096_lr_at_x4_is_refused_naming_numbers_and_inputs():
    """The 16384x16384 output needs tens of GiB for the decoded image alone: refused before any work."""
    e = estimate_sampler_peak_bytes((4096, 4096), 4.0, tile_size=1024, tile_overlap=128, vae_tile=1024)
    assert e.peak > 30 * GIB
    with pytest.raises(MegaSRInputError) as err:
        refuse_if_too_large(e, 16 * GIB, "MegaSR Sampler", "scale")
    msg = str(err.value)
    assert "MegaSR Sampler" in msg and "'scale'" in msg and "16384x16384" in msg and "16.0 GiB" in msg
    refuse_if_too_large(estimate_sampler_peak_bytes((64, 64), 4.0), 16 * GIB, "MegaSR Sampler", "scale")


def test_a_too_large_tile_names_tile_size_and_a_setting_that_fits():
    """Issue 29: 4096 px LR at x4 with the largest tile (8192) was refused as 'lower scale' although the tile
    causes almost all of it. With a tile setting that fits, the message names 'tile_size' and that setting."""
    from megasr.memory import smaller_tiles_that_fit

    def est(size: int, batch: int):
        return estimate_sampler_peak_bytes(
            (4096, 4096),
            4.0,
            tile_size=size,
            tile_overlap=min(128, size // 2),
            tile_batch=batch,
            vae_tile=max(512, size),
        )

    big = est(8192, 1)
    avail = est(1024, 1).peak + GIB  # room for the default tile, not for 8192
    fit = smaller_tiles_that_fit(est, 8192, 1, avail)
    assert fit is not None and fit[0] < 8192 and fit[2].peak <= avail and est(fit[0] * 2, 1).peak > avail
    with pytest.raises(ValueError) as e:
        refuse_if_too_large(big, avail, "MegaSR Sampler", "scale", fit)
    msg = str(e.value)
    assert "'tile_size'" in msg and f"tile_size {fit[0]}" in msg and "'scale' can stay" in msg, msg
    with pytest.raises(ValueError) as e:  # nothing fits: the scale message, saying tiles would not help
        refuse_if_too_large(big, GIB // 4, "MegaSR Sampler", "scale", smaller_tiles_that_fit(est, 8192, 1, GIB // 4))
    assert "'scale'" in str(e.value) and "no smaller tile_size" in str(e.value)
