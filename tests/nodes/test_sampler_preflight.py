"""Memory preflight of the MegaSR Sampler (issue 14): a huge output is refused before any work."""

from __future__ import annotations

import pytest
import torch
from megasr_fixtures import megasr_env


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def test_a_4096_lr_at_x4_is_refused_before_any_work_and_the_next_prompt_runs(env):
    """Issue 14: a 4096x4096 LR at x4 grew the server past 9 GB until it was killed. The preflight must
    refuse it before the upscale (so within seconds, memory untouched), name the numbers and the input,
    and leave ComfyUI able to run the next prompt. Catches a preflight that is skipped, that runs after
    the upscale/VAE encode, or that ignores the output size."""
    import time

    import comfy.model_management
    import folder_paths
    from harness.comfy import ExecutionFailed
    from PIL import Image

    from megasr.memory import estimate_sampler_peak_bytes

    if estimate_sampler_peak_bytes((4096, 4096), 4.0).peak < comfy.model_management.get_free_memory(
        torch.device("cpu")
    ):
        pytest.skip("this machine has enough RAM for a 16384x16384 output")
    Image.new("RGB", (4096, 4096), (120, 130, 140)).save(f"{folder_paths.get_input_directory()}/t_4096.png")

    def graph(image: str, prefix: str) -> dict:
        return {
            "ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": env[1]}},
            "p": {"class_type": "CLIPTextEncode", "inputs": {"text": "clean", "clip": ["ck", 1]}},
            "n": {"class_type": "CLIPTextEncode", "inputs": {"text": "blur", "clip": ["ck", 1]}},
            "lr": {"class_type": "LoadImage", "inputs": {"image": image}},
            "s": {
                "class_type": "MegaSRSampler",
                "inputs": {
                    "model": ["ck", 0],
                    "positive": ["p", 0],
                    "negative": ["n", 0],
                    "vae": ["ck", 2],
                    "lr_image": ["lr", 0],
                    "scale": 4.0,
                    "seed": 1,
                    "steps": 1,
                    "cfg": 1.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 0.0,
                    "tile_size": 1024,
                    "tile_overlap": 128,
                    "color_fix": "none",
                    "tile_batch": 4,
                },
            },  # fmt: skip
            "save": {"class_type": "SaveImage", "inputs": {"images": ["s", 0], "filename_prefix": prefix}},
        }

    start = time.monotonic()
    with pytest.raises(ExecutionFailed) as e:
        env[0].run(graph("t_4096.png", "huge"))
    took = time.monotonic() - start
    msg = e.value.exception_message
    assert "MegaSR Sampler" in msg and "'scale'" in msg and "16384x16384" in msg and "GiB" in msg, msg
    assert took < 120, took  # loose: refusal comes before the upscale (the load of the PNG dominates)
    result = env[0].run(graph("t_lr.png", "after_huge"))
    assert result.images("save")
