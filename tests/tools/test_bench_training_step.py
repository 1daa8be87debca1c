"""scripts/tools/bench_training_step.py at a tiny size, so that the committed benchmark cannot rot (no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_training_step_benchmark_runs_and_reports_every_variant(tmp_path: Path) -> None:
    from bench_training_step import RATIOS, main

    out = tmp_path / "bench.json"
    assert main(["--width", "32", "--latent", "16", "--batch", "1", "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["unet"]["width"] == 32 and report["crop_px"] == 128
    mem = report["memory"]
    assert set(report["time_ratios"]) == set(RATIOS) == set(report["memory_ratios"])
    # the same U-Net and ControlNet in every variant: MegaSR trains more, the new parts alone less
    assert mem["megasr"]["trained_params"] > mem["controlnet"]["trained_params"] > 0
    assert mem["megasr_new_parts"]["trained_params"] < mem["megasr"]["trained_params"]
    assert mem["megasr_ckpt"]["trained_params"] == mem["megasr"]["trained_params"]
    # checkpointing keeps less for backward (at a latent where the activations outweigh the gradients)
    assert mem["megasr_ckpt"]["backward_peak_bytes"] < mem["megasr"]["backward_peak_bytes"]
    assert mem["controlnet_ckpt"]["backward_peak_bytes"] < mem["controlnet"]["backward_peak_bytes"]
