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
from megasr_fixtures import CLIP_VISION_NAME, MEGASR_NAME, loaded_control, megasr_env, models_dir


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


@torch.no_grad()
def test_node_path_prediction_equals_training_path(env):
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
    emb, control, base, ms = loaded_control(patched, positive)
    t_index = 500
    sigma = ms.sigma(torch.tensor([float(t_index)]))
    x_t = torch.randn(1, 4, 6, 8, generator=g)  # the DDPM-scaled noisy latent training sees
    x_noisy = x_t * torch.sqrt(sigma**2 + 1)  # the same point in ComfyUI's (k-diffusion) parametrisation
    to = {**patched.model_options["transformer_options"]}
    ctrl = control.get_control(x_noisy, sigma, {"c_crossattn": emb}, 1, to)
    denoised = base.apply_model(x_noisy, sigma, c_crossattn=emb, control=ctrl, transformer_options=to)
    eps_node = (x_noisy - denoised) / sigma
    prepared = control._prepared(
        (48, 64), "cpu", torch.float32
    )  # the node's own hint/maps at output size (a cache hit)

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


def _node_eps(env, unet_dtype: torch.dtype, megasr_dtype: torch.dtype, monkeypatch) -> tuple:
    """(eps with MegaSR, eps of the same U-Net without it) at DDPM t = 500 through the nodes' path, with the
    U-Net and the MegaSR model stored *and computed* in the given dtypes, built as ComfyUI builds them on a GPU
    that computes in that dtype (on a CPU ComfyUI always computes in fp32 through casting layers).

    U-Net: ComfyUI's own checkpoint loader with the weight dtype and the plain (non-casting) layers
    ``comfy.ops.pick_operations`` gives when storage == compute dtype, no manual cast. MegaSR: the MegaSR Model
    Loader under ComfyUI's ``--bf16-unet`` option (storage), computing in it (``ManagedModel.compute_dtype``,
    what ``unet_manual_cast`` answers on such a GPU)."""
    import dataclasses

    import comfy.cli_args
    import comfy.model_management
    import comfy.ops
    import comfy.sd
    import folder_paths

    _, ckpt, _ = env
    unet_model, clip, _vae = _node("CheckpointLoaderSimple")().load_checkpoint(ckpt)
    if unet_dtype != torch.float32:
        options = {"dtype": unet_dtype, "custom_operations": comfy.ops.disable_weight_init}
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt)
        unet_model = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=False, output_clip=False, model_options=options
        )[0]
        unet_model.model.manual_cast_dtype = None
    monkeypatch.setattr(comfy.cli_args.args, "bf16_unet", megasr_dtype == torch.bfloat16)
    msr = _node("MegaSRModelLoader").execute(MEGASR_NAME).result[0]
    monkeypatch.setattr(comfy.cli_args.args, "bf16_unet", False)
    assert unet_model.model.get_dtype() == unet_dtype
    assert {p.dtype for p in msr.module.parameters()} == {megasr_dtype}
    if megasr_dtype != torch.float32:
        msr = dataclasses.replace(msr, compute_dtype=megasr_dtype)
    clip_vision = _node("CLIPVisionLoader")().load_clip(CLIP_VISION_NAME)[0]
    g = torch.Generator().manual_seed(7)
    lr = torch.rand(1, 12, 16, 3, generator=g)
    maps = {k: torch.rand(1, 12, 16, 3, generator=g) for k in ("hed", "depth", "seg")}
    semantics = _node("MegaSRClipSemantics").execute(lr, clip_vision, "none").result[0]
    levels = dict.fromkeys(
        ("strength_full_res", "strength_half_res", "strength_quarter_res", "strength_eighth_res"), 1.0
    )
    patched = _node("MegaSRCismInjection").execute(unet_model, msr, semantics, 1.0, **levels).result[0]
    text = _node("CLIPTextEncode")().encode(clip, "a photo")[0]
    positive = (
        _node("MegaSRGuidanceFusion").execute(text, text, msr, lr, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, **maps).result[0]
    )
    emb, control, base, ms = loaded_control(patched, positive)
    sigma = ms.sigma(torch.tensor([500.0]))
    x_noisy = torch.randn(1, 4, 6, 8, generator=g) * torch.sqrt(sigma**2 + 1)
    to = {**patched.model_options["transformer_options"]}
    ctrl = control.get_control(x_noisy, sigma, {"c_crossattn": emb}, 1, to)
    denoised = base.apply_model(x_noisy, sigma, c_crossattn=emb, control=ctrl, transformer_options=to)
    plain = base.apply_model(x_noisy, sigma, c_crossattn=emb)  # the same U-Net, no MegaSR patch or control
    control.cleanup()
    return ((x_noisy - denoised) / sigma).float(), ((x_noisy - plain) / sigma).float()


# Relative error (max |mixed - fp32| / max |fp32|) of one model call, first honest run (2026-12-02, torch 2.14.1
# CPU): bf16 U-Net + fp32 MegaSR 1.47e-2, fp32 U-Net + bf16 MegaSR 6.1e-3, fp16 U-Net + bf16 MegaSR 9.0e-3;
# bounds about 3x. The MegaSR parts contribute 1.6 (relative) to the prediction, so a part dropped or rescaled by
# a dtype mix-up is far outside. Before attention_in_dtype every mix failed with "expected m1 and m2 to have the
# same dtype" (the ControlNet's image path calling the U-Net's non-casting attention in its own dtype).
MIXED_DTYPE_BOUND = {
    "bf16 U-Net, fp32 MegaSR": 4.5e-2,
    "fp32 U-Net, bf16 MegaSR": 2e-2,
    "fp16 U-Net, bf16 MegaSR": 3e-2,
}


@torch.no_grad()
@pytest.mark.parametrize(
    ("case", "unet_dtype", "megasr_dtype"),
    [
        ("bf16 U-Net, fp32 MegaSR", torch.bfloat16, torch.float32),
        ("fp32 U-Net, bf16 MegaSR", torch.float32, torch.bfloat16),
        ("fp16 U-Net, bf16 MegaSR", torch.float16, torch.bfloat16),
    ],
    ids=["bf16_unet", "bf16_megasr", "fp16_unet_bf16_megasr"],
)
def test_unet_and_megasr_in_different_dtypes_give_the_fp32_prediction(env, monkeypatch, case, unet_dtype, megasr_dtype):
    """One model call through the nodes with the U-Net and the MegaSR model in different compute dtypes equals
    the all-fp32 call (pinned to the training path by the test above) within the measured bf16 bound.

    Catches a dtype error where the two models meet (ControlNet residuals added to the U-Net's features, CISM² /
    MS-GAM deltas added to its attention output, the ControlNet's image path calling the U-Net's frozen
    attention, maps and tokens handed from one to the other), and a mix-up that silently drops or rescales a
    MegaSR part: the bound is checked to be far below what the MegaSR parts contribute."""
    reference, plain = _node_eps(env, torch.float32, torch.float32, monkeypatch)
    mixed, _ = _node_eps(env, unet_dtype, megasr_dtype, monkeypatch)
    assert torch.isfinite(mixed).all()
    scale = reference.abs().max().item()
    err = (mixed - reference).abs().max().item() / scale
    contribution = (reference - plain).abs().max().item() / scale
    assert contribution > 10 * MIXED_DTYPE_BOUND[case], contribution  # the comparison is not trivial
    assert err <= MIXED_DTYPE_BOUND[case], f"{case}: relative error {err:.2e}"


@torch.no_grad()
def test_training_hint_and_maps_equal_the_nodes_for_the_same_lr(env):
    """One degraded training batch: the hint (``DegradedBatch.lr_up``) and the HED / depth / segmentation maps
    a training step hands the model (``GuidanceExtractor`` + ``maps_to_output_size``) equal what the nodes
    hand it for the same LR -- the DAGE Loader and map nodes, Guidance Fusion and ``MegaSRControl`` at the
    output size. Non-square, so a transposed or flipped map shows; the degradation is the real pipeline.

    Tolerance: float32 rounding only (1e-5); the segmentation colours are exact. Catches the training hint
    resized bilinearly (the nodes' is bicubic), a map flipped or resized another way, a map encoded otherwise
    (HED/depth channel, depth normalisation, palette), and an extractor run at another resolution."""
    from megasr_fixtures import ensure_dage_files

    from training.config import DegradationConfig, MegaSRStageConfig
    from training.data import DegradedBatch
    from training.degradations import DegradationPipeline
    from training.guidance import GuidanceExtractor, maps_to_output_size

    _, ckpt, _ = env
    names = ensure_dage_files()
    files = {k: str(models_dir("megasr") / v) for k, v in names.items()}
    g = torch.Generator().manual_seed(11)
    hr = torch.rand(1, 3, 48, 64, generator=g)
    b = DegradedBatch.build(hr, DegradationPipeline(DegradationConfig()), torch.Generator().manual_seed(5))
    mcfg = MegaSRStageConfig(
        dage_hed=files["dage_hed"],
        dage_depth=files["dage_depth_lora"],
        dage_depth_base=files["depth_base"],
        dage_seg=files["dage_seg"],
        dage_resolution=64,
    )
    guidance = GuidanceExtractor(mcfg, torch.device("cpu"))(b.lr)
    train = maps_to_output_size(guidance, tuple(b.hr.shape[-2:]))

    lr_image = b.lr.movedim(1, -1).contiguous()  # the LR as a ComfyUI IMAGE
    loader = _node("MegaSRDageLoader")
    node_maps = {}
    for kind, node, name, base in (
        ("hed", "MegaSRDageHED", "dage_hed", None),
        ("depth", "MegaSRDageDepth", "dage_depth_lora", "depth_base"),
        ("seg", "MegaSRDageSegmentation", "dage_seg", None),
    ):
        kwargs = {"base_name": names[base]} if base else {}
        model = loader.execute(kind, names[name], **kwargs).result[0]
        node_maps[kind] = _node(node).execute(lr_image, model, 64).result[0]
    unet_model, clip, _vae = _node("CheckpointLoaderSimple")().load_checkpoint(ckpt)
    msr = _node("MegaSRModelLoader").execute(MEGASR_NAME).result[0]
    clip_vision = _node("CLIPVisionLoader")().load_clip(CLIP_VISION_NAME)[0]
    semantics = _node("MegaSRClipSemantics").execute(lr_image, clip_vision, "none").result[0]
    levels = dict.fromkeys(
        ("strength_full_res", "strength_half_res", "strength_quarter_res", "strength_eighth_res"), 1.0
    )
    patched = _node("MegaSRCismInjection").execute(unet_model, msr, semantics, 1.0, **levels).result[0]
    text = _node("CLIPTextEncode")().encode(clip, "a photo")[0]
    fusion = _node("MegaSRGuidanceFusion")
    positive = fusion.execute(text, text, msr, lr_image, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, **node_maps).result[0]
    _emb, control, _base, _ms = loaded_control(patched, positive)
    prepared = control._prepared(tuple(b.hr.shape[-2:]), "cpu", torch.float32)
    control.cleanup()

    assert prepared["hint"].shape == b.lr_up.shape
    assert (prepared["hint"] - b.lr_up).abs().max().item() <= 1e-5
    asymmetric = []
    for kind in ("hed", "depth", "seg"):
        node, ours = prepared[kind].float(), train[kind].float()
        assert node.shape == ours.shape, (kind, node.shape, ours.shape)
        assert ours.std() > 1e-3, kind  # not flat
        asymmetric.append((ours - ours.flip(-1)).abs().max().item() > 1e-3)
        err = (node - ours).abs().max().item()
        assert err <= (0.0 if kind == "seg" else 1e-5), f"{kind}: max difference {err:.2e}"
    assert any(asymmetric), "every map is left-right symmetric: a flipped map would go unnoticed"
