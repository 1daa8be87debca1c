"""The MS-GAM control on both CFG branches and over start/end percent, pinned by exact expectations.

- negative branch: with ``negative_guidance`` 'same as positive' the negative conditioning carries the very
  MegaSR control of the positive, so ComfyUI batches cond and uncond into one model call; that batched call
  gives, per branch, exactly the prediction of a separate call for that branch alone;
- start/end percent (docs/ARCHITECTURE.md "Start and end percent"): inside the range the full MegaSR
  prediction; outside it the ControlNet residuals and every guidance map are off (MS-GAM sees its null maps,
  the state modality dropout trains) while CISM² stays on: the prediction equals the training path's
  U-Net with the image semantics and no map, no ControlNet.
"""

from __future__ import annotations

import pytest
import torch
from megasr_fixtures import (
    CLIP_VISION_NAME,
    MEGASR_NAME,
    ensure_tiny_controlnet,
    loaded_control,
    megasr_env,
    models_dir,
)

LEVELS = {
    "strength_full_res": 1.0,
    "strength_half_res": 1.0,
    "strength_quarter_res": 1.0,
    "strength_eighth_res": 1.0,
}


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    comfy_runner.register_model_dir("controlnet", ensure_tiny_controlnet().parent)
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def _core_controlnet(positive, negative, lr):
    """ComfyUI's own Apply ControlNet (advanced) with the tiny LDM-layout ControlNet, strength 0.7."""
    cn = _node("ControlNetLoader")().load_controlnet(ensure_tiny_controlnet().name)[0]
    return _node("ControlNetApplyAdvanced")().apply_controlnet(positive, negative, cn, lr, 0.7, 0.0, 1.0)


def _graph(env, start: float = 0.0, end: float = 1.0, core: str | None = None, fusion: bool = True):
    """The real nodes' values: patched MODEL, positive/negative with MegaSR control, semantics, LR.

    ``core``: "before"/"after" puts ComfyUI's Apply ControlNet before/after the Guidance Fusion node;
    ``fusion`` False leaves the Guidance Fusion node out (the core ControlNet alone)."""
    _, ckpt, _ = env
    unet_model, clip, _vae = _node("CheckpointLoaderSimple")().load_checkpoint(ckpt)
    clip_vision = _node("CLIPVisionLoader")().load_clip(CLIP_VISION_NAME)[0]
    msr = _node("MegaSRModelLoader").execute(MEGASR_NAME).result[0]
    g = torch.Generator().manual_seed(17)
    lr = torch.rand(1, 12, 16, 3, generator=g)
    maps = {k: torch.rand(1, 12, 16, 3, generator=g) for k in ("hed", "depth", "seg")}
    semantics = _node("MegaSRClipSemantics").execute(lr, clip_vision, "none").result[0]
    patched = _node("MegaSRCismInjection").execute(unet_model, msr, semantics, 1.0, **LEVELS).result[0]
    pos_text = _node("CLIPTextEncode")().encode(clip, "a photo")[0]
    neg_text = _node("CLIPTextEncode")().encode(clip, "dotted, noise, blur")[0]
    positive, negative = pos_text, neg_text
    if core == "before":
        positive, negative = _core_controlnet(positive, negative, lr)
    if fusion:
        positive, negative = (
            _node("MegaSRGuidanceFusion")
            .execute(positive, negative, msr, lr, 1.0, start, end, 1.0, 1.0, 1.0, **maps)
            .result
        )
    if core == "after":
        positive, negative = _core_controlnet(positive, negative, lr)
    return patched, positive, negative, semantics


@torch.no_grad()
def test_negative_branch_carries_the_same_control_and_cond_uncond_batch_exactly(env):
    """Catches a negative branch without the MegaSR control (or with its maps/semantics dropped by default),
    which ComfyUI can no longer batch with the positive one, and a control whose batched call mixes the two
    branches (hint, semantics or residuals taken from the other branch, or expanded over the wrong axis):
    ComfyUI's own KSampler must run cond + uncond in every model call, with MegaSR residuals, and each half
    of the batched output must equal a model call for that branch alone (to 1e-5)."""
    import nodes

    patched, positive, negative, _ = _graph(env)
    control = positive[0][1]["control"]
    assert negative[0][1]["control"] is control  # one control for both branches: what lets ComfyUI batch them
    calls = []

    def wrapper(apply_model, args):
        x, t, c = args["input"], args["timestep"], args["c"]
        calls.append(sorted(args["cond_or_uncond"]))
        # MegaSR residuals are there (checked first: the U-Net pops them from these lists)
        assert c.get("control") is not None and len(c["control"]["output"]) > 0
        out = apply_model(x, t, **c)
        for i in range(x.shape[0]):
            to = {**c["transformer_options"], "cond_or_uncond": [args["cond_or_uncond"][i]]}
            ci = {"c_crossattn": c["c_crossattn"][i : i + 1]}
            ctrl = control.get_control(x[i : i + 1], t[i : i + 1], ci, 1, to)
            alone = apply_model(x[i : i + 1], t[i : i + 1], **ci, control=ctrl, transformer_options=to)
            err = (alone - out[i : i + 1]).abs().max().item()
            assert err < 1e-5 * max(1.0, alone.abs().max().item()), (i, args["cond_or_uncond"], err)
        return out

    model = patched.clone()
    model.set_model_unet_function_wrapper(wrapper)
    latent = {"samples": torch.zeros(1, 4, 6, 8)}
    nodes.common_ksampler(model, 5, 2, 5.5, "ddpm", "normal", positive, negative, latent, denoise=1.0)
    assert calls == [[0, 1], [0, 1]], calls  # two steps, cond and uncond batched in each


def _predictions(env, start: float, end: float, t_index: int):
    """(node-path eps, training-path full eps, training-path eps with CISM² only) at one DDPM timestep."""
    from harness.checkpoints import tiny_sd2_unet_diffusers

    from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet
    from megasr.model import megasr_noise_prediction
    from megasr.model_io import load_megasr_model

    patched, positive, _, semantics = _graph(env, start, end)
    emb, control, base, ms = loaded_control(patched, positive)
    sigma = ms.sigma(torch.tensor([float(t_index)]))
    x_t = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(t_index))
    x_noisy = x_t * torch.sqrt(sigma**2 + 1)
    to = {**patched.model_options["transformer_options"]}
    ctrl = control.get_control(x_noisy, sigma, {"c_crossattn": emb}, 1, to)
    denoised = base.apply_model(x_noisy, sigma, c_crossattn=emb, control=ctrl, transformer_options=to)
    eps_node = (x_noisy - denoised) / sigma
    control.cleanup()

    # The node's own hint and maps at the output size (their alignment is pinned by test_tiled_sampling).
    prepared = control._prepared((48, 64), "cpu", torch.float32)
    reference = load_megasr_model(str(models_dir("megasr") / MEGASR_NAME)).eval()
    unet = tiny_sd2_unet_diffusers()
    adapter = attach_megasr_to_diffusers_unet(unet, reference)
    tokens = semantics.tokens.float()
    t = torch.tensor([t_index])
    full_ctx = reference.prepare_context((6, 8), tokens, prepared["hed"], prepared["depth"], prepared["seg"])
    full = megasr_noise_prediction(unet, adapter, reference, x_t, t, emb.float(), prepared["hint"].float(), full_ctx)
    with adapter.guidance(reference.prepare_context((6, 8), tokens, None, None, None)):
        cism_only = unet(x_t, t, encoder_hidden_states=emb.float()).sample
    return eps_node.float(), full, cism_only


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize(("t_index", "inside"), [(900, False), (500, True), (100, False)])
def test_start_end_percent_switch_controlnet_and_maps_but_keep_cism(env, t_index, inside):
    """Range 0.3..0.7 of the schedule; DDPM timestep 900 is before it, 500 inside, 100 after it.

    Catches a range that is ignored, reversed (percent read as 1 - percent) or applied to the wrong end, a
    map left on (or CISM² switched off) outside the range, and a ControlNet residual added outside it: the
    node path must equal the full training-path prediction inside and the CISM²-only prediction outside
    (both differ from each other by far more than the tolerance, checked)."""
    node, full, cism_only = _predictions(env, 0.3, 0.7, t_index)
    assert (full - cism_only).abs().max() > 1e-2  # the two expectations are distinguishable
    if inside:
        assert _close(node, full), (node - full).abs().max()
    else:
        assert _close(node, cism_only), (node - cism_only).abs().max()


def _residuals(env, core: str | None, fusion: bool = True) -> list[torch.Tensor | None]:
    """The positive control chain's residuals (down blocks, then middle; None = none) at one model call (t = 600)."""

    patched, positive, _, _ = _graph(env, core=core, fusion=fusion)
    emb, control, base, ms = loaded_control(patched, positive)
    sigma = ms.sigma(torch.tensor([600.0]))
    x_noisy = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(6)) * torch.sqrt(sigma**2 + 1)
    to = {**patched.model_options["transformer_options"]}
    out = control.get_control(x_noisy, sigma, {"c_crossattn": emb}, 1, to)
    return [None if r is None else r.float().clone() for r in out["output"] + out["middle"]]


@torch.no_grad()
def test_msgam_stacks_with_comfyui_controlnet_in_either_order(env):
    """At one model call the chain's residuals are exactly the MegaSR ControlNet's plus the core ControlNet's
    (strength 0.7), whichever is applied first. Catches a MegaSR control that drops or replaces the
    previous ControlNet, one that is dropped by a core ControlNet put after it, a strength applied twice or
    to the other control, and order-dependent merging (the old version only checked "differs from base")."""
    megasr = _residuals(env, None)
    core = _residuals(env, "before", fusion=False)
    assert len(megasr) == len(core) > 0
    assert any(r is not None and r.abs().max() > 0 for r in core)  # both parts contribute: the sum is not trivial
    assert any(r is not None and r.abs().max() > 0 for r in megasr)
    for order in ("before", "after"):
        chain = _residuals(env, order)
        assert len(chain) == len(megasr), order
        for i, (got, a, b) in enumerate(zip(chain, megasr, core, strict=True)):
            if a is None and b is None:
                assert got is None, (order, i)
                continue
            want = (0 if a is None else a) + (0 if b is None else b)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, o=order, i=i: f"{o} {i}: {m}")
