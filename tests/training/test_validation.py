"""Validation during training (training/validation.py + the loop's ``on_step`` hook) on a tiny real run.

Catches: a best-checkpoint rule that takes the last value, a tie, NaN or the wrong direction (LPIPS is lower-is-
better); validation at the wrong interval; scores that never reach the run log or accelerate's trackers; a best
checkpoint lost when the newest ones are pruned.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from PIL import Image
from torch import nn

from training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from training.loop import LoopConfig, run_training
from training.validation import ValidationConfig, Validator, best_of, is_better


def test_best_choice_rule_on_a_hand_made_sequence() -> None:
    psnr = [(100, 20.0), (200, 21.5), (300, 21.5), (400, math.nan), (500, 21.0), (600, math.inf)]
    assert best_of(psnr, higher_is_better=True) == (200, 21.5)  # tie keeps the earlier, NaN/inf never best
    lpips = [(1, 0.30), (2, 0.25), (3, 0.26), (4, 0.25), (5, -math.inf)]
    assert best_of(lpips, higher_is_better=False) == (2, 0.25)
    assert is_better(0.1, None, False) and not is_better(math.nan, None, True)


class _Recorder(GeneralTracker):
    name = "recorder"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def tracker(self):  # noqa: ANN201
        return self

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, dict(values)))


def _folder(root: Path) -> Path:
    ds = root / "val"
    (ds / "LR").mkdir(parents=True)
    (ds / "HR").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        hr = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32)))
        Image.fromarray(hr).save(ds / "HR" / f"v{i}.png")
        Image.fromarray(hr).resize((8, 8), Image.BICUBIC).save(ds / "LR" / f"v{i}.png")
    return ds


def test_validation_in_a_tiny_run(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 3, padding=1)
    nn.init.normal_(model.weight, std=0.2)  # start far from identity, so scores move

    def predict(lr: torch.Tensor, modules) -> torch.Tensor:  # noqa: ANN001
        return modules["sr"](F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False))

    ds = _folder(tmp_path)
    hr = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255
            for p in sorted((ds / "HR").iterdir())
        ]
    )
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", align_corners=False)

    def step_fn(batch, ctx) -> torch.Tensor:  # noqa: ANN001
        return F.mse_loss(predict(batch[0], ctx.modules), batch[1])

    run = tmp_path / "run"
    cfg = LoopConfig(max_steps=6, checkpoint_every=2, keep_last=1, log_every=1, cpu=True)
    val_cfg = ValidationConfig(folder=ds, every=2, metrics=("psnr", "ssim"), best_metric="psnr")
    val_cfg.check(cfg.checkpoint_every)
    with pytest.raises(ValueError, match="multiple of checkpoint_every"):
        ValidationConfig(folder=ds, every=3).check(2)
    recorder = _Recorder()
    acc = Accelerator(cpu=True, log_with=[recorder])
    acc.init_trackers("megasr-test")
    validator = Validator(val_cfg, run, predict)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with caplog.at_level(logging.INFO):
        run_training(
            run_dir=run,
            config=cfg,
            modules={"sr": model},
            optimizer=opt,
            step_fn=step_fn,
            batches=lambda start, rank, world: iter(lambda: (lr, hr), None),
            accelerator=acc,
            on_step=validator.hook(acc),
        )
    steps = [s for s, _ in validator.history]
    assert steps == [2, 4, 6]
    assert [s for s, _ in recorder.logged] == [2, 4, 6]
    assert all(set(v) == {"val/psnr", "val/ssim"} for _, v in recorder.logged)
    assert sum("validation step" in r.getMessage() and "psnr=" in r.getMessage() for r in caplog.records) == 3
    assert all((run / "validation" / f"step_{s:08d}.png").is_file() for s in steps)
    grid = np.asarray(Image.open(run / "validation" / "step_00000006.png"))
    assert grid.shape == (32, 64, 3)

    psnrs = [(s, v["psnr"]) for s, v in validator.history]
    assert len({round(p, 6) for _, p in psnrs}) == 3  # the scores moved
    best_step, best_val = best_of(psnrs, higher_is_better=True)
    kept = json.loads((run / "best" / "best.json").read_text())
    assert kept["step"] == best_step and kept["value"] == pytest.approx(best_val)
    best_ckpt = next((run / "best").glob("step-*"))
    assert load_checkpoint(best_ckpt)["step"] == best_step


def test_best_checkpoint_survives_pruning_on_a_hand_made_sequence(tmp_path: Path) -> None:
    """Scores 20, 22, 21 (PSNR) then LPIPS-like lower-is-better: the kept checkpoint is step 4's, although
    keep_last=1 has removed it from checkpoints/."""
    ds = _folder(tmp_path)
    run = tmp_path / "run"
    v = Validator(ValidationConfig(folder=ds, every=2), run, lambda lr, m: lr)
    for step, psnr in [(2, 20.0), (4, 22.0), (6, 21.0), (8, math.nan)]:
        ckpt = save_checkpoint(run, step, {"step": step, "w": torch.full((2,), float(step))}, keep_last=1)
        v.keep_if_best(step, {"psnr": psnr}, ckpt)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000008"]
    kept = json.loads((run / "best" / "best.json").read_text())
    assert (kept["step"], kept["value"]) == (4, 22.0)
    assert load_checkpoint(run / "best" / "step-00000004")["step"] == 4
    # a new validator on the same run (a resumed run) knows the best so far
    again = Validator(ValidationConfig(folder=ds, every=2), run, lambda lr, m: lr)
    ckpt = save_checkpoint(run, 10, {"step": 10}, keep_last=1)
    assert not again.keep_if_best(10, {"psnr": 21.9}, ckpt)
    assert again.keep_if_best(12, {"psnr": 22.5}, save_checkpoint(run, 12, {"step": 12}, keep_last=1))
    assert sorted(p.name for p in (run / "best").iterdir()) == ["best.json", "step-00000012"]
