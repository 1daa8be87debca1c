"""Ctrl-C (SIGINT) and SIGTERM stop a headless batch after the current image: exit 130 / 143, every image listed as
written or not written, each written file whole, no half-written file, and the run's temp work folder removed.

Catches: a batch that ignores Ctrl-C and writes everything with exit 0 (issue 29), a signal that kills the process
mid-copy (a truncated PNG under the final name or a ``.tmp`` left), a temp work folder left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.images import load_image_array, write_test_image
from harness.paths import REPO_ROOT

pytestmark = pytest.mark.slow

WORKFLOW = REPO_ROOT / "workflows" / "megasr_color_fix.json"
COUNT = 24


def _batch(tmp_path: Path, sig: int) -> tuple[int, str, str, Path, Path]:
    photos = tmp_path / "photos"
    for i in range(COUNT):
        write_test_image(photos / f"p{i:02d}.png", 384, 288, seed=i)
    out = tmp_path / "results"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "headless.py"), str(WORKFLOW), "--input", str(photos)]
    cmd += ["--output", str(out), "--set", "2.scale_by=2.0", "--set", "3.mode=wavelet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    first = proc.stdout.readline()  # the first image was written: the batch is under way
    assert first.startswith("wrote "), first + proc.stderr.read()[-3000:]
    proc.send_signal(sig)
    try:
        rest, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return proc.returncode, first + rest, err, out, tmp


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_batch_after_the_current_image(tmp_path: Path, sig: int) -> None:
    start = time.monotonic()
    rc, out_text, err, out, tmp = _batch(tmp_path, sig)
    assert rc == 128 + sig, (rc, out_text, err[-3000:])
    written = re.findall(r"^  written     (.+)$", err, re.M)
    not_written = re.findall(r"^  not written (.+)$", err, re.M)
    expected = sorted(str(out / f"p{i:02d}.png") for i in range(COUNT))
    assert sorted(written + not_written) == expected, err
    assert not_written, f"all {COUNT} images were written before the signal ({time.monotonic() - start:.0f}s)"
    # exactly the listed files exist, each a whole image at 2x; no temp file beside them
    assert sorted(str(p) for p in out.iterdir()) == sorted(written), err
    for p in written:
        assert load_image_array(Path(p)).shape == (576, 768, 3)
    assert f"stopped by {signal.Signals(sig).name}: {len(written)} of {COUNT}" in err
    left = list(tmp.glob("megasr-headless-*"))  # (torch keeps its own compile cache there: not ours)
    assert left == [], f"the run's work folder was left: {left}"


def test_missing_files_are_listed_before_comfyui_boots(tmp_path: Path) -> None:
    """``megasr_x4`` as shipped on a machine without its weights: all 8 files listed from the workflow file alone,
    with ComfyUI's nodes never loaded (the message used to come after the boot, most of a minute later)."""
    src = write_test_image(tmp_path / "photo.png", 16, 12, seed=1)
    code = f"""
import sys, importlib.util
spec = importlib.util.spec_from_file_location("h", {str(REPO_ROOT / "scripts" / "headless.py")!r})
h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
args = h.parse_args([{str(REPO_ROOT / "workflows" / "megasr_x4.json")!r}, "--input", {str(src)!r},
                     "--output", {str(tmp_path / "o.png")!r}])
try:
    h.check_files_before_boot(args)
except h.UserError as e:
    print(e)
print("booted" if "nodes" in sys.modules or "comfy.model_management" in sys.modules else "not booted")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0 and "8 file(s) missing" in out, out + proc.stderr[-3000:]
    assert out.strip().endswith("not booted"), out
    for name, folder in [
        ("512-base-ema.safetensors", "checkpoints"),
        ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision"),
        ("depth_anything_v2_small.safetensors", "megasr"),
        ("megasr_sd2_x4.safetensors", "megasr"),
        ("megasr_dage_hed.safetensors", "megasr"),
        ("megasr_dage_depth_lora.safetensors", "megasr"),
        ("megasr_dage_seg.safetensors", "megasr"),
        ("megasr_dage_clip_lora.safetensors", "megasr"),
    ]:
        assert f"'{name}' was not found in models/{folder}" in out, (name, out)
