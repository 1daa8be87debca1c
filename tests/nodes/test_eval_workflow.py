"""scripts/eval_workflow.py: the eval command with a shipped workflow as the upscaler, in the real ComfyUI.

Catches: the LR not reaching the workflow's LoadImage (the example image would be scored), the wrong output
node, an SR not scored against its own HR, a report that does not name the workflow and its overrides.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from harness import comfy as hcomfy
from harness.paths import REPO_ROOT, load_script
from megasr_fixtures import headless_sets
from PIL import Image


def _script():
    return load_script("megasr_eval_workflow", "scripts/eval_workflow.py")


def _y(u8: np.ndarray) -> np.ndarray:
    return 16.0 + (u8.astype(np.float64) / 255.0) @ np.array([65.481, 128.553, 24.966])


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_shipped_workflow_as_the_upscaler(comfy_runner: hcomfy.ComfyRunner, tmp_path: Path) -> None:
    ds = tmp_path / "DIV2K_V2_val"
    (ds / "lq").mkdir(parents=True)
    (ds / "gt").mkdir()
    rng = np.random.default_rng(3)
    lrs = {}
    for i in range(2):
        lr = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        hr = np.asarray(Image.fromarray(lr).resize((48, 40 + 4 * i), Image.BICUBIC))
        Image.fromarray(lr).save(ds / "lq" / f"08{i:02d}x4.png")
        Image.fromarray(hr).save(ds / "gt" / f"08{i:02d}.png")
        lrs[f"08{i:02d}x4.png"] = (lr, hr)
    out = tmp_path / "eval"
    wf = REPO_ROOT / "workflows" / "megasr_color_fix.json"
    argv = [str(wf), "--test", str(ds), "--output", str(out), "--metrics", "psnr,ssim"]
    argv += ["--set", "2.scale_by=4", "--set", "3.mode=none", "--work-dir", str(tmp_path / "w")]
    assert _script().main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["method"] == "workflow:megasr_color_fix.json 2.scale_by=4 3.mode=none"
    assert len(res["per_image"]) == 2
    for r in res["per_image"]:
        lr, hr = lrs[r["image"]]
        sr = np.asarray(Image.open(out / r["sr"]).convert("RGB"))
        assert sr.shape == hr.shape == (lr.shape[0] * 4, 48, 3)  # its own LR went through, x4
        expected = 10 * math.log10(255**2 / (np.mean((_y(sr) - _y(hr)) ** 2) + 1e-8))
        assert r["psnr"] == pytest.approx(expected, abs=1e-6)
        assert 20 < r["psnr"] < 60
    assert "| ours: workflow:megasr_color_fix.json" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def megasr_env_(comfy_runner, tiny_sd2_ckpt, object_info):
    from megasr_fixtures import megasr_env

    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


@pytest.mark.slow
@pytest.mark.usefixtures("restore_comfy_dirs")
def test_megasr_x4_with_the_tiny_sd2_checkpoint_seeded_per_image(megasr_env_, tmp_path: Path) -> None:
    """The shipped MegaSR x4 workflow (tiny SD-2 + tiny MegaSR files) as the upscaler: x4 outputs, scored, and
    the per-image seed makes a second run bit-identical while another base seed changes the result."""
    ds = tmp_path / "lr_only"
    ds.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (11, 13, 3), dtype=np.uint8)).save(ds / f"im{i}.png")
    sets = headless_sets(megasr_env_, "megasr_x4") + ["--set", "MegaSRSampler.steps=2"]
    wf = str(REPO_ROOT / "workflows" / "megasr_x4.json")

    def run(out: str, seed: int) -> list[np.ndarray]:
        argv = [wf, "--test", str(ds), "--output", str(tmp_path / out), "--metrics", "psnr", "--seed", str(seed)]
        assert _script().main([*argv, *sets, "--work-dir", str(tmp_path / f"w_{out}")]) == 0
        res = json.loads((tmp_path / out / "results.json").read_text())
        assert res["metrics_skipped"] == [] and res["images_scored"] == {"lr_only": 2}
        return [np.asarray(Image.open(tmp_path / out / r["sr"]).convert("RGB")) for r in res["per_image"]]

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert all(x.shape == (44, 52, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
