"""Validation during training: every N optimizer steps, a fixed held-out set of LR images (with HR partners when
the folder has them) is upscaled by the model being trained, scored with the pack's metrics
(``megasr/metrics``), written as one fixed image grid, logged to the run log and to ``accelerate``'s trackers
(TensorBoard when the run opted in with ``log_with``), and the checkpoint of the best step by a chosen metric is
kept in ``<run>/best`` beside the newest ones (``<run>/checkpoints``, which prunes old steps).

The stage supplies ``predict(lr [B, 3, h, w] in 0..1, modules) -> sr [B, 3, H, W]`` (its sampling code); the loop
calls the hook returned by ``Validator.hook`` after each step (``run_training(on_step=...)``). Validation runs
only at steps that are also checkpoint steps, so the best step always has a checkpoint to keep.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from megasr.evaluate import discover, read_rgb
from megasr.metrics import METRICS, MetricOptions, compute_metrics

logger = logging.getLogger(__name__)

Predict = Callable[[torch.Tensor, Mapping[str, nn.Module]], torch.Tensor]


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    """The best-checkpoint rule: a finite value strictly better than the best so far (ties keep the earlier
    step; NaN/inf is never best)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def best_of(sequence: Sequence[tuple[int, float]], higher_is_better: bool) -> tuple[int, float] | None:
    """(step, value) that ``is_better`` keeps after seeing ``sequence`` in order."""
    best: tuple[int, float] | None = None
    for step, value in sequence:
        if is_better(value, None if best is None else best[1], higher_is_better):
            best = (step, value)
    return best


@dataclass
class ValidationConfig:
    folder: Path
    every: int = 1000
    metrics: tuple[str, ...] = ("psnr", "ssim")
    best_metric: str = "psnr"
    max_images: int = 8
    metric_folders: tuple[Path, ...] = ()
    crop: int = 0
    size_rule: str = "crop"

    def check(self, checkpoint_every: int) -> None:
        if self.every < 1 or self.every % checkpoint_every:
            raise ValueError(
                f"validation every {self.every} steps must be a multiple of checkpoint_every ({checkpoint_every}) "
                "so that the best step has a checkpoint"
            )
        unknown = [m for m in (*self.metrics, self.best_metric) if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown validation metric(s) {unknown} (known: {', '.join(METRICS)})")
        if self.best_metric not in self.metrics:
            raise ValueError(f"best_metric '{self.best_metric}' must be one of the validation metrics {self.metrics}")


@dataclass
class Validator:
    config: ValidationConfig
    run_dir: Path
    predict: Predict
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        tset = discover(self.config.folder)
        self.items = tset.items[: self.config.max_images]  # fixed: sorted names, the first N
        self.lr = [read_rgb(it.lr).float() for it in self.items]
        self.hr = [read_rgb(it.hr).float() if it.hr is not None else None for it in self.items]
        self.best_file = self.run_dir / "best" / "best.json"
        self.best: dict | None = json.loads(self.best_file.read_text()) if self.best_file.is_file() else None

    def validate(self, step: int, modules: Mapping[str, nn.Module]) -> dict[str, float]:
        """Scores at ``step`` (mean over the held-out images) and the grid ``<run>/validation/step_N.png``."""
        opts = MetricOptions(crop=self.config.crop, size_rule=self.config.size_rule)
        per: dict[str, list[float]] = {}
        tiles = []
        with torch.no_grad():
            for lr, hr in zip(self.lr, self.hr, strict=True):
                sr = self.predict(lr, modules).detach().float().cpu().clamp(0, 1)
                sr = torch.round(sr * 255) / 255  # scored as the eval command scores a saved file
                res = compute_metrics(
                    self.config.metrics,
                    sr.double(),
                    None if hr is None else hr.double(),
                    self.config.metric_folders,
                    opts,
                )
                for k, v in res.values.items():
                    per.setdefault(k, []).extend(v)
                tiles.append(sr[0])
        scores = {k: float(np.mean(v)) for k, v in per.items()}
        self._write_grid(step, tiles)
        self.history.append((step, scores))
        return scores

    def _write_grid(self, step: int, tiles: list[torch.Tensor]) -> None:
        h = max(t.shape[1] for t in tiles)
        w = sum(t.shape[2] for t in tiles)
        grid = torch.zeros(3, h, w)
        x = 0
        for t in tiles:
            grid[:, : t.shape[1], x : x + t.shape[2]] = t
            x += t.shape[2]
        out = self.run_dir / "validation" / f"step_{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy()).save(out)

    def keep_if_best(self, step: int, scores: Mapping[str, float], checkpoint: Path | None) -> bool:
        name = self.config.best_metric
        value = scores.get(name)
        best = None if self.best is None else self.best["value"]
        if value is None or checkpoint is None or not is_better(value, best, METRICS[name].higher_is_better):
            return False
        dest = self.run_dir / "best"
        tmp = self.run_dir / f".best-{uuid.uuid4().hex[:8]}"
        shutil.copytree(checkpoint, tmp / checkpoint.name)
        self.best = {
            "metric": name,
            "value": value,
            "step": step,
            "checkpoint": checkpoint.name,
            "scores": dict(scores),
        }
        (tmp / "best.json").write_text(json.dumps(self.best, indent=1))
        old = self.run_dir / f".best-old-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            dest.replace(old)
        tmp.replace(dest)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("validation: new best %s %.6g at step %d (kept in %s)", name, value, step, dest)
        return True

    def hook(  # noqa: ANN001
        self, accelerator, trackers: Sequence = ()
    ) -> Callable[[int, Mapping[str, nn.Module], Path | None], None]:
        """The ``on_step`` callback for ``run_training``: validates (main process) every ``every`` steps; the
        scores go to the run log, to the accelerator's trackers and to ``trackers`` (accelerate trackers made
        for validation alone, e.g. TensorBoard when the run opted in)."""

        def on_step(step: int, modules: Mapping[str, nn.Module], checkpoint: Path | None) -> None:
            if step % self.config.every:
                return
            if accelerator.is_main_process:
                for m in modules.values():
                    m.eval()
                scores = self.validate(step, modules)
                for m in modules.values():
                    m.train()
                logger.info("validation step %d: %s", step, " ".join(f"{k}={v:.6g}" for k, v in scores.items()))
                values = {f"val/{k}": v for k, v in scores.items()}
                accelerator.log(values, step=step)
                for tracker in trackers:
                    tracker.log(values, step=step)
                self.keep_if_best(step, scores, checkpoint)
            accelerator.wait_for_everyone()

        return on_step
