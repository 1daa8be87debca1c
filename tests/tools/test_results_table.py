"""The README's results table (scripts/tools/results_table.py) is the eval tool's own output.

Catches: a number typed into README.md (or a stale table after the JSON changed), committed JSON that the tool
no longer reproduces (a metric or protocol change, an example set edited by hand), a row dropped from the table.
``MEGASR_REGEN_RESULTS=1`` rewrites the committed tiny-weights row instead of comparing (after a workflow change).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from harness.paths import REPO_ROOT, load_script
from PIL import Image

RESULTS = REPO_ROOT / "docs" / "results"


def _tool():
    return load_script("megasr_results_table", "scripts/tools/results_table.py")


def _means(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())["means"]


def test_readme_block_is_rendered_from_the_json(tmp_path: Path) -> None:
    tool = _tool()
    assert tool.main(["render", "--check"]) == 0
    block = tool.render()
    for folder, _ in tool.ROWS:
        for means in _means(RESULTS / folder).values():
            assert f"{means['psnr']:.4f}" in block and f"{means['ssim']:.4f}" in block
    # a JSON edit must show in the table: the check fails until the README is re-rendered
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    data = json.loads((copy / "bicubic" / "results.json").read_text())
    data["means"]["example_set"]["psnr"] += 1.0
    (copy / "bicubic" / "results.json").write_text(json.dumps(data))
    assert tool.render(copy) != block


def test_example_set_and_bicubic_row_reproduce(tmp_path: Path) -> None:
    """make-set rebuilds the committed pairs bit for bit; eval on them gives the committed means exactly."""
    from megasr.evaluate import EvalSettings, bicubic_upscaler, discover, run_eval

    tool = _tool()
    made = tool.make_set(tmp_path / "example_set")
    for sub in ("HR", "LR"):
        names = sorted(p.name for p in (RESULTS / "example_set" / sub).iterdir())
        assert names == sorted(p.name for p in (made / sub).iterdir()) and len(names) == len(tool.CROPS)
        for n in names:
            a = np.asarray(Image.open(RESULTS / "example_set" / sub / n))
            assert np.array_equal(a, np.asarray(Image.open(made / sub / n)))
            assert a.shape[:2] == ((tool.HR_SIZE,) * 2 if sub == "HR" else (tool.HR_SIZE // tool.SCALE,) * 2)
    committed = json.loads((RESULTS / "bicubic" / "results.json").read_text())
    s = committed["settings"]
    settings = EvalSettings(s["method"], s["scale"], s["seed"], tuple(s["metrics"]), s["crop"], s["size_rule"])
    summary = run_eval([discover(RESULTS / "example_set")], bicubic_upscaler(s["scale"]), settings, tmp_path / "o")
    assert summary["means"].keys() == committed["means"].keys()
    for name, means in committed["means"].items():
        assert summary["means"][name] == pytest.approx(means, abs=1e-9)
    assert summary["protocol"] == committed["protocol"]


@pytest.mark.slow
@pytest.mark.usefixtures("restore_comfy_dirs")
def test_tiny_megasr_row_reproduces(comfy_runner, tiny_sd2_ckpt, object_info, tmp_path: Path) -> None:
    """The tiny-weights row is what scripts/eval_workflow.py gives for megasr_x4.json on the example set."""
    from megasr_fixtures import headless_sets, megasr_env

    env = megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    out = tmp_path / "megasr_x4_tiny"
    argv = [
        str(REPO_ROOT / "workflows" / "megasr_x4.json"),
        "--test",
        str(RESULTS / "example_set"),
        "--output",
        str(out),
        "--metrics",
        "psnr,ssim",
        *headless_sets(env, "megasr_x4"),
        "--set",
        "MegaSRSampler.steps=2",
        "--work-dir",
        str(tmp_path / "work"),
    ]
    assert load_script("megasr_eval_workflow", "scripts/eval_workflow.py").main(argv) == 0
    target = RESULTS / "megasr_x4_tiny"
    if os.environ.get("MEGASR_REGEN_RESULTS") == "1":
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out, target)
        _tool().main(["render"])
    got, want = _means(out), _means(target)
    assert got.keys() == want.keys()
    for name in want:
        # CPU float differences can move a few 8-bit pixels by one level; a changed workflow moves far more
        assert got[name]["psnr"] == pytest.approx(want[name]["psnr"], abs=0.05)
        assert got[name]["ssim"] == pytest.approx(want[name]["ssim"], abs=0.002)
