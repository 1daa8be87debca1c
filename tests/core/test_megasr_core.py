"""megasr/ math against the paper's equations, identity at init, gradients, adapter equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megasr_testing import TINY_UNET, import_comfy, inputs, perturb_zero_inits, seeded, tiny_megasr_config

from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet
from megasr.blocks import comfy_block_key, comfy_unet_config, unet_blocks
from megasr.cism import CismBlock, Connector
from megasr.extension import token_grid
from megasr.model import MegaSRModel, megasr_noise_prediction
from megasr.msgam import ChannelAttention, FusionStage, MsgamBlock, SaftBlock


def _unet():
    from diffusers import UNet2DConditionModel

    with seeded(0):
        return UNet2DConditionModel(**TINY_UNET).eval()


def _model(perturb: bool = False) -> MegaSRModel:
    with seeded(1):
        m = MegaSRModel(tiny_megasr_config()).eval()
    if perturb:
        perturb_zero_inits(m)
    return m


def _ctx(model, inp, **kw):
    return model.prepare_context(inp["x"].shape[-2:], inp["clip"], inp["hed"], inp["depth"], inp["seg"], **kw)


# --- Equations ---------------------------------------------------------------------------------


def test_channel_attention_is_squeeze_excitation():
    ca = ChannelAttention(4)
    x = torch.randn(2, 4, 5, 7)
    pooled = x.mean(dim=(2, 3))
    w = torch.sigmoid(F.linear(F.relu(F.linear(pooled, ca.fc1.weight, ca.fc1.bias)), ca.fc2.weight, ca.fc2.bias))
    torch.testing.assert_close(ca(x), x * w[:, :, None, None])


def test_fusion_stage_eq8():
    fs = FusionStage()
    d, s = torch.rand(2, 1, 6, 5), torch.rand(2, 3, 6, 5)
    m_c = torch.cat([d, s], 1)
    f_c = fs.attention(F.conv2d(m_c, fs.conv.weight, fs.conv.bias, padding=1))
    torch.testing.assert_close(fs(d, s), f_c * m_c)


def test_saft_eq9():
    saft = SaftBlock(32, 1, hidden=8)
    x, m = torch.randn(2, 32, 6, 5), torch.rand(2, 1, 6, 5)
    a = F.silu(F.conv2d(m, saft.shared[0].weight, saft.shared[0].bias, padding=1))
    gamma = F.conv2d(a, saft.gamma.weight, saft.gamma.bias, padding=1)
    beta = F.conv2d(a, saft.beta.weight, saft.beta.bias, padding=1)
    gn = F.group_norm(x, 32, eps=1e-6)
    torch.testing.assert_close(saft(x, m), gn * (1 + gamma) + beta)


def test_msgam_block_sums_both_saft_branches_through_projection():
    """Eq. 9 through P_b, and the null map as the absent state: catches a dropped branch, a strength that
    scales the whole SAFT term (its map-independent GN part too) instead of the map's modulation, and an
    absent map that removes the branch instead of feeding zeros."""
    blk = MsgamBlock(32, hidden=8)
    perturb_zero_inits(blk)
    n = torch.randn(2, 30, 32)
    hed, fused = torch.rand(2, 1, 5, 6), torch.rand(2, 4, 5, 6)
    x = n.transpose(1, 2).reshape(2, 32, 5, 6)

    def p(f):
        return F.linear(f.flatten(2).transpose(1, 2), blk.proj.weight, blk.proj.bias)

    full = blk(n, (5, 6), ((1.0, hed),), ((1.0, fused),))
    torch.testing.assert_close(full, p(blk.saft_h(x, hed) + blk.saft_m(x, fused)))
    h0, m0 = torch.zeros_like(hed), torch.zeros_like(fused)
    null = p(blk.saft_h(x, h0) + blk.saft_m(x, m0))
    torch.testing.assert_close(blk(n, (5, 6)), null)  # nothing given: both null maps, not "no term"
    assert null.abs().max() > 1e-3  # the null state is a real (trained) state, not zero
    # strength 0.5 on HED: half-way between the null and the map's modulation, inside the SAFT
    g_h, b_h = blk.saft_h.modulation(hed)
    g_0, b_0 = blk.saft_h.modulation(h0)
    half = blk.saft_h.norm(x) * (1 + 0.5 * g_0 + 0.5 * g_h) + 0.5 * b_0 + 0.5 * b_h
    got = blk(n, (5, 6), ((0.5, None), (0.5, hed)), ((1.0, fused),))
    torch.testing.assert_close(got, p(half + blk.saft_m(x, fused)))
    torch.testing.assert_close(
        got,
        0.5 * blk(n, (5, 6), ((1.0, None),), ((1.0, fused),)) + 0.5 * blk(n, (5, 6), ((1.0, hed),), ((1.0, fused),)),
    )  # = interpolating the contribution


def test_cism_block_eq7_gated_zero_init_projection():
    blk = CismBlock(16)
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def ca(q, c):
        return attn(q, c, c, need_weights=False)[0]

    n, tokens = torch.randn(2, 10, 16), torch.randn(2, 5, 16)
    assert torch.count_nonzero(blk(n, tokens, ca)) == 0  # Z_b = 0 at init
    perturb_zero_inits(blk)
    with torch.no_grad():
        blk.gate.fill_(0.7)
    expected = 0.5 * 0.7 * F.linear(ca(n, tokens), blk.proj.weight, blk.proj.bias)
    torch.testing.assert_close(blk(n, tokens, ca, strength=0.5), expected)


def test_connector_kinds():
    """Each kind computed by hand from its own parameters: LayerNorm over the CLIP width (no affine change at init,
    so perturbed here), then one linear map, or linear -> exact GELU -> linear. Catches a missing norm, a norm
    over the wrong axis, tanh-GELU or ReLU in the MLP, swapped layers, and an unknown kind accepted."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 257, 40, generator=g) * 3 + 1
    lin, mlp = Connector(40, 24, "linear"), Connector(40, 24, "mlp", hidden=16)
    with torch.no_grad():
        for m in (lin, mlp):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p is m.norm.weight else 0.0))

    def norm(m: Connector) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias

    want_lin = norm(lin) @ lin.net.weight.T + lin.net.bias
    first, last = mlp.net[0], mlp.net[2]
    hidden = norm(mlp) @ first.weight.T + first.bias
    want_mlp = (0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))) @ last.weight.T + last.bias
    torch.testing.assert_close(lin(x), want_lin, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp(x), want_mlp, atol=1e-5, rtol=1e-5)
    assert lin(x).shape == mlp(x).shape == (2, 257, 24)
    with pytest.raises(ValueError, match="connector kind"):
        Connector(40, 24, "conv")


def test_token_grid_follows_sd_downsampling_for_odd_latents():
    assert token_grid((9, 13), 9 * 13) == (9, 13)
    assert token_grid((9, 13), 5 * 7) == (5, 7)
    assert token_grid((9, 13), 3 * 4) == (3, 4)


# --- Block mapping -------------------------------------------------------------------------------


def test_block_table_matches_diffusers_modules_and_comfy_names():
    unet = _unet()
    names = dict(unet.named_modules())
    blocks = unet_blocks(TINY_UNET)
    assert all(hasattr(names[b.diffusers_path], "attn2") for b in blocks)
    found = {n for n, m in names.items() if n.endswith("transformer_blocks.0")}
    assert found == {b.diffusers_path for b in blocks}
    # ComfyUI SD-2: input_blocks 1,2 / 4,5 / 7,8 and output_blocks 3..11 hold transformers.
    assert comfy_block_key("input", 1, 0, 2) == "down_0_0_0"
    assert comfy_block_key("input", 5, 0, 2) == "down_1_1_0"
    assert comfy_block_key("middle", 0, 0, 2) == "mid_0_0"
    assert comfy_block_key("output", 3, 0, 2) == "up_1_0_0"
    assert comfy_block_key("output", 11, 0, 2) == "up_3_2_0"


# --- Identity at init, gradients ----------------------------------------------------------------


@torch.no_grad()
def test_identity_at_init_and_difference_after_perturbation():
    unet, model = _unet(), _model()
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs()
    plain = unet(inp["x"], inp["t"], encoder_hidden_states=inp["text"]).sample
    ctx = _ctx(model, inp)
    full = megasr_noise_prediction(unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    torch.testing.assert_close(full, plain, atol=0, rtol=0)
    perturb_zero_inits(model)
    full = megasr_noise_prediction(unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    assert (full - plain).abs().max() > 1e-4


def test_gradients_reach_exactly_the_trainable_parameters():
    """Trainable = exactly the MegaSR model (ControlNet, CISM²/MS-GAM of both networks, connector, stage 1);
    frozen = the whole SD-2 U-Net, including the cross-attention the ControlNet's image path borrows from it.

    Catches a frozen part that trains (any U-Net weight with a gradient), a trainable part cut off from the
    loss (a detached branch, a gate or projection that never gets a gradient), and a ControlNet image path
    that silently uses its own attention instead of the U-Net's frozen one.
    """
    unet, model = _unet(), _model(perturb=True)
    unet.requires_grad_(False)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=1, hw=(8, 8))
    ctx = _ctx(model, inp)
    out = megasr_noise_prediction(unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    out.pow(2).mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    expected = {"controlnet", "unet_ext", "cn_ext", "connector", "fusion"}
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == expected
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [], no_grad

    # The borrowed attention is really the U-Net's: with its attn2 weights made trainable, the image path of
    # the ControlNet alone (no text difference, U-Net not run) sends them a gradient.
    model.zero_grad()
    attn2 = [p for n, p in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
    for p in attn2:
        p.requires_grad_(True)
    ctx = _ctx(model, inp, image_attention=adapter.image_attention)
    down, mid = model.controlnet_residuals(inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    (sum(d.pow(2).sum() for d in down) + mid.pow(2).sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in attn2)


# --- Adapter equivalence -------------------------------------------------------------------------


def _comfy_unet_from_diffusers(unet):
    import_comfy()
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = comfy_unet_config(TINY_UNET)
    dm = UNetModel(**cfg, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    key_map = comfy.utils.unet_to_diffusers(cfg)
    sd = unet.state_dict()
    converted = {key_map[k]: v for k, v in sd.items() if k in key_map}
    missing, unexpected = dm.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert len(converted) == len(sd)
    return dm.eval()


@torch.no_grad()
def test_diffusers_and_comfy_adapters_give_the_same_prediction():
    comfy = import_comfy()
    from megasr.adapter_comfy import RUNTIME_KEY, MegaSRRuntime, apply_megasr_to_comfy_unet

    unet, model = _unet(), _model(perturb=True)
    dm = _comfy_unet_from_diffusers(unet)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=2, hw=(9, 11))
    ctx = _ctx(model, inp, cism_strength=0.8, level_strengths=(1.0, 0.5), hed_strength=0.7)
    reference = megasr_noise_prediction(unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"], ctx)

    holder = torch.nn.Module()
    holder.diffusion_model = dm
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device="cpu", offload_device="cpu")
    patch = apply_megasr_to_comfy_unet(patcher, model)
    # the ComfyUI side: the ControlNet's image path goes through the ComfyUI U-Net's frozen attn2
    ctx = _ctx(
        model,
        inp,
        cism_strength=0.8,
        level_strengths=(1.0, 0.5),
        hed_strength=0.7,
        image_attention=patch.image_attention,
    )
    down, mid = model.controlnet_residuals(inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    to = dict(patcher.model_options["transformer_options"])
    to[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, id(model))
    control = {"output": list(down), "middle": [mid], "input": []}
    out = dm(inp["x"], timesteps=inp["t"], context=inp["text"], control=control, transformer_options=to)
    assert (reference - out).abs().max() < 1e-4
    plain = unet(inp["x"], inp["t"], encoder_hidden_states=inp["text"]).sample
    assert (reference - plain).abs().max() > 1e-3  # the equivalence is not the trivial one


@torch.no_grad()
def test_comfy_patches_compose_with_other_packs_attention_patches():
    """Another pack's attn2 patches (list-appended, and an IPAdapter-style attn2 replace) run beside ours."""
    comfy = import_comfy()
    from comfy.ldm.modules.attention import optimized_attention

    from megasr.adapter_comfy import RUNTIME_KEY, MegaSRRuntime, apply_megasr_to_comfy_unet

    unet, model = _unet(), _model(perturb=True)
    dm = _comfy_unet_from_diffusers(unet)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=1, hw=(8, 8))
    ctx = _ctx(model, inp)
    reference = megasr_noise_prediction(unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    down, mid = model.controlnet_residuals(inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    calls = {"before": 0, "after": 0, "replace": 0}

    def other_before(n, context, value, extra_options):
        calls["before"] += 1
        return n, context, value

    def other_after(out, extra_options):
        calls["after"] += 1
        return out

    def replace(q, k, v, extra_options):  # what IPAdapter-style packs do: their own attention call
        calls["replace"] += 1
        return optimized_attention(q, k, v, extra_options["n_heads"])

    holder = torch.nn.Module()
    holder.diffusion_model = dm
    for ours_first in (True, False):
        calls.update(before=0, after=0, replace=0)
        patcher = comfy.model_patcher.ModelPatcher(holder, load_device="cpu", offload_device="cpu")
        if ours_first:
            apply_megasr_to_comfy_unet(patcher, model)
        patcher.set_model_attn2_patch(other_before)
        patcher.set_model_attn2_output_patch(other_after)
        patcher.set_model_attn2_replace(replace, "input", 1)
        if not ours_first:
            apply_megasr_to_comfy_unet(patcher, model)
        clone = patcher.clone()  # model options are deep-copied on clone; the patches must survive it
        to = dict(clone.model_options["transformer_options"])
        to[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, id(model))
        control = {"output": list(down), "middle": [mid], "input": []}
        out = dm(inp["x"], timesteps=inp["t"], context=inp["text"], control=control, transformer_options=to)
        assert (reference - out).abs().max() < 1e-4
        assert calls["before"] == calls["after"] == len(model.unet_ext) and calls["replace"] == 1


def test_step_invariant_context_memoises_map_only_work_and_gives_the_same_result():
    unet, model = _unet(), _model(perturb=True)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=2, hw=(8, 10))
    with torch.no_grad():
        plain_ctx = _ctx(model, inp)
        memo_ctx = _ctx(model, inp, step_invariant=True)
        args = (unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"])
        ref = megasr_noise_prediction(*args, plain_ctx)
        first = megasr_noise_prediction(*args, memo_ctx)
        n_cached = len(memo_ctx._cache)
        second = megasr_noise_prediction(*args, memo_ctx)
    torch.testing.assert_close(first, ref, atol=0, rtol=0)
    torch.testing.assert_close(second, ref, atol=0, rtol=0)
    modulations = [k for k in memo_ctx._cache if isinstance(k[0], int)]
    assert len(modulations) == 2 * (len(model.unet_ext) + len(model.cn_ext))  # SAFT_h and SAFT_m per block
    assert len(memo_ctx._cache) == n_cached  # the second step computed nothing new
    # while training (grad enabled) nothing is memoised
    train_ctx = _ctx(model, inp, step_invariant=True)
    megasr_noise_prediction(*args, train_ctx)
    assert not [k for k in train_ctx._cache if isinstance(k[0], int)]


def test_an_exactly_zero_msgam_projection_is_skipped_at_inference_only():
    """MS-GAM's projection P_b at its zero init (a converted SeeSR file) adds exactly nothing: inference skips the
    term (no SAFT modulation is computed) and predicts bit for bit what the full computation gives. One non-zero
    projection entry brings that block's term back; training never skips (P_b's gradient needs the term)."""
    unet, model = _unet(), _model(perturb=True)
    with torch.no_grad():
        for ext in (*model.unet_ext.values(), *model.cn_ext.values()):
            ext.msgam.proj.weight.zero_()
            ext.msgam.proj.bias.zero_()
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=2, hw=(8, 10))
    args = (unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"])
    with torch.no_grad():
        full = megasr_noise_prediction(*args, _ctx(model, inp))  # not step-invariant: every term computed
        ctx = _ctx(model, inp, step_invariant=True)
        skipped = megasr_noise_prediction(*args, ctx)
    torch.testing.assert_close(skipped, full, atol=0, rtol=0)
    assert not [k for k in ctx._cache if isinstance(k[0], int)]  # no SAFT modulation was computed
    assert sum(1 for k in ctx._cache if k[0] == "msgam_zero") == len(model.unet_ext) + len(model.cn_ext)

    key = next(iter(model.unet_ext))
    with torch.no_grad():
        model.unet_ext[key].msgam.proj.bias[0] = 0.5
        ctx = _ctx(model, inp, step_invariant=True)
        one = megasr_noise_prediction(*args, ctx)
        reference = megasr_noise_prediction(*args, _ctx(model, inp))
    torch.testing.assert_close(one, reference, atol=0, rtol=0)
    assert not torch.equal(one, skipped)
    assert len([k for k in ctx._cache if isinstance(k[0], int)]) == 2  # that block's SAFT_h and SAFT_m only
    model.unet_ext[key].msgam.proj.bias.data[0] = 0.0

    model.requires_grad_(True)
    out = megasr_noise_prediction(*args, _ctx(model, inp, step_invariant=True))
    out.pow(2).mean().backward()
    assert model.unet_ext[key].msgam.proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_sees_the_guidance_when_blocks_rerun_in_backward():
    def grads(checkpointing: bool) -> dict:
        unet, model = _unet(), _model(perturb=True)
        unet.requires_grad_(False)
        if checkpointing:
            model.controlnet.enable_gradient_checkpointing()
        adapter = attach_megasr_to_diffusers_unet(unet, model)
        inp = inputs(batch=1, hw=(8, 8))
        ctx = _ctx(model, inp)
        with model.guidance(ctx), adapter.guidance(ctx):  # forward and backward
            out = megasr_noise_prediction(unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
            out.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


# --- Strengths, absent guidance, the ControlNet's frozen image attention --------------------------


@torch.no_grad()
def test_strength_zero_is_bit_identical_to_absent_for_every_map_and_the_global_strengths():
    """x_strength = 0 must equal leaving x out, bit for bit, through both networks (catches a strength that
    scales only the map's pixels -- depth/seg -- or the whole branch incl. its map-independent part -- HED);
    1 must equal the default (trained) forward; each must actually matter (0 != 1)."""
    unet, model = _unet(), _model(perturb=True)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=2, hw=(8, 10))
    args = (unet, adapter, model, inp["x"], inp["t"], inp["text"], inp["hint"])
    maps = {k: inp[k] for k in ("hed", "depth", "seg")}

    def pred(clip=inp["clip"], drop=(), **kw):
        m = {k: (None if k in drop else v) for k, v in maps.items()}
        ctx = model.prepare_context(inp["x"].shape[-2:], clip, m["hed"], m["depth"], m["seg"], **kw)
        return megasr_noise_prediction(*args, ctx)

    full = pred()
    torch.testing.assert_close(pred(hed_strength=1.0, depth_strength=1.0, seg_strength=1.0), full, atol=0, rtol=0)
    for name in ("hed", "depth", "seg"):
        zero = pred(**{f"{name}_strength": 0.0})
        torch.testing.assert_close(zero, pred(drop=(name,)), atol=0, rtol=0, msg=name)
        assert (zero - full).abs().max() > 1e-4, name
        # strength 0 of one map with another at 0.5 is still "that map absent"
        other = "seg" if name != "seg" else "depth"
        torch.testing.assert_close(
            pred(**{f"{name}_strength": 0.0, f"{other}_strength": 0.5}),
            pred(drop=(name,), **{f"{other}_strength": 0.5}),
            atol=0,
            rtol=0,
        )
    none = pred(drop=("hed", "depth", "seg"))
    torch.testing.assert_close(pred(msgam_strength=0.0), none, atol=0, rtol=0)
    torch.testing.assert_close(pred(hed_strength=0.0, depth_strength=0.0, seg_strength=0.0), none, atol=0, rtol=0)
    torch.testing.assert_close(pred(cism_strength=0.0), pred(clip=None), atol=0, rtol=0)
    assert (pred(cism_strength=0.0) - full).abs().max() > 1e-4
    half = pred(msgam_strength=0.5)
    assert (half - full).abs().max() > 1e-5 and (half - none).abs().max() > 1e-5


def test_map_terms_interpolate_between_trained_states():
    """The weights strengths put on the trained states: bilinear in (depth, seg), global MS-GAM strength
    pulls towards the all-null state, weights sum to 1 (catches an interaction term forgotten or a strength
    applied twice)."""
    from megasr.model import map_terms

    hed, fused = map_terms(True, True, True)
    assert hed == ((True, 1.0),) and fused == (((True, True), 1.0),)
    hed, fused = map_terms(True, True, True, hed_strength=0.25, depth_strength=0.5, seg_strength=1.0)
    assert hed == ((False, 0.75), (True, 0.25))
    assert fused == (((True, True), 0.5), ((False, True), 0.5))
    _, fused = map_terms(False, True, True, msgam_strength=0.5, depth_strength=0.5, seg_strength=0.5)
    w = dict(fused)
    assert w == {(True, True): 0.125, (True, False): 0.125, (False, True): 0.125, (False, False): 0.625}
    hed, fused = map_terms(False, False, True, seg_strength=2.0)  # extrapolation beyond trained
    assert hed == ((False, 1.0),) and dict(fused) == {(False, True): 2.0, (False, False): -1.0}


@torch.no_grad()
def test_controlnet_image_path_uses_the_frozen_unet_attention():
    """The ControlNet's CISM² path calls the U-Net's frozen attn2 of the same block (the paper's frozen CA),
    not the ControlNet's own trainable one; without it the ControlNet refuses (catches a silent fallback)."""
    import pytest

    unet, model = _unet(), _model(perturb=True)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    inp = inputs(batch=1, hw=(8, 8))
    calls: dict[str, int] = {}

    def counting(key, fn):
        def wrapped(q, c):
            calls[key] = calls.get(key, 0) + 1
            return fn(q, c)

        return wrapped

    frozen = {k: counting(k, fn) for k, fn in adapter.image_attention.items()}
    ctx = _ctx(model, inp, image_attention=frozen)
    down, _ = model.controlnet_residuals(inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    assert calls == {b.key: 1 for b in model.controlnet_blocks}
    # and the values are the U-Net's: its attn2 with other weights changes the ControlNet's image term
    ref = [d.clone() for d in down]
    for name, m in unet.named_modules():
        if name.endswith("attn2"):
            m.to_v.weight.mul_(1.5)
    down2, _ = model.controlnet_residuals(inp["x"], inp["t"], inp["text"], inp["hint"], ctx)
    assert max((a - b).abs().max() for a, b in zip(ref, down2, strict=True)) > 1e-6
    with pytest.raises(ValueError, match="frozen cross-attention"):
        model.controlnet_residuals(inp["x"], inp["t"], inp["text"], inp["hint"], _ctx(model, inp))
