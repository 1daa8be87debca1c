"""The pack inside the real ComfyUI, in-process: shipped workflow, tiny SD-2 checkpoint, log checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from harness import checkpoints, comfy, workflow
from harness.images import load_image_array
from harness.paths import REPO_ROOT

COLOR_FIX = REPO_ROOT / "workflows" / "megasr_color_fix.json"


def _color_fix_prompt(object_info: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    prompt = workflow.to_api(workflow.load_workflow(COLOR_FIX), object_info)
    return workflow.set_inputs(prompt, overrides)


def test_pack_loaded_with_web_directory(comfy_runner: comfy.ComfyRunner) -> None:
    import nodes

    assert "MegaSRColorFix" in nodes.NODE_CLASS_MAPPINGS
    web_dirs = {Path(p).resolve() for p in nodes.EXTENSION_WEB_DIRS.values()}
    assert (REPO_ROOT / "web").resolve() in web_dirs


@pytest.mark.parametrize("mode", ["adain", "wavelet"])
def test_color_fix_workflow_runs_in_process(comfy_runner: comfy.ComfyRunner, object_info: dict, mode: str) -> None:
    prompt = _color_fix_prompt(object_info, **{"3.mode": mode, "SaveImage.filename_prefix": f"inproc_{mode}"})
    result = comfy_runner.run(prompt)
    [path] = result.images()
    img = load_image_array(path)
    lr = load_image_array(REPO_ROOT / "workflows" / "input" / "megasr_example_lr.png")
    assert img.shape == (2 * lr.shape[0], 2 * lr.shape[1], 3)
    assert np.isfinite(img).all() and 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    # The colour fix pulls the channel means to the reference's.
    assert np.abs(img.mean(axis=(0, 1)) - lr.mean(axis=(0, 1))).max() < 0.03
    events = [ev for ev, _ in result.messages]
    assert "execution_start" in events and "execution_success" in events
    assert any(d.get("node") == "4" for d in result.events("executed"))


def test_color_fix_workflow_is_deterministic(comfy_runner: comfy.ComfyRunner, object_info: dict) -> None:
    a = comfy_runner.run(_color_fix_prompt(object_info, **{"3.mode": "wavelet", "4.filename_prefix": "det_a"}))
    b = comfy_runner.run(_color_fix_prompt(object_info, **{"3.mode": "wavelet", "4.filename_prefix": "det_b"}))
    assert np.array_equal(load_image_array(a.images()[0]), load_image_array(b.images()[0]))


def test_invalid_prompt_is_rejected_by_validation(comfy_runner: comfy.ComfyRunner, object_info: dict) -> None:
    prompt = _color_fix_prompt(object_info)
    del prompt["3"]["inputs"]["reference"]
    with pytest.raises(comfy.PromptInvalid, match="reference"):
        comfy_runner.run(prompt)


def test_node_error_surfaces_as_execution_failed(comfy_runner: comfy.ComfyRunner, object_info: dict) -> None:
    prompt = _color_fix_prompt(object_info, **{"3.mode": "not-a-mode", "4.filename_prefix": "bad_mode"})
    with pytest.raises(comfy.ExecutionFailed) as info:
        comfy_runner.run(prompt)
    assert info.value.node_type == "MegaSRColorFix" and "not-a-mode" in info.value.exception_message


def test_key_problem_lines_are_detected() -> None:
    bad = [
        "clip missing: ['clip_h.transformer.text_model.encoder.layers.23.mlp.fc1.weight']",
        "unet unexpected: ['input_blocks.9.0.weight']",
        "Missing VAE keys ['decoder.conv_in.weight']",
        "Leftover VAE keys ['x']",
        "left over keys: dict_keys(['a'])",
        "missing controlnet keys: ['b']",
        "t2i missing ['c']",
    ]
    assert comfy.key_problems(bad) == bad
    assert comfy.key_problems(["model_type EPS", "Requested to load SD2ClipModel"]) == []


def test_tiny_sd2_checkpoint_loads_as_sd20_eps(comfy_runner: comfy.ComfyRunner, tiny_sd2_ckpt: str) -> None:
    import nodes

    with comfy.capture_logs() as records:
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd2_ckpt)
        tokens = clip.tokenize("a photo, clean, high-resolution, 8k")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    comfy.assert_no_key_problems(records)
    assert type(model.model.model_config).__name__ == "SD20"
    assert model.model.model_type.name == "EPS"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert cond.shape == (1, 77, 1024) and torch.isfinite(cond).all() and cond.std() > 0
    assert torch.isfinite(pooled).all()


def _sd2_prompt(ckpt: str, seed: int, size: int = 128) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blur"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": 2,
                "cfg": 5.5,
                "sampler_name": "ddpm",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"sd2_{seed}"}},
    }


def test_tiny_sd2_samples_through_the_real_executor(comfy_runner: comfy.ComfyRunner, tiny_sd2_ckpt: str) -> None:
    a = comfy_runner.run(_sd2_prompt(tiny_sd2_ckpt, seed=1))
    b = comfy_runner.run(_sd2_prompt(tiny_sd2_ckpt, seed=2))
    ia, ib = load_image_array(a.images()[0]), load_image_array(b.images()[0])
    assert ia.shape == ib.shape == (128, 128, 3)
    assert ia.std() > 0 and not np.array_equal(ia, ib)
    assert any(ev == "progress" for ev, _ in a.messages)


def test_diffusers_unet_equals_checkpoint_unet(tiny_sd2_ckpt: str) -> None:
    """``tiny_sd2_unet_diffusers`` is the very network stored in the checkpoint (for diffusers-side tests)."""
    sd = torch.load(checkpoints.checkpoints_dir() / tiny_sd2_ckpt, weights_only=True)["state_dict"]
    unet = checkpoints.tiny_sd2_unet_diffusers(checkpoints.DEFAULT_SEED)
    ldm = checkpoints.diffusers_unet_to_ldm(unet.state_dict())
    stored = {k[len("model.diffusion_model.") :]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    assert set(stored) == set(ldm)
    for key, value in ldm.items():
        assert torch.equal(stored[key], value), key
    assert sum(v.numel() for v in ldm.values()) < 40_000_000


def test_checkpoint_generation_is_byte_reproducible(tmp_path: Path, comfy_runner: comfy.ComfyRunner) -> None:
    a = checkpoints.ensure_tiny_sd2_checkpoint(root=tmp_path / "a")
    b = checkpoints.ensure_tiny_sd2_checkpoint(root=tmp_path / "b")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]
    stamp = json.loads(a.with_suffix(".stamp.json").read_text())
    assert stamp["sha256"] == digest[0] and stamp["version"] == checkpoints.FIXTURE_VERSION
    # A second call re-uses the cached file (same inode, no regeneration).
    ino = a.stat().st_ino
    assert checkpoints.ensure_tiny_sd2_checkpoint(root=tmp_path / "a").stat().st_ino == ino


def test_pyproject_is_read_by_comfyui(comfy_runner: comfy.ComfyRunner) -> None:
    """ComfyUI's own registry-metadata parser (comfy_config) understands our pyproject.toml."""
    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(REPO_ROOT))
    assert cfg is not None and cfg.project.name == "comfyui-megasr"
    assert cfg.tool_comfy.publisher_id == "megasr" and cfg.tool_comfy.display_name == "ComfyUI-MegaSR"


@pytest.mark.slow
def test_tiny_sd2_kl_checkpoint_has_the_real_vae(comfy_runner: comfy.ComfyRunner, tiny_sd2_kl_ckpt: str) -> None:
    import nodes

    with comfy.capture_logs() as records:
        model, _clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sd2_kl_ckpt)
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        latent = vae.encode(image)
        decoded = vae.decode(latent)
    comfy.assert_no_key_problems(records)
    assert type(model.model.model_config).__name__ == "SD20" and model.model.model_type.name == "EPS"
    assert type(vae.first_stage_model).__name__ == "AutoencoderKL"
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert decoded.shape[-3:] == (64, 64, 3) and torch.isfinite(decoded).all()
