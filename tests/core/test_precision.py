"""Storage dtype vs compute dtype (issue 17), without a server: map/hint preparation per dtype pair, the MegaSR
model stored in fp32/fp16/bf16/fp8 and computed in fp32/bf16 through ComfyUI's casting layers, fp16/bf16 export."""

from __future__ import annotations

import pytest
import torch
from megasr_testing import import_comfy, inputs, perturb_zero_inits, seeded, tiny_megasr_config

from megasr.extension import GuidanceContext
from megasr.images import resize_bchw
from megasr.model import MegaSRModel
from megasr.model_io import load_megasr_model, save_megasr_model

MAP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
COMPUTE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", MAP_DTYPES + [torch.float8_e5m2], ids=str)
@pytest.mark.parametrize(("size", "mode"), [((5, 7), "bilinear"), ((19, 23), "bicubic"), ((5, 7), "nearest")])
def test_resize_runs_in_float32_for_every_dtype_and_returns_the_input_dtype(dtype, size, mode):
    """Catches an (antialiased) resize attempted in half/fp8 on the CPU (NotImplementedError, issue 17's
    'compute_index_ranges_weights' for 'Half'), and a result left in float32 or resized differently."""
    x = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = resize_bchw(x, size, mode)
    assert out.dtype == dtype and tuple(out.shape[-2:]) == size
    expected = resize_bchw(x.float(), size, mode).to(dtype)
    assert torch.equal(out.float(), expected.float())


@pytest.mark.parametrize("map_dtype", MAP_DTYPES, ids=str)
@pytest.mark.parametrize("compute", COMPUTE_DTYPES, ids=str)
def test_guidance_map_prepared_once_in_float32_then_cast_to_the_compute_dtype(map_dtype, compute):
    """Each (map dtype, compute dtype) pair: the block-sized map has the compute dtype and equals the float32
    resize cast once (catches a resize in the map's or the model's dtype, a double rounding, a missing cast)."""
    g = torch.Generator().manual_seed(1)
    hed = torch.rand(1, 1, 32, 48, generator=g).to(map_dtype)
    ctx = GuidanceContext(latent_hw=(4, 6), hed_terms=((1.0, hed),))
    ((w, got),) = ctx.terms_at("hed_terms", (2, 3), 2, compute)
    assert w == 1.0 and got.dtype == compute and got.shape == (2, 1, 2, 3)
    expected = resize_bchw(hed.float(), (2, 3), "bilinear").to(compute)
    assert torch.equal(got, expected.expand(2, -1, -1, -1))


def _tiny_model() -> MegaSRModel:
    with seeded(11):
        model = MegaSRModel(tiny_megasr_config()).eval()
    perturb_zero_inits(model, seed=12, scale=0.05)
    return model


def _residuals(model: MegaSRModel, dtype: torch.dtype) -> torch.Tensor:
    from megasr.adapter_diffusers import _own_attention

    inp = inputs(batch=2, hw=(8, 12), seed=3)
    # the ControlNet's image path takes a frozen U-Net's attention; its own attn2 stands in here (storage only)
    mods = dict(model.controlnet.named_modules())
    attention = {b.key: _own_attention(mods[b.diffusers_path].attn2) for b in model.controlnet_blocks}
    with torch.no_grad():
        ctx = model.prepare_context(
            inp["x"].shape[-2:],
            inp["clip"],
            inp["hed"],
            inp["depth"],
            inp["seg"],
            step_invariant=True,
            dtype=dtype,
            image_attention=attention,
        )
        down, mid = model.controlnet_residuals(
            inp["x"].to(dtype), inp["t"].to(dtype), inp["text"].to(dtype), inp["hint"].to(dtype), ctx
        )
    return torch.cat([d.flatten(1) for d in down] + [mid.flatten(1)], dim=1).float()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model exported in fp32 and bf16, with its fp32 reference output."""
    model = _tiny_model()
    folder = tmp_path_factory.mktemp("precision")
    paths = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        paths[name] = str(folder / f"megasr_{name}.safetensors")
        save_megasr_model(paths[name], model, {"test": "precision"}, dtype=dtype)
    return paths, _residuals(model, torch.float32)


# Relative error bounds (max abs difference / max abs reference) on this tiny model. First honest run (torch
# 2.14.1 CPU): fp16 storage 6.0e-4, bf16 storage 4.5e-3, fp8_e4m3fn storage 7.7e-2 (fp32 compute); bf16 compute
# 1.1e-2 (fp32/fp16/bf16 storage), 7.4e-2 (fp8 storage). Bounds: about 3x those. A dtype mix-up (weights used
# uncast, maps rescaled) gives errors of order 1.
TOLERANCE = {
    (torch.float32, torch.float32): 1e-6,
    (torch.float16, torch.float32): 2e-3,
    (torch.bfloat16, torch.float32): 1.5e-2,
    (torch.float8_e4m3fn, torch.float32): 2e-1,
    (torch.float32, torch.bfloat16): 4e-2,
    (torch.float16, torch.bfloat16): 4e-2,
    (torch.bfloat16, torch.bfloat16): 4e-2,
    (torch.float8_e4m3fn, torch.bfloat16): 2e-1,
}


@pytest.mark.parametrize(("storage", "compute"), list(TOLERANCE), ids=lambda d: str(d).replace("torch.", ""))
def test_model_stored_in_one_dtype_computes_in_another_close_to_fp32(saved, storage, compute):
    """The loader's path (comfy.ops.manual_cast layers, weights stored as model management picks them): the
    parameters really are in the storage dtype (catches a dropped conversion), the residuals come out in the
    compute dtype and within the measured bound of fp32 (catches fp8 weights used uncast: 'clamp_scalar_cpu'
    for 'Float8_e4m3fn', issue 17)."""
    import_comfy()
    import comfy.ops

    paths, reference = saved
    model = load_megasr_model(paths["fp32"], dtype=storage, operations=comfy.ops.manual_cast)
    assert {p.dtype for p in model.parameters()} == {storage}
    got = _residuals(model, compute)
    assert torch.isfinite(got).all()
    err = (got - reference).abs().max() / reference.abs().max()
    assert err <= TOLERANCE[(storage, compute)], f"relative error {err:.2e}"


def test_bf16_export_is_half_the_size_and_loads_into_fp32_and_fp16(saved):
    """Catches an export flag that writes fp32 anyway, or a half file that only loads into its own dtype."""
    import os

    import_comfy()
    import comfy.ops

    paths, reference = saved
    assert os.path.getsize(paths["bf16"]) < 0.6 * os.path.getsize(paths["fp32"])
    for dtype in (torch.float32, torch.float16):
        model = load_megasr_model(paths["bf16"], dtype=dtype, operations=comfy.ops.manual_cast)
        assert {p.dtype for p in model.parameters()} == {dtype}
        got = _residuals(model, torch.float32)
        assert (got - reference).abs().max() / reference.abs().max() < 1e-2


def test_every_weighted_layer_is_a_casting_layer_so_lowvram_can_offload_it(saved):
    """ComfyUI's partial (lowvram) loading leaves a layer on the offload device only when it is a ``comfy.ops``
    layer; any plain torch layer with weights (e.g. one diffusers built and nobody retyped) would be left behind
    and fail on a GPU. The only bare parameters allowed are the CISM² gates, cast where they are used."""
    import_comfy()
    import comfy.model_patcher
    import comfy.ops

    paths, reference = saved
    model = load_megasr_model(paths["fp32"], dtype=torch.float16, operations=comfy.ops.manual_cast)
    plain = [
        name
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False)) and not hasattr(m, "comfy_cast_weights")
    ]
    assert plain and all(name.endswith(".cism") for name in plain), plain[:5]
    # a budget of 1 byte: ComfyUI's own partial load marks every layer for casting, and the output is unchanged
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device="cpu")
    patcher.load(torch.device("cpu"), lowvram_model_memory=1)
    assert model.model_lowvram
    layers = [m for m in model.modules() if hasattr(m, "comfy_cast_weights")]
    assert layers and all(m.comfy_cast_weights for m in layers)
    got = _residuals(model, torch.float32)
    assert (got - reference).abs().max() / reference.abs().max() <= TOLERANCE[(torch.float16, torch.float32)]
