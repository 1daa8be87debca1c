"""scripts/headless.py (the headless form of scripts/run.sh), run in-process on the shared ComfyUI."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from megasr_fixtures import headless_sets

from harness import comfy
from harness.images import load_image_array, write_test_image
from harness.paths import REPO_ROOT


def _headless() -> ModuleType:
    spec = importlib.util.spec_from_file_location("megasr_headless", REPO_ROOT / "scripts" / "headless.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_headless_runs_a_workflow_on_an_input_image(comfy_runner: comfy.ComfyRunner, tmp_path: Path) -> None:
    src = write_test_image(tmp_path / "photo.png", 80, 60, seed=3)
    out = tmp_path / "result" / "out.png"
    wf = REPO_ROOT / "workflows" / "megasr_color_fix.json"
    argv = [str(wf), "--input", str(src), "--output", str(out), "--set", "3.mode=wavelet", "--set", "2.scale_by=1.5"]
    assert _headless().main([*argv, "--work-dir", str(tmp_path / "work")]) == 0
    img = load_image_array(out)
    assert img.shape == (90, 120, 3)
    assert np.isfinite(img).all() and 0.0 <= img.min() and img.max() <= 1.0


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_headless_refuses_an_unknown_override(comfy_runner: comfy.ComfyRunner, tmp_path: Path, capsys) -> None:
    """A user error: one line naming the override, exit status 2, no traceback."""
    src = write_test_image(tmp_path / "photo.png", 32, 32)
    wf = REPO_ROOT / "workflows" / "megasr_color_fix.json"
    argv = [str(wf), "--input", str(src), "--output", str(tmp_path / "o.png"), "--set", "NoSuchNode.x=1"]
    assert _headless().main([*argv, "--work-dir", str(tmp_path / "work")]) == 2
    assert "NoSuchNode" in capsys.readouterr().err


def test_input_goes_to_the_lr_image_node_only(tmp_path: Path) -> None:
    headless = _headless()

    def loader(title: str) -> dict:
        return {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": title}}

    both = {"1": loader("LR image"), "2": loader("Hand-made depth map")}
    assert headless.input_nodes(both, tmp_path) == ["1"]
    assert headless.input_nodes({"5": loader("Load Image")}, tmp_path) == ["5"]
    with pytest.raises(headless.UserError, match="--set"):
        headless.input_nodes({"1": loader("a"), "2": loader("b")}, tmp_path)


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_headless_batch_over_a_folder(comfy_runner: comfy.ComfyRunner, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    write_test_image(photos / "a.png", 40, 30, seed=5)
    write_test_image(photos / "b.png", 20, 24, seed=6)
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "results"
    wf = REPO_ROOT / "workflows" / "megasr_color_fix.json"
    argv = [str(wf), "--input", str(photos), "--output", str(out), "--work-dir", str(tmp_path / "work")]
    assert _headless().main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert load_image_array(out / "a.png").shape == (60, 80, 3)
    assert load_image_array(out / "b.png").shape == (48, 40, 3)


# ------------------------------------------------------------------ first run: missing files, the result, no data loss


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_missing_weights_are_all_listed_at_once_with_folder_and_source(comfy_runner, tmp_path, capsys) -> None:
    """``megasr_x4`` as shipped, on a machine without its weights: exit 2, no traceback, and one message naming
    every absent file (8) with its folder and where it comes from (hub address or the training command)."""
    src = write_test_image(tmp_path / "photo.png", 16, 12, seed=1)
    wf = REPO_ROOT / "workflows" / "megasr_x4.json"
    argv = [str(wf), "--input", str(src), "--output", str(tmp_path / "o.png"), "--work-dir", str(tmp_path / "w")]
    assert _headless().main(argv) == 2
    err = capsys.readouterr().err
    assert "8 file(s) missing" in err and "Traceback" not in err
    for name, folder, source in [
        ("512-base-ema.safetensors", "checkpoints", "stabilityai/stable-diffusion-2-base"),
        ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision", "h94/IP-Adapter"),
        ("depth_anything_v2_small.safetensors", "megasr", "depth-anything/Depth-Anything-V2-Small-hf"),
        ("megasr_sd2_x4.safetensors", "megasr", "python -m training megasr"),
        ("megasr_dage_hed.safetensors", "megasr", "python -m training dage-hed"),
        ("megasr_dage_depth_lora.safetensors", "megasr", "python -m training dage-depth"),
        ("megasr_dage_seg.safetensors", "megasr", "python -m training dage-seg"),
        ("megasr_dage_clip_lora.safetensors", "megasr", "python -m training dage-clip"),
    ]:
        line = next((x for x in err.splitlines() if f"'{name}' was not found in models/{folder}" in x), None)
        assert line is not None and source in line, (name, err)
    assert not (tmp_path / "o.png").exists()


@pytest.fixture(scope="module")
def megasr_env_(comfy_runner, tiny_sd2_ckpt, object_info):
    from megasr_fixtures import megasr_env

    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


@pytest.mark.slow
@pytest.mark.usefixtures("restore_comfy_dirs")
@pytest.mark.parametrize("name", ["megasr_x4", "megasr_swap_guidance", "megasr_large_tiled"])
def test_output_is_the_sampler_result_not_a_map_preview(megasr_env_, tmp_path, name) -> None:
    """--output receives the MegaSR Sampler's image: exactly 4x the LR (13x11 -> 52x44), not the 64 px map
    previews the DAGE nodes also emit (the bug: the first image output was taken)."""
    src = write_test_image(tmp_path / "lr.png", 13, 11, seed=7)
    out = tmp_path / "out.png"
    wf = REPO_ROOT / "workflows" / f"{name}.json"
    argv = [str(wf), "--input", str(src), "--output", str(out), "--work-dir", str(tmp_path / "w")]
    assert _headless().main([*argv, *headless_sets(megasr_env_, name), "--set", "MegaSRSampler.steps=1"]) == 0
    assert load_image_array(out).shape == (44, 52, 3)


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_several_outputs_without_a_sampler_need_output_node(megasr_env_, tmp_path, capsys) -> None:
    """megasr_guidance_maps saves three maps: headless names them and asks for --output-node (exit 2); with
    it, that node's image is written."""
    src = write_test_image(tmp_path / "lr.png", 13, 11, seed=8)
    out = tmp_path / "depth.png"
    wf = REPO_ROOT / "workflows" / "megasr_guidance_maps.json"
    argv = [str(wf), "--input", str(src), "--output", str(out), "--work-dir", str(tmp_path / "w")]
    argv += headless_sets(megasr_env_, "megasr_guidance_maps")
    assert _headless().main(argv) == 2
    assert "--output-node" in capsys.readouterr().err and not out.exists()
    from harness.workflow import load_workflow

    save_depth = next(
        str(n["id"])
        for n in load_workflow(wf)["nodes"]
        if n["type"] == "SaveImage" and "MegaSR_depth" in n["widgets_values"]
    )
    assert _headless().main([*argv, "--output-node", save_depth]) == 0
    img = load_image_array(out)
    assert img.shape[:2] == (11, 13) and np.allclose(img[..., 0], img[..., 1])  # the gray depth map


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_batch_never_overwrites_inputs_or_earlier_results(comfy_runner, tmp_path, capsys) -> None:
    """Issue 14: --output equal to --input is refused (originals byte-identical); portrait.png and portrait.jpg
    get two results; an existing result is skipped without --overwrite (exit 3, named) and replaced with it."""
    photos = tmp_path / "photos"
    write_test_image(photos / "portrait.png", 20, 16, seed=1)
    from PIL import Image

    Image.open(photos / "portrait.png").save(photos / "portrait.jpg")
    write_test_image(photos / "holiday.png", 24, 20, seed=2)
    before = {p.name: _sha(p) for p in photos.iterdir()}
    wf = REPO_ROOT / "workflows" / "megasr_color_fix.json"
    work = ["--work-dir", str(tmp_path / "w")]
    h = _headless()

    assert h.main([str(wf), "--input", str(photos), "--output", str(photos), *work]) == 2
    assert "input folder" in capsys.readouterr().err
    assert {p.name: _sha(p) for p in photos.iterdir()} == before

    out = tmp_path / "results"
    assert h.main([str(wf), "--input", str(photos), "--output", str(out), *work]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["holiday.png", "portrait_jpg.png", "portrait_png.png"]
    assert load_image_array(out / "portrait_png.png").shape == (32, 40, 3)

    kept = _sha(out / "holiday.png")
    (photos / "holiday.png").unlink()
    write_test_image(photos / "holiday.png", 30, 10, seed=3)
    capsys.readouterr()
    assert h.main([str(wf), "--input", str(photos), "--output", str(out), *work]) == 3
    err = capsys.readouterr().err
    assert "holiday.png exists (pass --overwrite" in err and _sha(out / "holiday.png") == kept
    assert h.main([str(wf), "--input", str(photos), "--output", str(out), "--overwrite", *work]) == 0
    assert load_image_array(out / "holiday.png").shape == (20, 60, 3)

    single = tmp_path / "one.png"
    single.write_bytes(b"mine")
    assert h.main([str(wf), "--input", str(photos / "portrait.png"), "--output", str(single), *work]) == 2
    assert single.read_bytes() == b"mine"
    assert (
        h.main(
            [
                str(wf),
                "--input",
                str(photos / "portrait.png"),
                "--output",
                str(photos / "portrait.png"),
                "--force",
                *work,
            ]
        )
        == 2
    )
    assert _sha(photos / "portrait.png") == before["portrait.png"]


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_huge_output_is_refused_before_any_work(megasr_env_, tmp_path, capsys) -> None:
    """Issue 14: a 4096x4096 LR at x4 through megasr_x4 is refused by the memory preflight within seconds with
    the numbers and the input to change (exit 2), and the runner serves the next prompt."""
    import time

    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (4096, 4096), (90, 120, 150)).save(big)
    wf = REPO_ROOT / "workflows" / "megasr_x4.json"
    argv = [str(wf), "--input", str(big), "--output", str(tmp_path / "o.png"), "--work-dir", str(tmp_path / "w")]
    argv += headless_sets(megasr_env_, "megasr_x4")
    start = time.perf_counter()
    assert _headless().main(argv) == 2
    assert time.perf_counter() - start < 120
    err = capsys.readouterr().err
    assert "GiB" in err and "scale" in err and "4096x4096" in err
    small = write_test_image(tmp_path / "small.png", 13, 11, seed=9)
    argv[2] = str(small)
    assert _headless().main([*argv, "--set", "MegaSRSampler.steps=1"]) == 0
    assert load_image_array(tmp_path / "o.png").shape == (44, 52, 3)


def test_comfy_validation_names_every_missing_megasr_file(comfy_runner, object_info) -> None:
    """In the UI (ComfyUI's own validate_prompt): the shipped megasr_x4 without weights fails validation on every
    MegaSR/DAGE file at once (not one per run, not silently with an empty list), each with how to make it."""
    from harness.workflow import load_workflow, to_api

    p = to_api(load_workflow(REPO_ROOT / "workflows" / "megasr_x4.json"), object_info)
    with pytest.raises(comfy.PromptInvalid) as e:
        comfy_runner.validate(p)
    text = str(e.value)
    for name, how in [
        ("megasr_sd2_x4.safetensors", "python -m training megasr "),
        ("megasr_dage_hed.safetensors", "python -m training dage-hed "),
        ("megasr_dage_depth_lora.safetensors", "python -m training dage-depth "),
        ("depth_anything_v2_small.safetensors", "python -m megasr fetch --only depth_anything_v2_small"),
        ("megasr_dage_seg.safetensors", "python -m training dage-seg "),
        ("megasr_dage_clip_lora.safetensors", "python -m training dage-clip "),
    ]:
        assert f"'{name}' was not found in models/megasr" in text and how in text, name
