"""DAGE nodes (nodes/dage.py) in the real ComfyUI 0.3.75: prompts through its executor, and direct calls.

The pack is loaded by ComfyUI itself (custom_nodes link); the DAGE classes are taken from that loaded pack and
registered like ComfyUI's loader does if ``nodes/__init__.py`` does not list them yet. Weight files are the tiny,
seeded ones of ``tests/fixtures/dage_fixtures.py`` in a temporary ``megasr`` model folder. No mocks.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dage_fixtures import DEFAULT_FILENAMES, write_dage_weight_files
from harness import comfy as hcomfy
from harness.images import write_test_image
from PIL import Image

W, H = 37, 29  # odd sizes on purpose
LOADER = "MegaSR DAGE Loader"
MAP_NODES = {"hed": "MegaSRDageHED", "depth": "MegaSRDageDepth", "seg": "MegaSRDageSegmentation"}
WHERE = {"hed": "MegaSR DAGE HED", "depth": "MegaSR DAGE Depth", "seg": "MegaSR DAGE Segmentation"}
BASE = "tiny_depth_anything_base.safetensors"
FILES = {
    "hed": DEFAULT_FILENAMES["dage_hed"],
    "depth": DEFAULT_FILENAMES["dage_depth_lora"],
    "seg": DEFAULT_FILENAMES["dage_seg"],
    "clip_lora": DEFAULT_FILENAMES["dage_clip_lora"],
}


def _pack_module(name: str):
    """A module of the pack *as ComfyUI loaded it* (its classes differ from a plain ``import megasr``)."""
    import nodes

    pack = nodes.NODE_CLASS_MAPPINGS[hcomfy.PACK_SENTINEL_NODE].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{pack}.{name}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    base = tmp_path_factory.mktemp("dage_nodes")
    hcomfy.bootstrap()
    import folder_paths

    # the runner is process-wide: give the session's folders back afterwards
    before = (
        folder_paths.get_input_directory(),
        folder_paths.get_output_directory(),
        folder_paths.get_temp_directory(),
    )
    runner = hcomfy.get_runner(input_dir=base / "input", output_dir=base / "output", temp_dir=base / "temp")
    folder = base / "megasr"
    paths = write_dage_weight_files(str(folder))
    runner.register_model_dir("megasr", folder)
    write_test_image(base / "input" / "dage_lr.png", W, H, seed=3)

    import nodes

    dage = _pack_module("nodes.dage")
    for cls in dage.DAGE_NODES:  # what nodes.load_custom_node does for a V3 extension's node list
        schema = cls.GET_SCHEMA()
        if schema.node_id not in nodes.NODE_CLASS_MAPPINGS:
            nodes.NODE_CLASS_MAPPINGS[schema.node_id] = cls
            nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
            cls.RELATIVE_PYTHON_MODULE = "custom_nodes." + hcomfy.PACK_NAME
    yield SimpleNamespace(
        runner=runner,
        dage=dage,
        common=_pack_module("nodes.runtime.models"),
        InputError=_pack_module("megasr.errors").MegaSRInputError,
        paths=paths,
        palette=_pack_module("megasr.dage.encodings").palette_tensor(),
    )
    # leave the session's folders as they were for the other test modules
    runner.set_dirs(*before)
    registered = folder_paths.folder_names_and_paths["megasr"][0]
    if str(folder.resolve()) in registered:
        registered.remove(str(folder.resolve()))
    folder_paths.filename_list_cache.pop("megasr", None)


def _load(env, kind: str, name: str | None = None, base: str | None = None):
    kwargs = {"kind": kind, "dage_name": name or FILES[kind]}
    if base is not None:
        kwargs["base_name"] = base
    elif kind == "depth":
        kwargs["base_name"] = BASE
    return env.dage.MegaSRDageLoader.execute(**kwargs).result[0]


def _prompt(kind: str, map_kind: str | None = None, dage_name: str | None = None) -> dict:
    map_kind = map_kind or kind
    loader = {"kind": kind, "dage_name": dage_name or FILES[kind]}
    if kind == "depth":
        loader["base_name"] = BASE
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dage_lr.png"}},
        "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}},
        "3": {"class_type": "MegaSRDageLoader", "inputs": loader},
        "4": {
            "class_type": MAP_NODES[map_kind],
            "inputs": {"image": ["2", 0], "dage_model": ["3", 0], "resolution": 64},
        },
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def _check_map(env, kind: str, out: torch.Tensor, batch: int, h: int, w: int) -> None:
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (batch, h, w, 3)
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    if kind in ("hed", "depth"):
        assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    if kind == "depth":  # near = bright, normalised per image
        flat = out[..., 0].flatten(1)
        for lo, hi in zip(flat.min(1).values, flat.max(1).values):
            assert float(hi) - float(lo) < 1e-6 or (abs(float(lo)) < 1e-5 and abs(float(hi) - 1.0) < 1e-5)
    if kind == "seg":  # every pixel is an ADE20K palette colour
        d = (out.reshape(-1, 3).unsqueeze(1) - env.palette.unsqueeze(0)).abs().amax(-1)
        assert (d.min(1).values < 1e-6).all()


# ------------------------------------------------------------------------------------------- schema


def test_schema_tooltips_and_descriptions(env) -> None:
    ids = []
    for cls in env.dage.DAGE_NODES:
        info = hcomfy.node_info(cls.GET_SCHEMA().node_id)
        ids.append(info["name"])
        assert info["name"].startswith("MegaSR") and info["category"] == "MegaSR/DAGE"
        assert info["description"].strip()
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{info['name']}.{name} has no tooltip"
        assert all(info["output_tooltips"]), info["name"]
    assert ids == ["MegaSRDageLoader", *MAP_NODES.values()]
    loader = hcomfy.node_info("MegaSRDageLoader")["input"]
    assert loader["required"]["kind"][1]["options"] == ["hed", "depth", "seg", "clip_lora"]
    assert FILES["hed"] in loader["required"]["dage_name"][1]["options"]
    assert loader["optional"]["base_name"][1]["options"][0] == "none"
    res = hcomfy.node_info("MegaSRDageHED")["input"]["required"]["resolution"][1]
    assert (res["default"], res["min"], res["step"]) == (512, 64, 64)


# ------------------------------------------------------------------------------ through the executor


@pytest.mark.parametrize("kind", ["hed", "depth", "seg"])
def test_prompt_runs_map_node_with_preview(env, kind: str) -> None:
    import comfy.utils

    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None, **kw: seen.append((value, total))
    )
    try:
        result = env.runner.run(_prompt(kind))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    previews = result.images("4")  # the map node's own inline preview
    assert len(previews) == 2
    for p in previews:
        with Image.open(p) as im:
            assert im.size == (W, H)
    assert len(result.images("5")) == 2
    assert seen[-2:] == [(1, 2), (2, 2)]  # one progress bar over the batch of 2, run to the end


def test_prompt_reloads_a_replaced_file(env) -> None:
    import shutil

    folder = Path(env.paths["dage_hed"]).parent
    swap = folder / "swap_hed.safetensors"
    shutil.copyfile(env.paths["dage_hed"], swap)
    try:
        first = env.runner.run(_prompt("hed", dage_name=swap.name)).images("4")[0].read_bytes()
        again = env.runner.run(_prompt("hed", dage_name=swap.name))
        cached = [n for d in again.events("execution_cached") for n in d.get("nodes", [])]
        assert "3" in cached and "4" in cached  # unchanged file: nothing re-runs
        other = write_dage_weight_files(str(folder / "seed1"), components=("dage_hed",), seed=1)["dage_hed"]
        shutil.copyfile(other, swap)
        os.utime(swap, ns=(swap.stat().st_atime_ns, swap.stat().st_mtime_ns + 10**9))
        changed = env.runner.run(_prompt("hed", dage_name=swap.name)).images("4")[0].read_bytes()
        assert changed != first  # same name, new weights: the loader ran again
    finally:
        swap.unlink(missing_ok=True)


def test_prompt_kind_mismatch_names_node_and_input(env) -> None:
    with pytest.raises(hcomfy.ExecutionFailed) as ei:
        env.runner.run(_prompt("depth", map_kind="hed"))
    e = ei.value
    assert e.exception_type.endswith("MegaSRInputError")
    assert "MegaSR DAGE HED" in e.exception_message and "'dage_model'" in e.exception_message
    assert "'depth'" in e.exception_message


def test_prompt_wrong_component_file_names_node_and_input(env) -> None:
    with pytest.raises(hcomfy.ExecutionFailed) as ei:
        env.runner.run(_prompt("hed", dage_name=FILES["depth"]))
    msg = ei.value.exception_message
    assert ei.value.exception_type.endswith("MegaSRInputError")
    assert LOADER in msg and "'dage_name'" in msg and "dage_depth_lora" in msg and "kind to 'depth'" in msg


# ------------------------------------------------------------------------------------- direct calls


@pytest.mark.parametrize("kind", ["hed", "depth", "seg"])
def test_maps_shapes_ranges_and_image_variants(env, kind: str) -> None:
    model = _load(env, kind)
    assert isinstance(model, env.common.ManagedModel) and model.kind == kind
    node = getattr(env.dage, MAP_NODES[kind])
    g = torch.Generator().manual_seed(0)
    variants = [
        torch.rand(2, H, W, 3, generator=g),  # batch 2, odd size
        torch.rand(1, H, W, 1, generator=g),  # grayscale
        torch.rand(1, H, W, 4, generator=g),  # RGBA
        (torch.rand(1, H, W, 3, generator=g) * 65535).to(torch.int32),  # 16-bit integer
        torch.rand(1, 1, 1, 3, generator=g),  # 1x1
    ]
    for image in variants:
        out = node.execute(image=image, dage_model=model, resolution=64)
        _check_map(env, kind, out.result[0], image.shape[0], image.shape[1], image.shape[2])
        assert out.ui is not None
    # the map follows the image (not a constant), and batch items are processed independently
    pair = node.execute(image=variants[0], dage_model=model, resolution=64).result[0]
    single = node.execute(image=variants[0][1:], dage_model=model, resolution=64).result[0]
    assert torch.allclose(pair[1:], single, atol=1e-5)


def test_map_node_errors_name_node_and_input(env) -> None:
    hed = _load(env, "hed")
    seg_node = env.dage.MegaSRDageSegmentation
    with pytest.raises(env.InputError) as ei:
        seg_node.execute(image=torch.rand(1, H, W, 3), dage_model=hed, resolution=64)
    assert "MegaSR DAGE Segmentation" in str(ei.value) and "'dage_model'" in str(ei.value)
    bad = torch.rand(1, H, W, 3)
    bad[0, 3, 4, 1] = float("nan")
    with pytest.raises(env.InputError) as ei:
        env.dage.MegaSRDageHED.execute(image=bad, dage_model=hed, resolution=64)
    assert "MegaSR DAGE HED" in str(ei.value) and "'image'" in str(ei.value)
    with pytest.raises(env.InputError) as ei:
        env.dage.MegaSRDageHED.execute(image=torch.rand(1, H, W, 5), dage_model=hed, resolution=64)
    assert "'image'" in str(ei.value)
    clip = _load(env, "clip_lora")
    with pytest.raises(env.InputError) as ei:
        env.dage.MegaSRDageDepth.execute(image=torch.rand(1, H, W, 3), dage_model=clip, resolution=64)
    assert "MegaSR DAGE Depth" in str(ei.value) and "clip_lora" in str(ei.value)


def test_loader_file_errors_name_node_and_input(env) -> None:
    def err(**kwargs) -> str:
        with pytest.raises(env.InputError) as ei:
            env.dage.MegaSRDageLoader.execute(**kwargs)
        msg = str(ei.value)
        assert msg.startswith(LOADER + ":"), msg
        return msg

    msg = err(kind="seg", dage_name=FILES["hed"])
    assert "'dage_name'" in msg and "dage_hed" in msg and "kind to 'hed'" in msg
    msg = err(kind="clip_lora", dage_name=FILES["seg"])
    assert "'dage_name'" in msg and "dage_seg" in msg
    # a file without MegaSR metadata (the depth base) picked as the DAGE file
    msg = err(kind="depth", dage_name=BASE, base_name=BASE)
    assert "'dage_name'" in msg and "not a MegaSR weight file" in msg
    msg = err(kind="hed", dage_name="no_such_file.safetensors")
    assert "'dage_name'" in msg and "not found" in msg
    # depth: the base is required, and must be a Depth-Anything file
    msg = err(kind="depth", dage_name=FILES["depth"])
    assert "'base_name'" in msg and "Depth-Anything-V2-Small" in msg
    msg = err(kind="depth", dage_name=FILES["depth"], base_name=FILES["hed"])
    assert "'base_name'" in msg and "dage_hed" in msg
    msg = err(kind="depth", dage_name=FILES["depth"], base_name="tiny_clip_vision.safetensors")
    assert "'base_name'" in msg and "not a transformers Depth-Anything model" in msg


def test_truncated_file_names_node_and_input(env, tmp_path: Path) -> None:
    src = Path(env.paths["dage_hed"])
    cut = src.parent / "truncated_hed.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    try:
        with pytest.raises(env.InputError) as ei:
            env.dage.MegaSRDageLoader.execute(kind="hed", dage_name=cut.name)
        assert "'dage_name'" in str(ei.value) and "truncated" in str(ei.value)
    finally:
        cut.unlink()


def test_clip_lora_loader_gives_weight_deltas(env) -> None:
    model = _load(env, "clip_lora")
    assert model.kind == "clip_lora" and model.filename == FILES["clip_lora"]
    deltas = model.info["weight_deltas"]
    # layers 0 .. L-2 (TINY_CLIP_CONFIG has 3), four projections each, hidden 32
    assert len(deltas) == 2 * 4
    for key, d in deltas.items():
        assert key.startswith("encoder.layers.") and key.endswith("_proj.weight")
        assert tuple(d.shape) == (32, 32) and torch.isfinite(d).all()
    assert any(float(d.abs().max()) > 0 for d in deltas.values())
    model.load()  # the holder is managed like any other model (nothing to move)


def test_clip_lora_plugs_into_clip_semantics(env, tmp_path: Path) -> None:
    """Loader output (kind clip_lora) -> MegaSR DAGE CLIP Image Semantics on a tiny ComfyUI CLIP_VISION gives the
    tokens of the DAGE CLIP extractor with the same LoRA; the user's CLIP_VISION stays unpatched."""
    import json

    import comfy.clip_vision
    from dage_fixtures import TINY_CLIP_CONFIG
    from safetensors.torch import load_file

    from megasr.dage.clip import ClipExtractor

    cfg = dict(TINY_CLIP_CONFIG["clip"], num_channels=3, model_type="clip_vision_model")
    (tmp_path / "tiny_clip_vision.json").write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp_path / "tiny_clip_vision.json"))
    missing, unexpected = cv.load_sd(load_file(env.paths["clip_vision"]))
    assert [k for k in missing if not k.startswith("visual_projection")] == [] and not unexpected
    semantics = _pack_module("nodes.semantics").MegaSRClipSemantics
    lora = _load(env, "clip_lora")
    img = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(7))
    with_lora = semantics.execute(image=img, clip_vision=cv, crop="center", dage_lora=lora).result[0].tokens
    plain = semantics.execute(image=img, clip_vision=cv, crop="center").result[0].tokens
    ref = ClipExtractor.load(env.paths["dage_clip_lora"], base_path=env.paths["clip_vision"])
    with torch.no_grad():
        expected = ref(img.movedim(-1, 1)).map
    assert with_lora.shape == expected.shape == (2, 257, 32)
    # ComfyUI stores CLIP vision weights in fp16 on CPU (text_encoder_dtype), hence the tolerance
    err_lora = float((with_lora - expected).abs().max())
    err_plain = float((plain - expected).abs().max())
    assert err_lora < 5e-3
    assert err_plain > 10 * err_lora  # the LoRA matters, and was not left on the user's model


def test_clip_semantics_crop_none_equals_what_training_computes_for_a_non_square_lr(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's default ``crop="none"`` on a non-square (29 x 37) LR: its CISM² image tokens must equal, to
    1e-5, the tokens the MegaSR training stage computes for the same image (``GuidanceExtractor`` with the
    default ``clip_crop``, the same base and DAGE LoRA files). ``crop="center"`` must equal training's
    ``clip_crop=true`` and differ from the default by far more than the tolerance.

    Catches a node (or a training default) that centre-crops while the other squashes the whole image, i.e.
    a model trained on one view of the image and run on another. ComfyUI keeps CLIP vision in fp16 on the CPU by
    default; here it runs with its own ``--fp32-text-enc`` option so the comparison is exact (the fp16 storage
    path is compared to 5e-3 in test_clip_lora_plugs_into_clip_semantics)."""
    import json

    import comfy.cli_args
    import comfy.clip_vision
    from dage_fixtures import TINY_CLIP_CONFIG
    from safetensors.torch import load_file

    from training.config import MegaSRStageConfig
    from training.guidance import GuidanceExtractor

    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)
    cfg = dict(TINY_CLIP_CONFIG["clip"], num_channels=3, model_type="clip_vision_model")
    (tmp_path / "tiny_clip_vision.json").write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp_path / "tiny_clip_vision.json"))
    assert cv.dtype == torch.float32
    missing, unexpected = cv.load_sd(load_file(env.paths["clip_vision"]))
    assert [k for k in missing if not k.startswith("visual_projection")] == [] and not unexpected
    semantics = _pack_module("nodes.semantics").MegaSRClipSemantics
    lora = _load(env, "clip_lora")
    img = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(8))
    assert H != W
    node = {
        crop: semantics.execute(image=img, clip_vision=cv, crop=crop, dage_lora=lora).result[0].tokens
        for crop in ("none", "center")
    }

    def training_tokens(**options) -> torch.Tensor:
        mcfg = MegaSRStageConfig(
            dage_clip=env.paths["dage_clip_lora"], dage_clip_base=env.paths["clip_vision"], **options
        )
        return GuidanceExtractor(mcfg, torch.device("cpu"))(img.movedim(-1, 1))["clip"]

    default, cropped = training_tokens(), training_tokens(clip_crop=True)
    assert node["none"].shape == default.shape == (1, 257, 32)
    scale = max(1.0, float(default.abs().max()))
    assert float((node["none"] - default).abs().max()) < 1e-5 * scale
    assert float((node["center"] - cropped).abs().max()) < 1e-5 * scale
    assert float((node["center"] - default).abs().max()) > 1e-2 * scale  # a centre crop would be caught


def test_managed_model_is_loaded_by_model_management(env) -> None:
    import comfy.model_management

    model = _load(env, "hed")
    device = model.load()
    assert device == model.patcher.load_device
    assert any(lm.model is model.patcher for lm in comfy.model_management.current_loaded_models)
    p = next(model.module.parameters())
    assert p.device.type == torch.device(device).type and not p.requires_grad
    np.testing.assert_equal(model.info["component"], "dage_hed")


def test_cancel_stops_between_images_and_leaves_comfy_usable(env) -> None:
    import comfy.model_management as mm

    hed = _load(env, "hed")
    node = env.dage.MegaSRDageHED
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(image=torch.rand(2, H, W, 3), dage_model=hed, resolution=64)
    finally:
        mm.interrupt_current_processing(False)
    out = node.execute(image=torch.rand(2, H, W, 3), dage_model=hed, resolution=64).result[0]
    assert tuple(out.shape) == (2, H, W, 3)


# ------------------------------------------------------------------------------ memory bounded by resolution


def _node_peak(env, kind: str, model, image: torch.Tensor, resolution: int) -> tuple[int, int]:
    from tensor_memory import TensorMemory

    node = getattr(env.dage, MAP_NODES[kind])
    model.load()  # weights are model management's business, not the node's working memory
    with TensorMemory() as mem:
        out = node.execute(image=image, dage_model=model, resolution=resolution).result[0]
    assert tuple(out.shape) == (1, image.shape[1], image.shape[2], 3)
    return mem.peak, mem.largest


@pytest.mark.parametrize("kind", ["seg", "hed", "depth"])
def test_map_node_memory_is_bounded_by_resolution(env, kind: str) -> None:
    """Peak tensor memory (every tensor the node creates, counted by the dispatcher) grows from a 512x512 to a
    2048x2048 LR (resolution 512) by at most 64 bytes per extra input pixel (RGB copy, labels / 1-channel map and
    the output IMAGE at the input size), and for segmentation stays within 2.5x of the 512 px peak: the network
    side stays at the working size. Catches class scores / side outputs / raw depth made at the input size
    (seg: [150, 2048, 2048] float = 2.4 GiB, 600 bytes per pixel, 14x the 512 px peak), and a working size that
    follows the input's long side (the 16x2048 strip ran at 512x65536). The pack's estimate
    (megasr/dage/memory.py) must cover what was counted."""
    from megasr.dage.memory import dage_map_bytes

    model = _load(env, kind)
    g = torch.Generator().manual_seed(5)
    small_peak, small_largest = _node_peak(env, kind, model, torch.rand(1, 512, 512, 3, generator=g), 512)
    big_peak, big_largest = _node_peak(env, kind, model, torch.rand(1, 2048, 2048, 3, generator=g), 512)
    extra_px = 2048 * 2048 - 512 * 512
    assert big_peak - small_peak <= 64 * extra_px, (big_peak, small_peak)
    if kind == "seg":
        assert big_peak <= 2.5 * small_peak, (big_peak, small_peak)
    # no single tensor larger than at 512 px, or than a few bytes per input pixel (the output IMAGE is 12)
    assert big_largest <= max(small_largest, 16 * 2048 * 2048), (big_largest, small_largest)
    assert big_peak <= dage_map_bytes(kind, 2048, 2048, 512) and small_peak <= dage_map_bytes(kind, 512, 512, 512)
    strip_peak, _ = _node_peak(env, kind, model, torch.rand(1, 16, 2048, 3, generator=g), 512)
    assert strip_peak <= 2.5 * small_peak, (strip_peak, small_peak)
    assert strip_peak <= dage_map_bytes(kind, 16, 2048, 512)


def test_clip_lora_for_another_width_is_refused(env, tmp_path: Path) -> None:
    """A CLIP LoRA made for width 32 on a width-48 CLIP_VISION is an error naming the node, the input and both
    shapes; ComfyUI alone would log 'SHAPE MISMATCH ... WEIGHT NOT MERGED' and give the plain tokens."""
    import json

    import comfy.clip_vision
    from dage_fixtures import TINY_CLIP_CONFIG

    cfg = dict(TINY_CLIP_CONFIG["clip"], hidden_size=48, intermediate_size=96, num_channels=3)
    cfg["model_type"] = "clip_vision_model"
    (tmp_path / "wide_clip_vision.json").write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp_path / "wide_clip_vision.json"))
    semantics = _pack_module("nodes.semantics").MegaSRClipSemantics
    with pytest.raises(env.InputError) as ei:
        semantics.execute(image=torch.rand(1, H, W, 3), clip_vision=cv, crop="none", dage_lora=_load(env, "clip_lora"))
    msg = str(ei.value)
    assert "MegaSR DAGE CLIP Image Semantics" in msg and "'dage_lora'" in msg
    assert "[32, 32]" in msg and "[48, 48]" in msg
