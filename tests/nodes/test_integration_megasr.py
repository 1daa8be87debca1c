"""MegaSR inside ComfyUI's machinery: stacking with core ControlNets, Cancel, model unloading."""

from __future__ import annotations

import pytest
from harness.comfy import ExecutionFailed
from megasr_fixtures import ensure_tiny_controlnet, megasr_env, prompt, run_image


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    comfy_runner.register_model_dir("controlnet", ensure_tiny_controlnet().parent)
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _with_core_controlnet(p: dict, before_megasr: bool) -> dict:
    """Insert ComfyUI's own ControlNetApplyAdvanced after (or before) the MS-GAM node."""
    gam = next(k for k, n in p.items() if n["class_type"] == "MegaSRGuidanceFusion")
    sampler = next(n for n in p.values() if n["class_type"] == "MegaSRSampler")
    lr = p[gam]["inputs"]["lr_image"]
    p["cnl"] = {
        "class_type": "ControlNetLoader",
        "inputs": {"control_net_name": "megasr_tiny_sd2_controlnet.safetensors"},
    }
    p["cna"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {"control_net": ["cnl", 0], "image": lr, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
    }
    if before_megasr:
        p["cna"]["inputs"].update(positive=p[gam]["inputs"]["positive"], negative=p[gam]["inputs"]["negative"])
        p[gam]["inputs"].update(positive=["cna", 0], negative=["cna", 1])
    else:
        p["cna"]["inputs"].update(positive=[gam, 0], negative=[gam, 1])
        sampler["inputs"].update(positive=["cna", 0], negative=["cna", 1])
    return p


def test_guidance_fusion_after_a_core_controlnet_runs_through_the_graph(env):
    """Catches a Guidance Fusion that refuses (or crashes on) conditioning already carrying a core ControlNet,
    through the real executor; the residual arithmetic of stacking, in both orders, is pinned exactly by
    tests/nodes/test_control_branches.py::test_msgam_stacks_with_comfyui_controlnet_in_either_order."""
    before = run_image(
        env, _with_core_controlnet(prompt(env, "megasr_x4", **{"SaveImage.filename_prefix": "st2"}), True)
    )
    assert before.shape == (44, 52, 3)  # exactly 4 x the (11, 13) LR


def test_cancel_stops_within_a_step_and_the_next_prompt_runs(env):
    import comfy.model_management
    import comfy.utils

    steps_seen = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        # What ComfyUI's server installs (main.py): check for Cancel on every progress update.
        comfy.model_management.throw_exception_if_processing_interrupted()
        steps_seen.append((value, total))
        if value == 1 and total == 5:
            comfy.model_management.interrupt_current_processing(True)  # the user presses Cancel

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        p = prompt(env, "megasr_x4", **{"MegaSRSampler.steps": 5, "SaveImage.filename_prefix": "cancel"})
        with pytest.raises(ExecutionFailed) as e:
            env[0].run(p)
        assert e.value.event == "execution_interrupted"
        assert [v for v, t in steps_seen if t == 5] == [1]  # stopped before a second step completed
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    img = run_image(env, "megasr_x4", **{"MegaSRSampler.seed": 9, "SaveImage.filename_prefix": "after_cancel"})
    assert img.shape[:2] == (44, 52)


def test_model_management_can_unload_every_pack_model(env):
    import comfy.model_management as mm
    import torch

    run_image(env, "megasr_x4", **{"MegaSRSampler.seed": 11, "SaveImage.filename_prefix": "unload"})

    def pack_models():
        # ComfyUI imports the pack under its folder name, so compare class names, not classes.
        return [lm for lm in mm.current_loaded_models if type(lm.model.model).__name__ == "MegaSRModel"]

    assert pack_models(), "the MegaSR model was not loaded through model management"
    mm.free_memory(1e30, torch.device("cpu"))
    assert not pack_models()


def test_tiled_sampling_crops_every_stacked_controlnet(env):
    overrides = {
        "LR image.image": "t_big.png",
        "MegaSRSampler.tile_size": 128,
        "MegaSRSampler.tile_overlap": 32,
        "SaveImage.filename_prefix": "tiled_stack",
    }
    p = _with_core_controlnet(prompt(env, "megasr_large_tiled", **overrides), before_megasr=False)
    img = run_image(env, p)
    assert img.shape[:2] == (144, 160)


def _pack(comfy_nodes, module: str):
    base = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRSampler"].__module__.rsplit(".", 2)[0]
    return __import__(f"{base}.{module}", fromlist=["x"])


def test_crop_control_chain_keeps_hints_aligned_and_shared_controls_shared(env):
    """Catches a stacked core ControlNet left on the whole canvas (or on the wrong tile), a control shared by
    cond and uncond split into two (they would no longer batch), and a MegaSR control left uncropped."""
    import comfy.controlnet
    import torch

    import nodes as comfy_nodes

    tiling = _pack(comfy_nodes, "megasr.tiling")
    tiled = _pack(comfy_nodes, "nodes.runtime.tiled_model")
    control_cls = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRGuidanceFusion"]
    megasr = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRModelLoader"].execute("megasr_tiny_sd2.safetensors").args[0]
    lr = torch.arange(1 * 16 * 24 * 3, dtype=torch.float32).reshape(1, 16, 24, 3) / 1152
    cond = [[torch.zeros(1, 7, 1024), {}]]
    pos, neg = control_cls.execute(cond, cond, megasr, lr, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, depth=lr).args
    core = comfy.controlnet.load_controlnet(str(ensure_tiny_controlnet()))
    hint = torch.rand(1, 3, 16, 24)
    core = core.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    core.set_previous_controlnet(pos[0][1]["control"])
    pos = [[pos[0][0], {**pos[0][1], "control": core}]]
    neg = [[neg[0][0], {**neg[0][1], "control": core}]]
    canvas = tiling.Canvas.for_output(16, 24)  # latent 2 x 3
    group = [tiling.Tile(1, 2, 0, 2)]  # bottom-left: pixels 8:16, 0:16
    call = tiled.TiledModelCall(canvas, tile=2, overlap=0, tile_batch=1, where="test")
    cpos, cneg = call._conds_for([[pos[0][1]], [neg[0][1]]], "k", 0, group, 1)
    c = cpos[0]["control"]
    assert c is cneg[0]["control"]  # still one object: cond/uncond batch together
    torch.testing.assert_close(c.cond_hint_original, hint[..., 8:16, 0:16])
    assert c.previous_controlnet.group == group and c.previous_controlnet.canvas == canvas
    assert c.previous_controlnet is not pos[0][1]["control"].previous_controlnet


def test_each_tile_gets_the_image_semantics_of_its_own_region(env):
    """Catches tiles that all get the whole image's CLIP tokens, tokens from the wrong region, and a
    batched encoding that differs from encoding each crop alone (crops of one size go in one call)."""
    import comfy.clip_vision
    import folder_paths
    import torch
    from megasr_fixtures import CLIP_VISION_NAME

    import nodes as comfy_nodes

    tiling = _pack(comfy_nodes, "megasr.tiling")
    tiled = _pack(comfy_nodes, "nodes.runtime.tiled_model")
    cv = comfy.clip_vision.load(folder_paths.get_full_path("clip_vision", CLIP_VISION_NAME))
    image = torch.zeros(1, 24, 48, 3)
    image[:, :, 24:] = 1.0  # left half black, right half white
    sem = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRClipSemantics"].execute(image, cv, "none").args[0]
    calls = []
    encoder = sem.encoder
    sem.encoder = lambda px: calls.append(px.shape[0]) or encoder(px)
    canvas = tiling.Canvas.for_output(96, 192)  # x4; latent 12 x 24
    grid = tiling.tiles(12, 24, 12, 0)  # left and right halves
    boxes = [tiled.lr_box(t, canvas, (24, 48)) for t in grid]
    assert boxes == [(0, 24, 0, 24), (0, 24, 24, 48)]
    left, right = tiled.encode_tile_semantics(sem, boxes)
    assert calls == [2]  # both crops in one CLIP call
    torch.testing.assert_close(left, encoder(image[:, :, :24]), atol=1e-4, rtol=1e-4)
    assert (left - right).abs().max() > 1e-4 and (left - sem.tokens).abs().max() > 1e-4
