"""scripts/headless.py (the headless form of scripts/run.sh), run in-process on the shared ComfyUI."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
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
def test_headless_refuses_an_unknown_override(comfy_runner: comfy.ComfyRunner, tmp_path: Path) -> None:
    src = write_test_image(tmp_path / "photo.png", 32, 32)
    wf = REPO_ROOT / "workflows" / "megasr_color_fix.json"
    argv = [str(wf), "--input", str(src), "--output", str(tmp_path / "o.png"), "--set", "NoSuchNode.x=1"]
    with pytest.raises(Exception, match="NoSuchNode"):
        _headless().main([*argv, "--work-dir", str(tmp_path / "work")])


def test_input_goes_to_the_lr_image_node_only(tmp_path: Path) -> None:
    headless = _headless()

    def loader(title: str) -> dict:
        return {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": title}}

    both = {"1": loader("LR image"), "2": loader("Hand-made depth map")}
    assert headless.input_nodes(both, tmp_path) == ["1"]
    assert headless.input_nodes({"5": loader("Load Image")}, tmp_path) == ["5"]
    with pytest.raises(SystemExit, match="--set"):
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


def test_no_product_module_imports_tests() -> None:
    """Product code (nodes/, megasr/, training/, scripts/, __init__.py) never imports from tests/ (``harness``,
    ``megasr_fixtures``, ``conftest`` ...) nor puts tests/ on sys.path: the headless runner is product code."""
    import ast

    test_modules = {p.stem for p in (REPO_ROOT / "tests").glob("*.py")} | {"harness", "tests", "conftest"}
    offenders = []
    files = [REPO_ROOT / "__init__.py"]
    for folder in ("nodes", "megasr", "training", "scripts"):
        files += sorted((REPO_ROOT / folder).rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        if '"tests"' in text or "'tests'" in text:
            offenders.append(f"{path.relative_to(REPO_ROOT)}: names the tests folder")
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO_ROOT)}: import {n}" for n in names if n.split(".")[0] in test_modules
            ]
    assert not offenders, offenders
