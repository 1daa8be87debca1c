"""One model call through the nodes' path equals the training path's noise prediction, with non-zero weights.

Node path: the real loader, CISM² and Guidance Fusion nodes, ``MegaSRControl.get_control`` (sigma -> DDPM
timestep, input scaling 1/sqrt(sigma^2 + 1), text context, hint and map preparation, the guidance context)
and ComfyUI's own ``BaseModel.apply_model``. Training path: the diffusers U-Net with the same weights, the
MegaSR model loaded from the same file, ``megasr_noise_prediction`` at the DDPM timestep on x_t.

Catches a wrong timestep mapping (sigma passed as t), a missing input scaling, a hint or context that differs
between the two paths, a control applied with another strength, and any drift between the adapters.
"""

from __future__ import annotations

import pytest
import torch
from megasr_fixtures import CLIP_VISION_NAME, MEGASR_NAME, megasr_env, models_dir


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


@torch.no_grad()
def test_node_path_prediction_equals_training_path(env):
    import comfy.model_management
    from harness.checkpoints import tiny_sd2_unet_diffusers

    from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet
    from megasr.model import megasr_noise_prediction
    from megasr.model_io import load_megasr_model

    _, ckpt, _ = env
    unet_model, clip, _vae = _node("CheckpointLoaderSimple")().load_checkpoint(ckpt)
    clip_vision = _node("CLIPVisionLoader")().load_clip(CLIP_VISION_NAME)[0]
    msr = _node("MegaSRModelLoader").execute(MEGASR_NAME).result[0]
    g = torch.Generator().manual_seed(7)
    lr = torch.rand(1, 12, 16, 3, generator=g)
    maps = {k: torch.rand(1, 12, 16, 3, generator=g) for k in ("hed", "depth", "seg")}
    semantics = _node("MegaSRClipSemantics").execute(lr, clip_vision, "none").result[0]
    levels = {
        "strength_full_res": 1.0,
        "strength_half_res": 1.0,
        "strength_quarter_res": 1.0,
        "strength_eighth_res": 1.0,
    }
    patched = _node("MegaSRCismInjection").execute(unet_model, msr, semantics, 1.0, **levels).result[0]
    text = _node("CLIPTextEncode")().encode(clip, "a photo")[0]
    positive = (
        _node("MegaSRGuidanceFusion")
        .execute(
            text, text, msr, lr, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, hed=maps["hed"], depth=maps["depth"], seg=maps["seg"]
        )
        .result[0]
    )
    emb, extra = positive[0]
    control = extra["control"]

    comfy.model_management.load_models_gpu([patched] + control.get_models())
    base = patched.model
    ms = base.model_sampling
    control.pre_run(base, lambda p: ms.percent_to_sigma(p))
    t_index = 500
    sigma = ms.sigma(torch.tensor([float(t_index)]))
    x_t = torch.randn(1, 4, 6, 8, generator=g)  # the DDPM-scaled noisy latent training sees
    x_noisy = x_t * torch.sqrt(sigma**2 + 1)  # the same point in ComfyUI's (k-diffusion) parametrisation
    to = {**patched.model_options["transformer_options"]}
    ctrl = control.get_control(x_noisy, sigma, {"c_crossattn": emb}, 1, to)
    denoised = base.apply_model(x_noisy, sigma, c_crossattn=emb, control=ctrl, transformer_options=to)
    eps_node = (x_noisy - denoised) / sigma
    prepared = control._cache[1]  # the node's own hint/maps at output size (their alignment is tested elsewhere)

    reference = load_megasr_model(str(models_dir("megasr") / MEGASR_NAME)).eval()
    unet = tiny_sd2_unet_diffusers()
    adapter = attach_megasr_to_diffusers_unet(unet, reference)
    ctx = reference.prepare_context(
        (6, 8), semantics.tokens.float(), prepared.get("hed"), prepared.get("depth"), prepared.get("seg")
    )
    eps_train = megasr_noise_prediction(
        unet, adapter, reference, x_t, torch.tensor([t_index]), emb.float(), prepared["hint"].float(), ctx
    )
    plain = unet(x_t, torch.tensor([t_index]), encoder_hidden_states=emb.float()).sample
    assert (eps_train - plain).abs().max() > 1e-2  # the MegaSR parts act: the comparison is not trivial
    err = (eps_node.float() - eps_train).abs().max().item()
    assert err < 1e-4 * max(1.0, eps_train.abs().max().item()), err
