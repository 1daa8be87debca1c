"""Tiny, structurally real MegaSR and CLIP-vision files for the real-ComfyUI tests (generated, seeded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from harness.checkpoints import TINY_SD2_UNET_CONFIG
from harness.paths import cache_dir
from megasr_testing import import_comfy, perturb_zero_inits, seeded

FIXTURE_VERSION = "1"
CLIP_VISION_NAME = "megasr_tiny_vitl.ckpt"
MEGASR_NAME = "megasr_tiny_sd2.safetensors"
CLIP_DIM = 1024  # ViT-L/14 width: ComfyUI detects CLIP vision configs by depth, ViT-L is its smallest CLIP


def models_dir(folder: str) -> Path:
    """The fixture cache's ComfyUI model folder (the in-process runner and the test server both read it)."""
    return cache_dir() / "models" / folder


def _fresh(path: Path, stamp: str) -> bool:
    s = path.with_suffix(".stamp")
    return path.exists() and s.exists() and s.read_text() == stamp


def ensure_tiny_clip_vision(folder: Path | None = None) -> Path:
    """A ViT-L/14 CLIP vision file in ComfyUI's layout; values are views into one small random pool."""
    folder = folder or models_dir("clip_vision")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLIP_VISION_NAME
    stamp = f"{FIXTURE_VERSION}-vitl"
    if _fresh(path, stamp):
        return path
    import_comfy()
    import comfy.clip_vision

    cfg = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in comfy.clip_vision.ClipVisionModel(str(cfg)).model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 22, generator=g) * 0.02
    ones, zeros = torch.ones(1 << 12), torch.zeros(1 << 12)
    sd = {}
    for k, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        if "norm" in k and k.endswith(".weight"):
            sd[k] = ones[:n].view(shape)
        elif k.endswith(".bias"):
            sd[k] = zeros[:n].view(shape)
        else:
            reps = -(-n // pool.numel())
            src = pool if reps == 1 else pool.repeat(reps)
            sd[k] = src[:n].view(shape)
    torch.save(sd, path)
    path.with_suffix(".stamp").write_text(stamp)
    return path


def tiny_megasr_model(clip_dim: int = CLIP_DIM):
    from megasr.model import MegaSRConfig, MegaSRModel

    with seeded(3):
        model = MegaSRModel(MegaSRConfig(unet=dict(TINY_SD2_UNET_CONFIG), clip_dim=clip_dim, msgam_hidden=16))
    perturb_zero_inits(model, seed=4, scale=0.05)  # trained-like: every part changes the output
    return model


def ensure_tiny_megasr(folder: Path | None = None) -> Path:
    from megasr.model_io import save_megasr_model

    folder = folder or models_dir("megasr")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MEGASR_NAME
    stamp = f"{FIXTURE_VERSION}-{json.dumps(TINY_SD2_UNET_CONFIG, sort_keys=True, default=list)}"
    if _fresh(path, stamp):
        return path
    save_megasr_model(str(path), tiny_megasr_model(), {"made_by": "tests/megasr_fixtures.py"}, overwrite=True)
    path.with_suffix(".stamp").write_text(stamp)
    return path


def megasr_env(comfy_runner, tiny_sd2_ckpt: str, object_info: dict) -> tuple:
    """Register the tiny MegaSR/CLIP-vision files and write small test inputs; returns (runner, ckpt, info)."""
    import folder_paths
    from harness.images import write_test_image

    comfy_runner.register_model_dir("clip_vision", ensure_tiny_clip_vision().parent)
    comfy_runner.register_model_dir("megasr", ensure_tiny_megasr().parent)
    ensure_dage_files()
    comfy_runner.register_model_dir("megasr", models_dir("megasr"), first=False)
    inp = folder_paths.get_input_directory()
    write_test_image(f"{inp}/t_lr.png", width=13, height=11, seed=1)
    write_test_image(f"{inp}/t_depth_a.png", width=13, height=11, seed=2)
    write_test_image(f"{inp}/t_depth_b.png", width=26, height=22, seed=3)
    write_test_image(f"{inp}/t_big.png", width=40, height=36, seed=4)
    return comfy_runner, tiny_sd2_ckpt, object_info


def prompt(env: tuple, name: str, **overrides) -> dict:
    """A shipped workflow as the API prompt the frontend would queue, pointed at the tiny files."""
    from harness.paths import REPO_ROOT
    from harness.workflow import find_nodes, load_workflow, set_inputs, to_api

    _, ckpt, info = env
    p = to_api(load_workflow(REPO_ROOT / "workflows" / f"{name}.json"), info)
    dage = ensure_dage_files()
    base = {
        "CheckpointLoaderSimple.ckpt_name": ckpt,
        "CLIPVisionLoader.clip_name": CLIP_VISION_NAME,
        "MegaSRModelLoader.megasr_name": MEGASR_NAME,
        "LR image.image": "t_lr.png",
        "MegaSRSampler.steps": 2,
        **{target: dage[key] for target, key in DAGE_FILES.items()},
        **{f"{n}.resolution": 64 for n in ("MegaSRDageHED", "MegaSRDageDepth", "MegaSRDageSegmentation")},
    }
    base = {k: v for k, v in base.items() if find_nodes(p, k.rsplit(".", 1)[0])}  # only nodes this graph has
    base.update(overrides)
    return set_inputs(p, base)


def run_image(env: tuple, name_or_prompt, **overrides):
    from harness.images import load_image_array

    p = prompt(env, name_or_prompt, **overrides) if isinstance(name_or_prompt, str) else name_or_prompt
    result = env[0].run(p)
    save = [k for k, n in p.items() if n["class_type"] == "SaveImage"]
    assert len(save) == 1
    paths = result.images(save[0])  # the DAGE nodes' inline previews are outputs too
    assert len(paths) == 1
    return load_image_array(paths[0])


def ensure_tiny_controlnet(folder: Path | None = None) -> Path:
    """A ComfyUI-layout (LDM) ControlNet for the tiny SD-2 U-Net, to stack with MegaSR's."""
    import safetensors.torch

    folder = folder or models_dir("controlnet")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "megasr_tiny_sd2_controlnet.safetensors"
    if _fresh(path, FIXTURE_VERSION):
        return path
    import_comfy()
    import comfy.cldm.cldm
    import comfy.ops

    from megasr.blocks import comfy_unet_config

    cfg = comfy_unet_config(dict(TINY_SD2_UNET_CONFIG))
    cfg.pop("out_channels")
    cfg.pop("transformer_depth_output")
    with torch.device("meta"):
        cn = comfy.cldm.cldm.ControlNet(hint_channels=3, **cfg, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in cn.state_dict().items()}
    safetensors.torch.save_file(sd, str(path))
    path.with_suffix(".stamp").write_text(FIXTURE_VERSION)
    return path


DAGE_FILES = {  # the names the shipped workflows use -> the tiny test files
    "DAGE HED weights.dage_name": "dage_hed",
    "DAGE depth weights.dage_name": "dage_depth_lora",
    "DAGE depth weights.base_name": "depth_base",
    "DAGE seg weights.dage_name": "dage_seg",
    "DAGE CLIP LoRA.dage_name": "dage_clip_lora_vitl",
}


def ensure_dage_files(folder: Path | None = None) -> dict[str, str]:
    """Tiny DAGE weight files (tests/dage_fixtures.py) plus a CLIP LoRA that fits the ViT-L test CLIP vision."""
    from dage_fixtures import _randomize_lora, write_dage_weight_files

    from megasr.dage.clip import ClipExtractor

    folder = folder or models_dir("megasr")
    stamp_path = folder / "dage.stamp"
    names = {
        "dage_hed": "tiny_dage_hed.safetensors",
        "dage_depth_lora": "tiny_dage_depth_lora.safetensors",
        "depth_base": "tiny_depth_anything_base.safetensors",
        "dage_seg": "tiny_dage_seg.safetensors",
        "dage_clip_lora_vitl": "tiny_dage_clip_lora_vitl.safetensors",
    }
    if (
        stamp_path.exists()
        and stamp_path.read_text() == FIXTURE_VERSION
        and all((folder / n).exists() for n in names.values())
    ):
        return names
    folder.mkdir(parents=True, exist_ok=True)
    write_dage_weight_files(str(folder), ("dage_hed", "dage_depth_lora", "dage_seg"))
    vitl = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }
    with seeded(6):
        clip = ClipExtractor.from_config({"clip": vitl})
    _randomize_lora(clip, 7)
    clip.save(str(folder / names["dage_clip_lora_vitl"]), provenance={"test": "tiny random"}, overwrite=True)
    stamp_path.write_text(FIXTURE_VERSION)
    return names


def fusion_args(megasr) -> dict:
    """The required inputs of a minimal MegaSR Guidance Fusion call (neutral strengths, empty conditioning)."""
    cond = [[torch.zeros(1, 7, 1024), {}]]
    return dict(
        positive=cond,
        negative=cond,
        megasr_model=megasr,
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
        hed_strength=1.0,
        depth_strength=1.0,
        seg_strength=1.0,
    )


def loaded_control(patched, positive) -> tuple:
    """What ComfyUI's sampler does before the first model call: load the patched MODEL with the control chain's
    models and ``pre_run`` every control of the chain. Returns (text embedding, control, base model, model_sampling)."""
    import comfy.model_management

    emb, extra = positive[0]
    control = extra["control"]
    comfy.model_management.load_models_gpu([patched] + control.get_models())
    base = patched.model
    ms = base.model_sampling
    c = control
    while c is not None:
        c.pre_run(base, lambda p: ms.percent_to_sigma(p))
        c = c.previous_controlnet
    return emb, control, base, ms
