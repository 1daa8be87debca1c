"""``python -m megasr eval`` (megasr/evaluate.py) end to end on a tiny RealSR-style folder with the bicubic baseline.

Catches: LR/HR paired by position instead of by name, scores computed on the float SR instead of the saved 8-bit
file, a crash on an unreadable image, a resume that redoes (or loses) finished images after SIGKILL, a finished
report overwritten without --force, means that include skipped images, a table without the paper's figures.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from megasr import __main__ as cli
from megasr.evaluate import discover, pair_key

REPO = Path(__file__).resolve().parents[2]


def _y(u8: np.ndarray) -> np.ndarray:
    return 16.0 + (u8.astype(np.float64) / 255.0) @ np.array([65.481, 128.553, 24.966])


def _make_set(root: Path, n: int = 4, size: int = 24) -> Path:
    ds = root / "RealSRVal_crop128"
    (ds / "test_LR").mkdir(parents=True)
    (ds / "test_HR").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        hr = rng.integers(0, 256, (size * 4, size * 4, 3), dtype=np.uint8)
        hr = np.asarray(Image.fromarray(hr).resize((size, size)).resize((size * 4, size * 4), Image.BILINEAR))
        lr = np.asarray(Image.fromarray(hr).resize((size, size), Image.BICUBIC))
        # names as in the RealSR crops (LR4 / HR decorations)
        Image.fromarray(lr).save(ds / "test_LR" / f"Canon_{i:03d}_LR4.png")
        Image.fromarray(hr).save(ds / "test_HR" / f"Canon_{i:03d}_HR.png")
    (ds / "test_LR" / "Canon_999_LR4.png").write_bytes(b"this is not a png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(ds / "test_HR" / "Canon_999_HR.png")
    return ds


def test_pairing_by_name_ignores_decorations(tmp_path: Path) -> None:
    ds = _make_set(tmp_path, n=3)
    ts = discover(ds)
    assert ts.paired and ts.name == "RealSRVal_crop128"
    assert [(it.lr.name, it.hr.name) for it in ts.items[:3]] == [
        (f"Canon_{i:03d}_LR4.png", f"Canon_{i:03d}_HR.png") for i in range(3)
    ]
    assert pair_key(Path("0801x4.png")) == pair_key(Path("0801.png")) == "0801"
    lr_only = tmp_path / "DPEDiphone_crop128"
    lr_only.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lr_only / "1.png")
    assert not discover(lr_only).paired


def _driver(out: Path, ds: Path) -> subprocess.Popen:
    """The eval core in a separate process, slowed per image so that a SIGKILL lands mid-run."""
    code = (
        "import logging, time, sys; logging.basicConfig(level=logging.INFO)\n"
        "from megasr.evaluate import *\n"
        "up = bicubic_upscaler(4)\n"
        "def slow(lr, seed):\n    time.sleep(0.6); return up(lr, seed)\n"
        f"run_eval([discover({str(ds)!r})], slow, EvalSettings('bicubic', 4, 0, ('psnr', 'ssim')), {str(out)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)


def test_eval_end_to_end_resume_after_sigkill_skip_and_no_overwrite(tmp_path: Path, capsys) -> None:
    ds = _make_set(tmp_path, n=6)
    out = tmp_path / "eval_out"
    proc = _driver(out, ds)
    jsonl = out / "per_image.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not jsonl.is_file() or len(jsonl.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert 2 <= len(before) < 7, "the kill must land mid-run"
    assert not (out / "results.json").exists()
    first_sr = out / before[0]["sr"]
    mtime = first_sr.stat().st_mtime_ns

    args = ["eval", "--test", str(ds), "--output", str(out), "--metrics", "psnr,ssim", "--models-dir", str(tmp_path)]
    assert cli.main(args) == 0
    assert first_sr.stat().st_mtime_ns == mtime  # not redone
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    names = [r["image"] for r in rows]
    assert sorted(names) == sorted(set(names)) and len(names) == 7  # 6 images + the unreadable one, once each
    skipped = [r for r in rows if "skipped" in r]
    assert len(skipped) == 1 and skipped[0]["image"] == "Canon_999_LR4.png" and "cannot read" in skipped[0]["skipped"]

    # the scores are those of the saved 8-bit SR against its own HR (paired by name)
    res = json.loads((out / "results.json").read_text())
    psnrs = []
    for r in (r for r in res["per_image"] if "skipped" not in r):
        sr = np.asarray(Image.open(out / r["sr"]).convert("RGB"))
        hr = np.asarray(Image.open(ds / "test_HR" / r["image"].replace("_LR4", "_HR")).convert("RGB"))
        lr = torch.from_numpy(np.array(Image.open(ds / "test_LR" / r["image"]))).permute(2, 0, 1)[None] / 255.0
        bic = F.interpolate(lr.float(), scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        assert np.array_equal(sr, (bic[0] * 255).round().byte().permute(1, 2, 0).numpy())
        expected = 10 * math.log10(255**2 / (np.mean((_y(sr) - _y(hr)) ** 2) + 1e-8))
        assert r["psnr"] == pytest.approx(expected, abs=1e-6)
        psnrs.append(expected)
    assert res["means"]["RealSRVal_crop128"]["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-6)
    assert res["images_scored"]["RealSRVal_crop128"] == 6
    csv_text = (out / "results.csv").read_text()
    assert "MEAN" in csv_text and "Canon_999_LR4.png" in csv_text
    report = (out / "report.md").read_text()
    assert "| MegaSR (paper), RealSR | 23.4900 | 0.6903 | 0.3072 | - | 0.5574 | 70.0300 | 0.6790 |" in report
    assert "| ours: bicubic, RealSRVal_crop128 (6 images) |" in report
    assert "Y channel" in report and "border crop 0 px" in report

    # a finished report is kept unless --force
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "--force" in capsys.readouterr().out
    assert cli.main([*args, "--force"]) == 0
    assert len((out / "per_image.jsonl").read_text().splitlines()) == 7


def test_changed_settings_do_not_mix_into_an_interrupted_run(tmp_path: Path, capsys) -> None:
    ds = _make_set(tmp_path, n=1)
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"settings": {"method": "bicubic", "metrics": ["psnr"]}, "sets": []}))
    assert cli.main(["eval", "--test", str(ds), "--output", str(out), "--metrics", "psnr,ssim"]) == 2
    assert "other settings" in capsys.readouterr().out
    assert cli.main(["eval", "--test", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")]) == 2
