"""The shipped MegaSR workflows, converted from UI format like the frontend does, in the real ComfyUI 0.3.75
executor with tiny generated checkpoints (SD-2 with TAESD, ViT-L CLIP vision, a MegaSR file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness.comfy import ExecutionFailed
from harness.images import load_image_array
from megasr_fixtures import megasr_env, prompt
from PIL import Image


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _pack_class(module: str, name: str):
    """A class of the pack *as ComfyUI loaded it* (its module path differs from a plain ``import megasr``)."""
    import importlib

    import nodes

    base = nodes.NODE_CLASS_MAPPINGS["MegaSRSampler"].__module__.rsplit(".", 2)[0]
    return getattr(importlib.import_module(f"{base}.{module}"), name)


def _png(name: str) -> torch.Tensor:
    """An input-folder PNG as ComfyUI's LoadImage reads it, [1, 3, H, W] float 0..1."""
    import folder_paths

    with Image.open(f"{folder_paths.get_input_directory()}/{name}") as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def _on_canvas(x: torch.Tensor, out_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Written out here (not the pack's to_canvas): resize to the output size, replicate-pad to a multiple of 8."""
    kw = {} if mode == "nearest-exact" else {"align_corners": False}
    x = F.interpolate(x, size=out_hw, mode=mode, **kw)
    ph, pw = -(-out_hw[0] // 8) * 8, -(-out_hw[1] // 8) * 8
    return F.pad(x, (0, pw - out_hw[1], 0, ph - out_hw[0]), mode="replicate")


def _save_latent(p: dict) -> str:
    sampler = next(k for k, n in p.items() if n["class_type"] == "MegaSRSampler")
    prefix = p[next(k for k, n in p.items() if n["class_type"] == "SaveImage")]["inputs"]["filename_prefix"]
    p["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 1], "filename_prefix": prefix}}
    return sampler


def _latent(result) -> torch.Tensor:
    import folder_paths
    import safetensors.torch

    (f,) = [f for out in result.outputs.values() for f in out.get("latents", [])]
    path = f"{folder_paths.get_output_directory()}/{f.get('subfolder', '')}/{f['filename']}"
    return safetensors.torch.load_file(path)["latent_tensor"].float()


@torch.no_grad()
def test_x4_output_is_the_colour_fixed_decode_at_exactly_4x_and_follows_the_seed(env):
    """The shipped x4 graph's IMAGE must be, to 8-bit rounding, ComfyUI's own VAEDecode of the sampler's LATENT
    cropped to exactly 4 x (11, 13) at the top left, with AdaIN giving it the per-channel mean/std of the bicubic
    x4 LR (computed here from the PNG; so the low frequencies, the colour, are the LR's).

    Catches an output resized instead of cropped (or cropped off-centre / left padded), a colour fix skipped or
    taken from the wrong reference (the LR at its own size, another filter, the decoded image), a colour fix on the
    padded canvas, and a seed that is ignored (seed 2 must give another latent). Noise that is not determined by
    the seed is caught by tests/nodes/test_sampling_path.py (two separate runs equal bit for bit)."""
    import nodes

    p = prompt(env, "megasr_x4", **{"MegaSRSampler.seed": 1, "SaveImage.filename_prefix": "x4a"})
    _save_latent(p)
    result = env[0].run(p)
    save = next(k for k, n in p.items() if n["class_type"] == "SaveImage")
    (path,) = result.images(save)
    a = load_image_array(path)
    assert a.shape == (44, 52, 3)  # exactly 4 x (11, 13)
    latent = _latent(result)
    assert latent.shape == (1, 4, 6, 7)  # the canvas 48 x 56 (44 x 52 padded to a multiple of 8)

    vae = nodes.CheckpointLoaderSimple().load_checkpoint(env[1])[2]
    decoded = vae.decode(latent).float()[:, :44, :52, :3].permute(0, 3, 1, 2)
    ref = F.interpolate(_png("t_lr.png"), size=(44, 52), mode="bicubic", align_corners=False)
    t_mean, t_std = decoded.mean(dim=(2, 3), keepdim=True), decoded.std(dim=(2, 3), keepdim=True)
    r_mean, r_std = ref.mean(dim=(2, 3), keepdim=True), ref.std(dim=(2, 3), keepdim=True)
    raw = (decoded - t_mean) / (t_std + 1e-5) * r_std + r_mean
    assert ((raw > 0) & (raw < 1)).float().mean() > 0.5  # the clamp leaves most pixels to compare
    expected = raw.clamp(0, 1)[0].permute(1, 2, 0).numpy()
    below = expected * 255 - a * 255  # SaveImage truncates to 8 bit: 0 <= below < 1
    assert below.min() > -1e-3 and below.max() < 1 + 1e-3, (below.min(), below.max())

    p2 = prompt(env, "megasr_x4", **{"MegaSRSampler.seed": 2, "SaveImage.filename_prefix": "x4c"})
    _save_latent(p2)
    other = _latent(env[0].run(p2))
    assert (other - latent).abs().mean() > 1e-2 * latent.abs().mean()  # seed 2 samples other noise


def test_swapped_guidance_maps_reach_the_model_in_their_slots_at_the_output_size(env, monkeypatch):
    """The guidance workflow with all three maps hand-made (HED 13x11 = the LR size, depth 26x22, segmentation
    7x6 in ADE20K colours): what the MegaSR model receives as its HED / depth / segmentation maps
    (``MegaSRModel.prepare_context``, the one place both networks take their guidance from) must be exactly
    those images, HED and depth as the channel mean, resized to the 44x52 output (bilinear; nearest for
    segmentation, so its colours stay palette colours) and replicate-padded to the 48x56 latent canvas.

    Catches a swapped map that never reaches the model (the extracted one used instead), maps fed into each
    other's slots, a map resized to the latent or LR size instead of the output, shifted or stretched over the
    padded canvas, resized with another filter, and a wrong channel reduction; the node also says the depth map
    was resized (the old test only checked that another depth map changes some 8-bit pixel)."""
    import inspect

    import folder_paths
    from harness.images import write_test_image

    from megasr.dage.encodings import palette_tensor

    inp = folder_paths.get_input_directory()
    write_test_image(f"{inp}/t_hed_swap.png", width=13, height=11, seed=21)
    palette = (palette_tensor() * 255).round().to(torch.uint8)
    labels = np.random.default_rng(22).integers(0, 150, size=(6, 7))
    Image.fromarray(palette[torch.from_numpy(labels)].numpy()).save(f"{inp}/t_seg_swap.png")

    model_cls = _pack_class("megasr.model", "MegaSRModel")
    original = model_cls.prepare_context
    signature = inspect.signature(original)
    seen = []

    def recording(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        seen.append({k: bound.get(k) for k in ("latent_hw", "hed", "depth", "seg")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model_cls, "prepare_context", recording)
    p = prompt(
        env,
        "megasr_swap_guidance",
        **{
            "MegaSRSampler.seed": 3,
            "Hand-made depth map.image": "t_depth_b.png",
            "Hand-painted segmentation (ADE20K colours).image": "t_seg_swap.png",
            "SaveImage.filename_prefix": "swap",
        },
    )
    fusion = next(n for n in p.values() if n["class_type"] == "MegaSRGuidanceFusion")
    p["hand_hed"] = {"class_type": "LoadImage", "inputs": {"image": "t_hed_swap.png"}}
    fusion["inputs"]["hed"] = ["hand_hed", 0]
    result = env[0].run(p)
    save = next(k for k, n in p.items() if n["class_type"] == "SaveImage")
    assert load_image_array(result.images(save)[0]).shape == (44, 52, 3)

    expected = {
        "hed": _on_canvas(_png("t_hed_swap.png").mean(dim=1, keepdim=True), (44, 52), "bilinear"),
        "depth": _on_canvas(_png("t_depth_b.png").mean(dim=1, keepdim=True), (44, 52), "bilinear"),
        "seg": _on_canvas(_png("t_seg_swap.png"), (44, 52), "nearest-exact"),
    }
    with_maps = [c for c in seen if c["hed"] is not None or c["depth"] is not None or c["seg"] is not None]
    assert with_maps, "the MegaSR model never received the guidance maps"
    for call in with_maps:
        assert tuple(call["latent_hw"]) == (6, 7)
        for kind, want in expected.items():
            got = call[kind]
            assert got is not None and tuple(got.shape) == tuple(want.shape), (kind, None if got is None else got.shape)
            torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=0, msg=lambda m, k=kind: f"{k}: {m}")
    said = [r.getMessage() for r in result.logs if "is resized" in r.getMessage()]
    assert any("depth map is 26x22, LR is 13x11" in m for m in said), said


def test_large_image_runs_in_tiles_with_exact_size(env):
    overrides = {
        "LR image.image": "t_big.png",
        "SaveImage.filename_prefix": "big",
        "MegaSRSampler.tile_size": 128,  # 160 x 144 output -> 2 x 2 tiles of 128 px, 32 px overlap
        "MegaSRSampler.tile_overlap": 32,
    }
    import comfy.utils

    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    p = prompt(env, "megasr_large_tiled", **overrides)
    try:
        result = env[0].run(p)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    img = load_image_array(result.images(next(k for k, n in p.items() if n["class_type"] == "SaveImage"))[0])
    assert img.shape == (144, 160, 3)  # exactly 4 x (36, 40)
    steps = p[next(k for k, n in p.items() if n["class_type"] == "MegaSRSampler")]["inputs"]["steps"]
    assert [s for s in seen if s[1] == steps] == [(i, steps) for i in range(1, steps + 1)], seen  # steps, not tiles

    # the 2 x 2 tiles were blended, not skipped: one tile covering everything gives another latent, while the
    # same tiles run one at a time (tile_batch 1) give this latent again (batching tiles changes nothing).
    # Read on the sampler's latents: a random U-Net's 8-bit image hardly moves.
    def latent(**extra) -> torch.Tensor:
        q = prompt(env, "megasr_large_tiled", **{**overrides, **extra})
        _save_latent(q)
        return _latent(env[0].run(q))

    tiled = latent(**{"SaveImage.filename_prefix": "big_l4"})
    whole = latent(**{"MegaSRSampler.tile_size": 256, "SaveImage.filename_prefix": "big_l1"})
    one_by_one = latent(**{"MegaSRSampler.tile_batch": 1, "SaveImage.filename_prefix": "big_lb1"})
    assert tiled.shape == whole.shape == (1, 4, 18, 20)
    scale = float(whole.abs().max())
    assert float((tiled - whole).abs().max()) > 1e-3 * scale, "tile_size 128 gave the untiled latent"
    torch.testing.assert_close(one_by_one, tiled, atol=1e-5 * scale, rtol=1e-5)


def test_graph_without_the_cism_node_fails_with_a_clear_message(env):
    p = prompt(env, "megasr_x4", **{"SaveImage.filename_prefix": "nocism"})
    sampler = next(n for n in p.values() if n["class_type"] == "MegaSRSampler")
    ckpt_id = next(k for k, n in p.items() if n["class_type"] == "CheckpointLoaderSimple")
    sampler["inputs"]["model"] = [ckpt_id, 0]
    with pytest.raises(ExecutionFailed) as e:
        env[0].run(p)
    assert "CISM² Semantic Injection" in str(e.value.data)


def test_guidance_maps_workflow_saves_every_map(env):
    p = prompt(env, "megasr_guidance_maps", **{"SaveImage.filename_prefix": "maps"})
    result = env[0].run(p)
    paths = [path for k, n in p.items() if n["class_type"] == "SaveImage" for path in result.images(k)]
    assert len(paths) == 3
    for path in paths:
        m = load_image_array(path)
        assert m.shape[:2] == (11, 13)  # maps have the LR image's size


def test_an_unchanged_graph_is_answered_from_cache(env):
    p = prompt(env, "megasr_guidance_maps", **{"SaveImage.filename_prefix": "cache"})
    env[0].run(p)
    again = env[0].run(p)
    cached = {str(n) for ev in again.events("execution_cached") for n in ev.get("nodes", [])}
    dage_nodes = {k for k, n in p.items() if n["class_type"].startswith("MegaSRDage")}
    assert dage_nodes and dage_nodes <= cached  # deterministic inputs: nothing of ours is recomputed


def test_a_batch_of_two_lr_images(env):
    p = prompt(env, "megasr_x4", **{"SaveImage.filename_prefix": "batch2"})
    lr_id = next(k for k, n in p.items() if n["class_type"] == "LoadImage")
    for n in p.values():
        for name, v in n["inputs"].items():
            if v == [lr_id, 0]:
                n["inputs"][name] = ["rep", 0]
    p["rep"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [lr_id, 0], "amount": 2}}
    result = env[0].run(p)
    save = next(k for k, n in p.items() if n["class_type"] == "SaveImage")
    paths = result.images(save)
    assert len(paths) == 2
    a, b = (load_image_array(x) for x in paths)
    assert a.shape == b.shape == (44, 52, 3)
    # the batch's latents: finite, two items, and the items differ by far more than rounding (own noise each)
    p[save]["inputs"]["filename_prefix"] = "batch2l"
    _save_latent(p)
    pair = _latent(env[0].run(p))
    assert pair.shape == (2, 4, 6, 7) and torch.isfinite(pair).all()
    assert float((pair[0] - pair[1]).abs().mean()) > 0.05 * float(pair.abs().mean())


def test_batch_item_0_is_the_single_image_run(env):
    """Item 0 of a batch equals the single-image run with the same seed (latent level; euler, no per-step noise).
    Catches items sharing or swapping noise, conditioning / maps / CISM tokens crossing between batch items.

    The LR is 16 x 12 so that one item's latent (4 x 8 x 6 = 192 values) is a multiple of 16: torch's CPU
    ``randn`` redraws the last 16 values of a tensor whose size is not, so ComfyUI's one-stream batch noise is
    item-0-equal to the single draw only then (the issue 29 finding was exactly that tail, not a coupling)."""
    import folder_paths
    from harness.images import write_test_image

    inp = folder_paths.get_input_directory()
    write_test_image(f"{inp}/t_lr_16x12.png", width=16, height=12, seed=7)
    write_test_image(f"{inp}/t_lr_16x12_b.png", width=16, height=12, seed=8)
    g = torch.Generator().manual_seed(3)
    one = torch.randn(1, 4, 8, 6, generator=g)
    g.manual_seed(3)
    assert torch.equal(torch.randn(2, 4, 8, 6, generator=g)[:1], one)  # the premise above

    def run(batch: bool, prefix: str) -> torch.Tensor:
        """The LR alone, or batched with a *different* image as item 1 (whose maps, CISM tokens and colour
        statistics must not reach item 0)."""
        q = prompt(env, "megasr_x4", **{"SaveImage.filename_prefix": prefix, "MegaSRSampler.sampler_name": "euler"})
        lr_id = next(k for k, n in q.items() if n["class_type"] == "LoadImage")
        q[lr_id]["inputs"]["image"] = "t_lr_16x12.png"
        # a batch shares one prompt (RAM Tags gives the union of its images' tags, nodes/ram.py), so the text is
        # fixed here: what must stay per item is everything else (noise, hint, maps, CISM² and RAM tokens)
        (pos,) = [
            n for n in q.values() if n["class_type"] == "CLIPTextEncode" and isinstance(n["inputs"]["text"], list)
        ]
        pos["inputs"]["text"] = "a photo"
        if batch:
            for n in q.values():
                for name, v in n["inputs"].items():
                    if v == [lr_id, 0]:
                        n["inputs"][name] = ["pair", 0]
            q["other"] = {"class_type": "LoadImage", "inputs": {"image": "t_lr_16x12_b.png"}}
            q["pair"] = {"class_type": "ImageBatch", "inputs": {"image1": [lr_id, 0], "image2": ["other", 0]}}
        _save_latent(q)
        return _latent(env[0].run(q))

    alone, pair = run(False, "b0_alone"), run(True, "b0_pair")
    assert pair.shape[0] == 2 and float((pair[0] - pair[1]).abs().max()) > 0.05 * float(alone.abs().max())
    scale = float(alone.abs().max())
    torch.testing.assert_close(pair[:1], alone, atol=1e-4 * scale, rtol=1e-4)
