"""Validation wired into the MegaSR stage (config section ``validation``, training/stage_validation.py) on a tiny
real run: the tiny SD-2 base, the tiny DAGE extractors, DDIM sampling of the model being trained.

Catches: validation that runs when it is off (the tiny default) or at the wrong steps, scores that do not reach
the run log or the opted-in tracker, a logged score that is not the score of the model's own SR (e.g. of the
bicubic hint), an SR of the wrong size or not seeded, a best checkpoint lost when the newest are pruned, a
config that accepts an interval without checkpoints or a folder-less validation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from megasr_training_fixtures import megasr_config, write_guidance_files, write_hr_folder, write_tiny_sd2_base
from PIL import Image

from megasr.evaluate import read_rgb
from megasr.metrics import compute_metrics
from training import stage_validation
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config import load_config
from training.errors import ConfigError, UsageError
from training.validation import best_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("megasr_val")
    val = root / "val"
    (val / "LR").mkdir(parents=True)
    (val / "HR").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        hr = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32)))
        Image.fromarray(hr).save(val / "HR" / f"v{i}.png")
        Image.fromarray(hr).resize((8, 8), Image.BICUBIC).save(val / "LR" / f"v{i}.png")
    return {
        "root": root,
        "base": write_tiny_sd2_base(root / "sd2"),
        "guidance": write_guidance_files(root / "dage"),
        "hr": write_hr_folder(root / "hr"),
        "val": val,
    }


def _cfg(setup: dict[str, Any], run: Path, validation: dict | None, **train: Any):
    path = megasr_config(setup["base"], setup["guidance"], setup["hr"], run, **train)
    data = json.loads(path.read_text())
    if validation is not None:
        data["validation"] = validation
    path.write_text(json.dumps(data))
    return load_config(path)


class _Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, dict(values)))


def test_validation_is_off_by_default_in_tiny(setup) -> None:
    cfg = _cfg(setup, setup["root"] / "off", None)
    assert cfg.validation.every == 0
    assert stage_validation.megasr_validation_hook(cfg, setup["root"] / "off", None, None) is None


def test_config_refuses_an_interval_without_checkpoints_and_a_missing_folder(setup) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(setup, setup["root"] / "bad", {"every": 3}, checkpoint_every=2)
    text = str(err.value)
    assert "validation.every" in text and "multiple of train.checkpoint_every" in text, text
    assert "validation.folder" in text, text
    with pytest.raises(ConfigError, match="validation.best_metric"):
        _cfg(setup, setup["root"] / "bad", {"every": 2, "folder": "x", "best_metric": "lpips"}, checkpoint_every=2)


def test_a_validation_folder_without_images_is_a_usage_error_before_training(setup, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        cfg = _cfg(setup, tmp_path / "run", {"every": 2, "folder": str(folder)}, checkpoint_every=2)
        with pytest.raises(UsageError, match="validation.folder") as err:
            stage_validation.megasr_validation_hook(cfg, tmp_path / "run", None, None)
        assert str(folder) in str(err.value)


def test_validation_in_a_tiny_megasr_run(setup, tmp_path: Path, monkeypatch, caplog) -> None:
    from training.stage_megasr import STAGE, train_megasr

    recorder = _Recorder()
    made: list[tuple[str, Path]] = []

    def factory(run_name: str, logging_dir: Path) -> _Recorder:
        made.append((run_name, logging_dir))
        return recorder

    monkeypatch.setitem(stage_validation.TRACKERS, "tensorboard", factory)
    run = tmp_path / "run"
    run.mkdir()
    val = {"every": 2, "folder": str(setup["val"]), "steps": 2, "seed": 5, "log_with": "tensorboard"}
    cfg = _cfg(setup, run, val, max_steps=4, checkpoint_every=2, keep_last=1, batch_size=1, lr=1e-3)
    with caplog.at_level(logging.INFO):
        result, _, stage = train_megasr(cfg, run)
    assert result.step == 4
    assert made == [("validation", run / "logs")]
    assert [s for s, _ in recorder.logged] == [2, 4]
    assert all(set(v) == {"val/psnr", "val/ssim"} for _, v in recorder.logged)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation step")]
    assert len(msgs) == 2 and msgs[0].startswith("validation step 2: psnr=") and "ssim=" in msgs[0], msgs
    for step in (2, 4):
        grid = np.asarray(Image.open(run / "validation" / f"step_{step:08d}.png"))
        assert grid.shape == (32, 64, 3)  # two 8 x 8 LR images at x4, side by side

    # the logged score at step 4 is the score of the model's own SR (seeded, 4x), recomputed here
    predict = stage_validation.megasr_predictor(stage, steps=2, seed=5)
    module = {STAGE: stage.module}
    psnrs = []
    for name in ("v0.png", "v1.png"):
        lr = read_rgb(setup["val"] / "LR" / name).float()
        hr = read_rgb(setup["val"] / "HR" / name).double()
        sr = predict(lr, module)
        assert sr.shape == (1, 3, 32, 32)
        assert torch.equal(sr, predict(lr, module))  # seeded
        sr8 = torch.round(sr.double() * 255) / 255
        psnrs.append(compute_metrics(["psnr"], sr8, hr).values["psnr"][0])
        bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        assert (sr - bicubic).abs().mean() > 1e-3  # the diffusion output, not the hint passed through
    assert recorder.logged[-1][1]["val/psnr"] == pytest.approx(float(np.mean(psnrs)), abs=1e-6)

    # the best step's checkpoint is kept beside the newest (keep_last=1 pruned the other)
    (newest,) = list_checkpoints(run)
    assert load_checkpoint(newest)["step"] == 4
    best_step, best_val = best_of([(s, v["val/psnr"]) for s, v in recorder.logged], higher_is_better=True)
    kept = json.loads((run / "best" / "best.json").read_text())
    assert kept["step"] == best_step and kept["value"] == pytest.approx(best_val) and kept["metric"] == "psnr"
    (best_ckpt,) = (run / "best").glob("step-*")
    assert load_checkpoint(best_ckpt)["step"] == best_step


def test_tensorboard_opt_in_writes_events_or_says_what_is_missing(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="validation.log_with.*tensorboard"):
            stage_validation.TRACKERS["tensorboard"]("validation", tmp_path / "logs")
        return
    tracker = stage_validation.TRACKERS["tensorboard"]("validation", tmp_path / "logs")
    tracker.log({"val/psnr": 20.5}, step=2)
    tracker.finish()
    (events,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    assert b"val/psnr" in events.read_bytes()  # the scalar's tag is in the event file
