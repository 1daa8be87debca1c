"""Bad input to every MegaSR node: a clear error naming the node and the input, and ComfyUI keeps serving."""

from __future__ import annotations

import shutil

import pytest
import torch
from harness.comfy import ExecutionFailed
from megasr_fixtures import MEGASR_NAME, ensure_tiny_megasr, fusion_args, megasr_env, run_image
from megasr_testing import seeded, tiny_megasr_config


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info, tmp_path_factory):
    e = megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    bad = tmp_path_factory.mktemp("bad_megasr")
    good = ensure_tiny_megasr()
    data = good.read_bytes()
    (bad / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (bad / "random.safetensors").write_bytes(bytes(range(256)) * 64)
    from megasr.model import MegaSRModel
    from megasr.model_io import save_megasr_model

    with seeded(0):
        other = MegaSRModel(tiny_megasr_config())  # 32/64 channels, context 48: another base
    save_megasr_model(str(bad / "other_base.safetensors"), other)
    shutil.copyfile(good, bad / "good_copy.safetensors")
    comfy_runner.register_model_dir("megasr", bad, first=False)
    return e


def node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def img(b=1, h=9, w=11, c=3, fill=None):
    x = torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(0))
    if fill is not None:
        x[0, 0, 0, 0] = fill
    return x


def expect_error(fn, *words):
    with pytest.raises(Exception) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_colour_fix_inputs(env):
    fix = node("MegaSRColorFix")
    for image in (img(c=1), img(c=4), (img() * 65535).to(torch.int32)):  # grayscale, RGBA, 16-bit: converted
        out = fix.execute(image, img(), "adain").args[0]
        assert out.shape == (1, 9, 11, 3) and torch.isfinite(out).all()
    expect_error(lambda: fix.execute(img(fill=float("nan")), img(), "adain"), "MegaSR Colour Fix", "'image'", "NaN")
    expect_error(lambda: fix.execute(img(b=2), img(b=3), "wavelet"), "MegaSR Colour Fix", "'reference'", "batch")
    expect_error(lambda: fix.execute(img(c=5), img(), "adain"), "'image'", "channels")
    out = fix.execute(img(h=1, w=1), img(h=1, w=1), "wavelet").args[0]  # 1x1 works
    assert out.shape == (1, 1, 1, 3)


def test_guidance_fusion_inputs(env):
    gam = node("MegaSRGuidanceFusion")
    loader = node("MegaSRModelLoader")
    megasr = loader.execute(MEGASR_NAME).args[0]
    args = fusion_args(megasr)
    where = "MegaSR MS-GAM Guidance Fusion"
    expect_error(lambda: gam.execute(lr_image=img(fill=float("inf")), **args), where, "'lr_image'", "NaN")
    expect_error(lambda: gam.execute(lr_image=img(b=2), seg=img(b=3), **args), where, "'seg'", "batch")
    expect_error(lambda: gam.execute(lr_image=img(), depth=img(c=7), **args), where, "'depth'", "channels")
    expect_error(
        lambda: gam.execute(lr_image=img(), **{**args, "start_percent": 0.8, "end_percent": 0.2}),
        where,
        "'start_percent'",
    )
    pos, neg = gam.execute(lr_image=img(b=2), hed=img(h=1, w=1), seg=img(c=4), depth=img(c=1), **args).args
    assert pos[0][1]["control"].maps["seg"].shape[1] == 3  # RGBA seg read as colour, HED/depth 1 channel
    assert pos[0][1]["control"].maps["hed"].shape[1] == 1


def test_model_loader_rejects_wrong_files_by_content(env):
    loader = node("MegaSRModelLoader")
    where = "MegaSR Model Loader"
    expect_error(lambda: loader.execute("truncated.safetensors"), where, "'megasr_name'", "truncated")
    expect_error(lambda: loader.execute("random.safetensors"), where, "'megasr_name'")
    expect_error(lambda: loader.execute("no_such_file.safetensors"), where, "'megasr_name'", "not found")
    assert loader.execute("good_copy.safetensors").args[0].kind == "megasr"  # content, not name, decides


def test_cism_refuses_a_megasr_file_for_another_base_and_bad_semantics(env):
    import nodes as comfy_nodes
    from megasr.cism import ImageSemantics

    runner, ckpt, _ = env
    model = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[0]
    other = node("MegaSRModelLoader").execute("other_base.safetensors").args[0]
    good = node("MegaSRModelLoader").execute(MEGASR_NAME).args[0]
    cism = node("MegaSRCismInjection")
    levels = dict(strength_full_res=1.0, strength_half_res=1.0, strength_quarter_res=1.0, strength_eighth_res=1.0)
    sem = ImageSemantics(torch.zeros(1, 257, 1024))
    where = "MegaSR CISM² Semantic Injection"
    expect_error(lambda: cism.execute(model, other, sem, 1.0, **levels), where, "'megasr_model'", "was made for a base")
    bad_sem = ImageSemantics(torch.zeros(1, 257, 77))
    expect_error(lambda: cism.execute(model, good, bad_sem, 1.0, **levels), where, "'semantics'")


def test_sampler_inputs_and_comfyui_keeps_serving(env):
    runner = env[0]
    from megasr_fixtures import prompt

    p = prompt(
        env,
        "megasr_x4",
        **{"MegaSRModelLoader.megasr_name": "truncated.safetensors", "SaveImage.filename_prefix": "bad"},
    )
    with pytest.raises(ExecutionFailed) as e:
        runner.run(p)
    assert "MegaSR Model Loader" in str(e.value.data) and "megasr_name" in str(e.value.data)
    p = prompt(
        env,
        "megasr_x4",
        **{"MegaSRSampler.tile_size": 64, "MegaSRSampler.tile_overlap": 64, "SaveImage.filename_prefix": "bad2"},
    )
    with pytest.raises(ExecutionFailed) as e:
        runner.run(p)
    assert "MegaSR Sampler" in str(e.value.data) and "tile_overlap" in str(e.value.data)
    # a 1x1 LR image still gives an exact 4x4 output, and the server state is fine after the failures
    import folder_paths
    from harness.images import write_test_image

    write_test_image(f"{folder_paths.get_input_directory()}/t_1x1.png", width=1, height=1, seed=7)
    out = run_image(env, "megasr_x4", **{"LR image.image": "t_1x1.png", "SaveImage.filename_prefix": "one"})
    assert out.shape[:2] == (4, 4)
