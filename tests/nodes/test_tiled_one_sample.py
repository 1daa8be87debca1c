"""Tiled sampling on the real tiny SD-2 graph (issue 8): every overlap holds one sample, not an average of two.

The shipped ``megasr_large_tiled`` workflow runs in the real executor with the tiny checkpoints (per-tile
CLIP semantics, the MegaSR ControlNet; the DAGE maps left out, cfg 1, 2 DDPM steps to keep it short) on a
flat grey LR, so the result's fine structure comes from the sampling noise alone and is statistically the
same everywhere.
The latent canvas is 32 x 104 cells: one row of four 32-cell tiles, 8-cell overlaps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megasr_fixtures import megasr_env, prompt

LR_HW = (64, 208)  # x4 -> 256 x 832 px -> latent 32 x 104
TILE_PX, OVERLAP_PX = 256, 64  # 32-cell tiles, 8-cell overlaps: tiles start at cells 0, 24, 48, 72


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    import folder_paths
    from PIL import Image

    e = megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    grey = np.full((*LR_HW, 3), 128, dtype=np.uint8)
    Image.fromarray(grey, mode="RGB").save(f"{folder_paths.get_input_directory()}/t_grey.png")
    return e


def _tiled_latent(env, image: str, tile_batch: int, seed: int = 5) -> torch.Tensor:
    """The sampler's LATENT output of the tiled workflow (saved by the core SaveLatent node)."""
    import folder_paths
    import safetensors.torch

    p = prompt(
        env,
        "megasr_large_tiled",
        **{
            "LR image.image": image,
            "MegaSRSampler.seed": seed,
            "MegaSRSampler.steps": 2,
            "MegaSRSampler.cfg": 1.0,
            "MegaSRSampler.tile_size": TILE_PX,
            "MegaSRSampler.tile_overlap": OVERLAP_PX,
            "MegaSRSampler.tile_batch": tile_batch,
            "SaveImage.filename_prefix": f"one_sample_{image}_{tile_batch}",
        },
    )
    for n in p.values():  # no DAGE maps: the result's structure is the noise's (and the run stays short)
        if n["class_type"] == "MegaSRGuidanceFusion":
            for name in ("hed", "depth", "seg"):
                n["inputs"].pop(name, None)
    sampler = next(k for k, n in p.items() if n["class_type"] == "MegaSRSampler")
    p["save_latent"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [sampler, 1], "filename_prefix": f"one_sample_{image}_{tile_batch}"},
    }
    out = env[0].run(p).outputs["save_latent"]["latents"][0]
    path = f"{folder_paths.get_directory_by_type(out['type'])}/{out['subfolder']}/{out['filename']}"
    return safetensors.torch.load_file(path)["latent_tensor"].double()


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    """4-neighbour Laplacian over the valid region; value (y, x) belongs to latent cell (y + 1, x + 1)."""
    c = x[..., 1:-1, 1:-1]
    return x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:] - 4 * c


def _hf_amplitude(lap: torch.Tensor, columns: list[int]) -> float:
    """Mean absolute Laplacian over the latent cell ``columns`` (all rows, channels and images)."""
    return float(lap[..., [c - 1 for c in columns]].abs().mean())


def _layout(width: int) -> tuple[list[range], list[range], list[int]]:
    """Overlap central halves, one-tile interiors (2 cells clear of any overlap/edge) and tile starts."""
    starts, tile, overlap = [0, 24, 48, 72], TILE_PX // 8, OVERLAP_PX // 8
    assert starts[-1] + tile == width
    bands = [range(s + overlap // 4, s + overlap - overlap // 4) for s in starts[1:]]
    inner = []
    for i, s in enumerate(starts):
        lo = s + (overlap if i > 0 else 0) + 2
        hi = s + tile - (overlap if i < len(starts) - 1 else 0) - 2
        inner.append(range(lo, hi))
    return bands, inner, starts


@pytest.mark.slow
def test_every_overlap_is_one_sample_and_same_size_tiles_share_no_noise(env):
    """High-frequency amplitude (mean |4-neighbour Laplacian| of the sampled latent) in the central half of
    every overlap equals that of the tile interiors within 10%. A flat grey LR makes the result's fine
    structure come from the sampling noise only and the model is translation-equivariant, so one sample
    has the same statistic everywhere. The Laplacian is Gaussian here (kurtosis 3.03 measured), so a blend
    of two independent samples with weights (w, 1 - w) keeps sqrt(w^2 + (1 - w)^2) of the amplitude: 0.71
    for an even average. The mean absolute value is used rather than the energy (mean square) because its
    spread across columns is half as large (7.5% vs 15% per column), which keeps a 10% bound honest with
    four-column bands. Then: the four same-size tiles, compared at the same position inside the tile,
    are uncorrelated (|r| < 0.2; noise drawn per tile from one seed gives r ~ 1); the same seed gives the
    same latent with another tile batch (stacks of 4 vs 3 + 1).

    Measured: bands 0.996 / 0.989 / 0.957, |r| <= 0.08. Checked by hand on a broken variant: replacing
    ``sample_canvas`` by per-tile ``comfy.sample.sample`` runs on the latent crops (each with its
    ``crop_control_chain`` conditioning and ``prepare_noise`` from the seed), blended with ``TileBlender``
    (the pre-issue-8 design), gives bands 0.78 / 0.78 / 0.78 and r = 1.00: both assertions fail.
    """
    a = _tiled_latent(env, "t_grey.png", tile_batch=4)
    assert a.shape == (1, 4, 32, 104) and torch.isfinite(a).all()
    lap = _laplacian(a)
    bands, inner, starts = _layout(a.shape[-1])
    interior = _hf_amplitude(lap, [c for r in inner for c in r])
    ratios = [_hf_amplitude(lap, list(b)) / interior for b in bands]
    for b, r in zip(bands, ratios, strict=True):
        assert 0.9 <= r <= 1.1, f"overlap cells {b.start}..{b.stop - 1}: HF amplitude {r:.3f} x the interior's"

    rel = range(9, 23)  # cells inside every tile, clear of the overlaps
    hf = [lap[..., [s + c - 1 for c in rel]].flatten() for s in starts]
    corr = torch.corrcoef(torch.stack(hf))
    off = corr[~torch.eye(len(hf), dtype=torch.bool)]
    assert off.abs().max() < 0.2, corr

    b = _tiled_latent(env, "t_grey.png", tile_batch=3)
    torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()), rtol=1e-5)  # latent values ~100
