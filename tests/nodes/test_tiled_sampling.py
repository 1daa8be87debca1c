"""Tiled sampling inside every model call (issue 8): one trajectory for the canvas, pixel-exact alignment."""

from __future__ import annotations

import pytest
import torch
from megasr_fixtures import megasr_env


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _pack(module: str):
    import nodes as comfy_nodes

    base = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRSampler"].__module__.rsplit(".", 2)[0]
    return __import__(f"{base}.{module}", fromlist=["x"])


@pytest.mark.parametrize("width", [7, 13, 64, 129])
def test_hint_and_maps_sit_on_the_latent_source_to_the_pixel(env, width):
    """An LR with a one-pixel-wide bright column: the MegaSR hint equals the image the VAE encodes, and the
    HED/depth/seg maps carry the column at the same latent column. Catches the stretched hint (edge at
    latent column 43 instead of 40 for a 13 px LR) and tiles cut from a shifted map."""
    import nodes as comfy_nodes

    sampler = _pack("nodes.sampler")
    tiling = _pack("megasr.tiling")
    tiled = _pack("nodes.runtime.tiled_model")
    col = width // 2
    lr = torch.zeros(1, 5, width, 3)
    lr[:, :, col] = 1.0
    megasr = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRModelLoader"].execute("megasr_tiny_sd2.safetensors").args[0]
    cond = [[torch.zeros(1, 7, 1024), {}]]
    pos, _ = (
        comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRGuidanceFusion"]
        .execute(cond, cond, megasr, lr, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, hed=lr, depth=lr, seg=lr)
        .args
    )
    up, (oh, ow) = sampler.upscale_lr(lr.movedim(-1, 1), 4.0)  # what the VAE encodes
    canvas = tiling.Canvas.for_output(oh, ow)
    lat_h, lat_w = up.shape[-2] // 8, up.shape[-1] // 8
    call = tiled.TiledModelCall(canvas, tile=max(lat_h, lat_w), overlap=0, tile_batch=1, where="test")
    for group in ([tiling.Tile(0, lat_h, 0, lat_w)], [tiling.Tile(0, lat_h, lat_w // 2, lat_w)]):
        (entry,) = call._conds_for([[pos[0][1]]], ("k", group[0]), 0, group, 1)[0]
        prepared = entry["control"]._prepared((lat_h * 8, (group[0].x1 - group[0].x0) * 8), "cpu", torch.float32)
        x0 = group[0].x0 * 8
        source = up[..., x0:]
        torch.testing.assert_close(prepared["hint"], source, atol=1e-6, rtol=0)
        want = int(source[0, 0].mean(0).argmax()) // 8  # latent column of the bright line in the VAE source
        for name in ("hed", "depth", "seg"):
            assert int(prepared[name][0, 0].mean(0).argmax()) // 8 == want, (name, width, group)


def test_tiled_equals_untiled_for_a_model_of_local_support(env):
    """A stand-in model whose output at a latent cell depends on its 3x3 neighbourhood only, installed as
    ComfyUI's model_function_wrapper (the path the tiles go through), sampled with DDPM (ancestral noise
    at every step): tiled and untiled runs give the same latent to 1e-4, for several tile batches.
    Catches per-tile sampling runs (independent trajectories, same-size tiles re-seeded with the same
    step noise: ~42% disagreement in overlaps), averaged overlaps that include padding-corrupted edge
    cells, noise drawn per tile, and a tile stack whose outputs are put back on the wrong tiles."""
    import comfy.sd
    import folder_paths

    sampler = _pack("nodes.sampler")
    tiling = _pack("megasr.tiling")
    model = comfy.sd.load_checkpoint_guess_config(folder_paths.get_full_path("checkpoints", env[1]))[0]
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(4, 4, 3, 3, generator=g) * 0.05

    def local_model(apply_model, args):
        x, t = args["input"], args["timestep"]
        ramp = (t / (1 + t)).view(-1, 1, 1, 1)
        return 0.3 * x * ramp + torch.nn.functional.conv2d(x, kernel, padding=1)

    m = model.clone()
    m.set_model_unet_function_wrapper(local_model)
    latent = torch.randn(1, 4, 40, 36, generator=g)
    canvas = tiling.Canvas.for_output(320, 288)
    cond = [[torch.zeros(1, 77, 1024), {}]]

    def run(tile, batch):
        return sampler.sample_canvas(
            m, latent, cond, cond, 5, 3, 2.0, "ddpm", "normal", 1.0, canvas, tile, 8, batch
        )  # fmt: skip

    untiled = run(64, 1)
    for batch in (1, 3):
        tiled = run(16, batch)  # 3 x 3 tiles of 16 cells, overlap 8
        torch.testing.assert_close(tiled, untiled, atol=1e-4, rtol=0)
