"""The full MegaSR graph in the real ComfyUI 0.3.75 executor, with tiny generated checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from harness.checkpoints import ensure_tiny_sd2_checkpoint
from harness.comfy import ExecutionFailed, get_runner
from harness.images import load_image_array, write_test_image
from megasr_fixtures import ensure_tiny_clip_vision, ensure_tiny_megasr


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    base = tmp_path_factory.mktemp("megasr_run")
    r = get_runner(base / "input", base / "output", base / "temp")
    ckpt = ensure_tiny_sd2_checkpoint()
    r.register_model_dir("checkpoints", ckpt.parent)
    r.register_model_dir("clip_vision", ensure_tiny_clip_vision().parent)
    r.register_model_dir("megasr", ensure_tiny_megasr().parent)
    write_test_image(base / "input" / "lr.png", width=13, height=11, seed=1)
    write_test_image(base / "input" / "depth_a.png", width=13, height=11, seed=2)
    write_test_image(base / "input" / "depth_b.png", width=26, height=22, seed=3)
    r.base = base
    return r


def graph(seed=1, depth="depth_a.png", with_cism=True, prefix="megasr"):
    from harness.checkpoints import CHECKPOINT_NAME
    from megasr_fixtures import CLIP_VISION_NAME, MEGASR_NAME

    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_NAME}},
        "msr": {"class_type": "MegaSRModelLoader", "inputs": {"megasr_name": MEGASR_NAME}},
        "lr": {"class_type": "LoadImage", "inputs": {"image": "lr.png"}},
        "depth": {"class_type": "LoadImage", "inputs": {"image": depth}},
        "sem": {
            "class_type": "MegaSRClipSemantics",
            "inputs": {"image": ["lr", 0], "clip_vision": ["cv", 0], "crop": "none"},
        },
        "cism": {
            "class_type": "MegaSRCismInjection",
            "inputs": {
                "model": ["ckpt", 0],
                "megasr_model": ["msr", 0],
                "semantics": ["sem", 0],
                "strength": 1.0,
                "strength_full_res": 1.0,
                "strength_half_res": 1.0,
                "strength_quarter_res": 1.0,
                "strength_eighth_res": 1.0,
            },
        },
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "clean, high-resolution, 8k", "clip": ["ckpt", 1]}},
        "neg": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "dotted, noise, blur, lowres, smooth", "clip": ["ckpt", 1]},
        },
        "gam": {
            "class_type": "MegaSRGuidanceFusion",
            "inputs": {
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "megasr_model": ["msr", 0],
                "lr_image": ["lr", 0],
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "hed_strength": 1.0,
                "depth_strength": 1.0,
                "seg_strength": 1.0,
                "hed": ["lr", 0],
                "depth": ["depth", 0],
            },
        },
        "sample": {
            "class_type": "MegaSRSampler",
            "inputs": {
                "model": ["cism", 0] if with_cism else ["ckpt", 0],
                "positive": ["gam", 0],
                "negative": ["gam", 1],
                "vae": ["ckpt", 2],
                "lr_image": ["lr", 0],
                "scale": 4.0,
                "seed": seed,
                "steps": 2,
                "cfg": 5.5,
                "sampler_name": "ddpm",
                "scheduler": "normal",
                "denoise": 1.0,
                "tile_size": 1024,
                "tile_overlap": 128,
                "color_fix": "adain",
            },
        },
        "save": {"class_type": "SaveImage", "inputs": {"images": ["sample", 0], "filename_prefix": prefix}},
    }
    return g


def run_image(runner, **kw) -> np.ndarray:
    result = runner.run(graph(**kw))
    paths = result.images("save")
    assert len(paths) == 1
    return load_image_array(paths[0])


def test_megasr_graph_output_size_determinism_and_guidance(runner):
    a = run_image(runner, seed=1, prefix="a")
    assert a.shape[:2] == (44, 52)  # exactly 4 x (11, 13)
    assert np.isfinite(a).all() and a.std() > 0
    a2 = run_image(runner, seed=1, prefix="a2")
    np.testing.assert_array_equal(a, a2)
    b = run_image(runner, seed=2, prefix="b")
    assert np.abs(a.astype(float) - b).max() > 0
    swapped = run_image(runner, seed=1, depth="depth_b.png", prefix="swap")  # other map, other size: resized
    assert np.abs(a.astype(float) - swapped).max() > 0


def test_graph_without_cism_node_fails_with_a_clear_message(runner):
    with pytest.raises(ExecutionFailed) as e:
        runner.run(graph(with_cism=False, prefix="nocism"))
    assert "CISM² Semantic Injection" in str(e.value.data)
