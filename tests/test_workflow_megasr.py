"""The shipped MegaSR workflows, converted from UI format like the frontend does, in the real ComfyUI 0.3.75
executor with tiny generated checkpoints (SD-2 with TAESD, ViT-L CLIP vision, a MegaSR file)."""

from __future__ import annotations

import numpy as np
import pytest
from harness.comfy import ExecutionFailed
from harness.images import load_image_array
from megasr_fixtures import megasr_env, prompt, run_image


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def test_x4_exact_size_determinism_and_seed(env):
    a = run_image(env, "megasr_x4", **{"MegaSRSampler.seed": 1, "SaveImage.filename_prefix": "x4a"})
    assert a.shape[:2] == (44, 52)  # exactly 4 x (11, 13)
    assert a.std() > 0
    a2 = run_image(env, "megasr_x4", **{"MegaSRSampler.seed": 1, "SaveImage.filename_prefix": "x4b"})
    np.testing.assert_array_equal(a, a2)
    b = run_image(env, "megasr_x4", **{"MegaSRSampler.seed": 2, "SaveImage.filename_prefix": "x4c"})
    assert np.abs(a.astype(float) - b).max() > 0


def test_swapping_a_guidance_map_changes_the_result(env):
    kw = {"MegaSRSampler.seed": 3}
    a = run_image(
        env,
        "megasr_swap_guidance",
        **kw,
        **{"Hand-made depth map.image": "t_depth_a.png", "SaveImage.filename_prefix": "swa"},
    )
    # another map, at another size: resized to the LR size, and the node says so
    p = prompt(
        env,
        "megasr_swap_guidance",
        **kw,
        **{"Hand-made depth map.image": "t_depth_b.png", "SaveImage.filename_prefix": "swb"},
    )
    result = env[0].run(p)
    b = load_image_array(result.images(next(k for k, n in p.items() if n["class_type"] == "SaveImage"))[0])
    assert a.shape == b.shape == (44, 52, 3)
    assert np.abs(a.astype(float) - b).max() > 0
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
    assert img.shape[:2] == (144, 160)  # exactly 4 x (36, 40)
    assert (2, 2) in seen and not any(total == 2 * 4 for _, total in seen)  # progress counts steps, not tile runs


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
    assert np.abs(a.astype(float) - b).max() > 0  # same LR, different noise per batch item
