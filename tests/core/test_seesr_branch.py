"""SeeSR's representation branch (megasr/seesr_branch.py) against SeeSR's own code.

Fixtures (tests/fixtures/seesr/, see its README): ``seesr_full_keys.json`` = the full-size key list and shapes of
SeeSR's ``unet/`` and ``controlnet/`` built from SeeSR's code (cswry/SeeSR@8edecc7) on the meta device; ``tiny/`` =
a SeeSR-layout checkpoint folder (``unet/``, ``controlnet/``: config.json + safetensors with SeeSR's key names) at
tiny width and ``reference.safetensors``: inputs and SeeSR's noise predictions (its U-Net + ControlNet run once in a
scratch environment with diffusers 0.21.0) for three timesteps, with and without CFG.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from megasr_testing import import_comfy
from safetensors.torch import load_file

from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet
from megasr.model import SD2_BASE_UNET, MegaSRConfig, MegaSRModel, megasr_noise_prediction
from megasr.seesr_branch import MissingRepresentationError, apply_to_comfy_unet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "seesr"
TINY = FIXTURES / "tiny"
BRANCH = "image_attentions"
# diffusers config keys that SeeSR's classes add and diffusers' own do not take
SEESR_ONLY = ("use_image_cross_attention",)


def _tiny_cfg() -> dict:
    cfg = json.loads((TINY / "unet" / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in SEESR_ONLY}


def _reference() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "reference.safetensors"))


def _base_unet():
    """The tiny SD U-Net (diffusers' own class) with SeeSR's base weights: SeeSR's unet/ minus the branch."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**_tiny_cfg()).eval()
    state = load_file(str(TINY / "unet" / "diffusion_pytorch_model.safetensors"))
    base = {k: v.float() for k, v in state.items() if BRANCH not in k}
    missing, unexpected = unet.load_state_dict(base, strict=True)
    assert not missing and not unexpected
    return unet


def _megasr(representation_dim: int = 512, seed: int = 0) -> MegaSRModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = MegaSRConfig(
            unet=_tiny_cfg(),
            clip_dim=24,
            msgam_hidden=8,
            conditioning_embedding_out_channels=(8, 8, 16, 16),
            representation_dim=representation_dim,
        )
        return MegaSRModel(cfg).eval()


def _warm(representation_dim: int = 512):
    from training.seesr import warm_start_from_seesr

    model, unet = _megasr(representation_dim), _base_unet()
    report = warm_start_from_seesr(model, TINY)
    return model, unet, report


def _mix(eps: torch.Tensor, ref) -> torch.Tensor:
    """SeeSR's CFG mix (pipelines/pipeline_seesr.py): uncond + w * (cond - uncond)."""
    u, c = eps.chunk(2)
    return u + float(ref["guidance_scale"]) * (c - u)


def _expected(ref, t: int, cfg: bool) -> torch.Tensor:
    return ref[f"eps_cfg_batch_t{t}" if cfg else f"eps_t{t}"]


def _ours(model, unet, ref, t: int, cfg: bool, ram: torch.Tensor | None, *, guidance: bool = True) -> torch.Tensor:
    """Our prediction the way a sampler asks for it: one call, batch [uncond, cond] under CFG (RAM tokens at batch 1,
    shared by both halves as SeeSR's pipeline does).

    ``guidance``: also give CLIP semantics and all three maps (CISM² and MS-GAM at their zero init)."""
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    x, hint = ref["x"], ref["hint"]
    text = torch.cat([ref["negative"], ref["text"]]) if cfg else ref["text"]
    b = text.shape[0]
    g = torch.Generator().manual_seed(5)
    maps = {}
    if guidance:
        maps = {
            "clip_tokens": torch.randn(1, 6, 24, generator=g),
            "hed": torch.rand(1, 1, 16, 24, generator=g),
            "depth": torch.rand(1, 1, 16, 24, generator=g),
            "seg": torch.rand(1, 3, 16, 24, generator=g),
        }
    ctx = model.prepare_context(tuple(x.shape[-2:]), representation_tokens=ram, **maps)
    with torch.no_grad():
        eps = megasr_noise_prediction(
            unet, adapter, model, x.expand(b, -1, -1, -1), torch.tensor(t), text, hint.expand(b, -1, -1, -1), ctx
        )
    adapter.remove()
    return eps


# --- layout -------------------------------------------------------------------------------------------------


def test_full_size_layout_equals_seesr_key_for_key_on_the_meta_device() -> None:
    from diffusers import UNet2DConditionModel

    full = json.loads((FIXTURES / "seesr_full_keys.json").read_text())
    with torch.device("meta"):
        model = MegaSRModel(MegaSRConfig(representation_dim=512))
        unet = UNet2DConditionModel(**SD2_BASE_UNET)
    ours_cn = {k: list(v.shape) for k, v in model.controlnet.state_dict().items()}
    assert ours_cn == full["controlnet"]  # every key and shape, the branch included
    seesr_branch = {k: v for k, v in full["unet"].items() if BRANCH in k}
    assert {k: list(v.shape) for k, v in model.unet_representation.state_dict().items()} == seesr_branch
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == {
        k: v for k, v in full["unet"].items() if BRANCH not in k
    }

    # and heads (which shapes do not show): SeeSR's branch has its text transformer's head count, up blocks reversed
    for part, net in (("unet", model.unet_representation), ("controlnet", model.controlnet)):
        heads = {n: m.heads for n, m in net.named_modules() if BRANCH in n and n.endswith((".attn1", ".attn2"))}
        assert heads == full["heads"][part], part

    # SeeSR's layout in numbers: 16 U-Net transformer blocks (6 down, 1 mid, 9 up), 7 in the ControlNet, each reading
    # 512-d tokens
    def blocks(keys) -> set[str]:
        return {re.match(r"(.*image_attentions\.\d+)\.", k).group(1) for k in keys if BRANCH in k}

    assert len(blocks(seesr_branch)) == 16 and len(blocks(ours_cn)) == 7
    assert seesr_branch["up_blocks.3.image_attentions.2.transformer_blocks.0.attn2.to_k.weight"] == [320, 512]
    assert full["controlnet"]["mid_block.image_attentions.0.transformer_blocks.0.attn2.to_v.weight"] == [1280, 512]
    # an old MegaSR file (no representation_dim in its config) builds the model without the branch
    old = MegaSRConfig.from_dict({k: v for k, v in MegaSRConfig().to_dict().items() if k != "representation_dim"})
    with torch.device("meta"):
        plain = MegaSRModel(old)
    assert plain.unet_representation is None and not any(BRANCH in k for k in plain.state_dict())


def test_seesr_state_dicts_load_with_zero_missing_and_zero_unexpected_keys() -> None:
    model = _megasr()
    cn = load_file(str(TINY / "controlnet" / "diffusion_pytorch_model.safetensors"))
    missing, unexpected = model.controlnet.load_state_dict(cn, strict=True)
    assert not missing and not unexpected and any(BRANCH in k for k in cn)
    unet_state = load_file(str(TINY / "unet" / "diffusion_pytorch_model.safetensors"))
    branch = {k: v for k, v in unet_state.items() if BRANCH in k}
    missing, unexpected = model.unet_representation.load_state_dict(branch, strict=True)
    assert not missing and not unexpected and len(branch) > 0
    _base_unet()  # the rest of SeeSR's unet/ is exactly diffusers' U-Net (strict load inside)


# --- against SeeSR's own code ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("t", [999, 500, 21])
def test_noise_prediction_equals_seesr_reference(t: int, cfg: bool) -> None:
    """MegaSR warm-started from SeeSR's files, CISM² and MS-GAM present at zero init == SeeSR's U-Net + ControlNet.

    Under CFG the model call's [uncond, cond] prediction is compared to 1e-5, and the mixed epsilon to 1e-5 times
    the mix's error gain (1 + 2w: the mix amplifies float rounding of the two halves by up to that)."""
    ref = _reference()
    model, unet, _ = _warm()
    expected = _expected(ref, t, cfg)
    ours = _ours(model, unet, ref, t, cfg, ref["ram_tokens"])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    if cfg:
        gain = 1 + 2 * float(ref["guidance_scale"])
        torch.testing.assert_close(_mix(ours, ref), ref[f"eps_cfg_t{t}"], atol=1e-5 * gain, rtol=1e-5)
    # the branch matters: other tokens (cross-attention is blind to their order, so other values), or a model
    # without the branch, give another prediction; so does the timestep (off by one step of 20)
    other = _ours(model, unet, ref, t, cfg, ref["ram_tokens"].flip(-1), guidance=False)
    assert (other - expected).abs().max() > 1e-2
    no_branch = _ours(_warm(representation_dim=0)[0], unet, ref, t, cfg, None, guidance=False)
    assert (no_branch - expected).abs().max() > 1e-2
    shifted = _ours(model, unet, ref, t - 20, cfg, ref["ram_tokens"], guidance=False)
    assert (shifted - expected).abs().max() > 1e-3


def test_warm_start_maps_everything_and_freezes_the_unet_branch() -> None:
    from training.seesr import warm_start_from_seesr

    model, unet = _megasr(), _base_unet()
    zero_before = {
        k
        for k, v in model.state_dict().items()
        if not k.startswith(("controlnet.", "unet_representation.")) and v.abs().max() == 0
    }
    report = warm_start_from_seesr(model, TINY, unet=unet)
    cn_state = load_file(str(TINY / "controlnet" / "diffusion_pytorch_model.safetensors"))
    unet_state = load_file(str(TINY / "unet" / "diffusion_pytorch_model.safetensors"))
    c, u, r = report.controlnet, report.unet, report.unet_representation
    assert sorted(c.mapped) == sorted(cn_state) and not c.unmapped and not c.image_branch and not c.kept
    assert sorted(r.mapped) == sorted(k for k in unet_state if BRANCH in k) and not r.unmapped and not r.kept
    assert sorted(u.mapped) == sorted(k for k in unet_state if BRANCH not in k) and not u.unmapped
    assert u.changed == 0  # SeeSR's base U-Net is the one the test built from the same file
    summary = report.summary()
    assert summary["unet_representation"]["mapped"] == len(r.mapped) and summary["controlnet"]["image_branch"] == 0
    json.dumps(summary)
    for k, v in model.unet_representation.state_dict().items():
        assert torch.equal(v, unet_state[k].float()), k
    assert not any(p.requires_grad for p in model.unet_representation.parameters())
    assert any(p.requires_grad for p in model.controlnet.parameters())
    assert zero_before and all(model.state_dict()[k].abs().max() == 0 for k in zero_before)


def test_training_steps_leave_the_unet_branch_as_seesr_and_move_the_controlnet_branch() -> None:
    """After the warm start the U-Net's branch is frozen (SeeSR's U-Net is MegaSR's frozen base); the ControlNet's
    branch is part of the trained ControlNet, and gradients reach it through the RAM tokens' cross-attention."""
    ref = _reference()
    model, unet, _ = _warm()
    unet.requires_grad_(False)
    model.train()
    frozen = {k: v.clone() for k, v in model.unet_representation.state_dict().items()}
    cn_branch = {k: v.clone() for k, v in model.controlnet.state_dict().items() if BRANCH in k}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    g = torch.Generator().manual_seed(9)
    for _ in range(2):
        ctx = model.prepare_context(tuple(ref["x"].shape[-2:]), representation_tokens=ref["ram_tokens"])
        eps = megasr_noise_prediction(unet, adapter, model, ref["x"], torch.tensor(500), ref["text"], ref["hint"], ctx)
        loss = torch.nn.functional.mse_loss(eps, torch.randn(eps.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.remove()
    for k, v in model.unet_representation.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    moved = [k for k, v in model.controlnet.state_dict().items() if BRANCH in k and not torch.equal(v, cn_branch[k])]
    assert any("attn2.to_k" in k for k in moved) and len(moved) > len(cn_branch) // 2


def test_missing_tokens_fail_clearly_and_a_model_without_the_branch_reports_it_unmapped(caplog) -> None:
    ref = _reference()
    model, unet, _ = _warm()
    with pytest.raises(MissingRepresentationError, match="RAM representation tokens"):
        _ours(model, unet, ref, 500, False, None, guidance=False)
    with pytest.raises(ValueError, match=r"\[batch, tokens, 512\], got \[1, 17, 768\]"):
        _ours(model, unet, ref, 500, False, torch.zeros(1, 17, 768), guidance=False)
    with caplog.at_level("WARNING", logger="megasr.seesr_weights"):
        _, _, report = _warm(representation_dim=0)
    assert report.controlnet.image_branch and report.unet_representation is None
    assert "representation_dim: 512" in caplog.text


# --- ComfyUI side ---------------------------------------------------------------------------------------------


def _comfy_unet(unet):
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from megasr.blocks import comfy_unet_config

    cfg = comfy_unet_config(_tiny_cfg())
    dm = UNetModel(**cfg, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    key_map = comfy.utils.unet_to_diffusers(cfg)
    sd = unet.state_dict()
    missing, unexpected = dm.load_state_dict({key_map[k]: v for k, v in sd.items() if k in key_map}, strict=False)
    assert not missing and not unexpected
    return dm.eval()


@torch.no_grad()
@pytest.mark.parametrize(("t", "cfg", "storage"), [(999, False, "module"), (21, True, "fp16_file")])
def test_comfy_unet_with_the_branch_predicts_seesr(t: int, cfg: bool, storage: str, tmp_path: Path) -> None:
    """ComfyUI's UNetModel + our object patches (branch after every SpatialTransformer) == SeeSR's reference.

    ``fp16_file``: the warm-started model written as a MegaSR weight file, loaded the way the nodes load it
    (``comfy.ops.manual_cast`` layers, weights stored fp16 -- the fixture's values are fp16-exact -- computing fp32)."""
    comfy = import_comfy()
    from megasr.adapter_comfy import RUNTIME_KEY, MegaSRRuntime, apply_megasr_to_comfy_unet
    from megasr.model_io import load_megasr_model, save_megasr_model

    ref = _reference()
    model, unet, _ = _warm()
    if storage == "fp16_file":
        path = str(tmp_path / "seesr_megasr.safetensors")
        save_megasr_model(path, model, dtype=torch.float16)
        model = load_megasr_model(path, dtype=torch.float16, operations=comfy.ops.manual_cast)
        assert model.unet_representation is not None
        assert model.unet_representation.down_blocks[0].image_attentions[0].proj_in.weight.dtype == torch.float16
    dm = _comfy_unet(unet)
    holder = torch.nn.Module()
    holder.diffusion_model = dm
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device="cpu", offload_device="cpu")
    patcher = patcher.clone()
    if storage == "module":  # another pack's forward patch is kept (wrapped); ours, applied twice, runs once
        seen = []
        name = "diffusion_model.middle_block.1.forward"
        other = patcher.get_model_object(name)

        def other_pack(*args, **kwargs):
            seen.append(1)
            return other(*args, **kwargs)

        patcher.add_object_patch(name, other_pack)
    patch = apply_megasr_to_comfy_unet(patcher, model)
    if storage == "module":
        patcher = patcher.clone()
        apply_to_comfy_unet(patcher, model.unet_representation, patch.runtime)
    st_forwards = [k for k in patcher.object_patches if k.endswith(".forward")]
    assert len(st_forwards) == 4  # input 1, middle, output 3 and 4 (SpatialTransformers of the tiny U-Net)
    x, hint = ref["x"], ref["hint"]
    text = torch.cat([ref["negative"], ref["text"]]) if cfg else ref["text"]
    b = text.shape[0]
    ctx = model.prepare_context(
        tuple(x.shape[-2:]),
        representation_tokens=ref["ram_tokens"],
        image_attention=patch.image_attention,
        dtype=torch.float32,
    )
    xb, tb = x.expand(b, -1, -1, -1), torch.full((b,), float(t))
    down, mid = model.controlnet_residuals(xb, tb, text, hint.expand(b, -1, -1, -1), ctx)
    to = dict(patcher.model_options["transformer_options"])
    to[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, id(model))
    control = {"output": list(down), "middle": [mid], "input": []}
    patcher.patch_model()
    try:
        eps = dm(xb, timesteps=tb, context=text, control=control, transformer_options=to)
        with pytest.raises(Exception, match="no MegaSR guidance"):
            dm(xb, timesteps=tb, context=text, control=control, transformer_options={})
    finally:
        patcher.unpatch_model()
    expected = _expected(ref, t, cfg)
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)
    if storage == "module":
        assert len(seen) == 1  # the other pack's forward ran (the call without guidance stopped before it)
    # unpatched, the U-Net is ComfyUI's own again: no branch (and no MegaSR guidance needed)
    plain = dm(xb, timesteps=tb, context=text, control=control, transformer_options={})
    assert (plain - expected).abs().max() > 1e-2
