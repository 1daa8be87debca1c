"""Validation of the MegaSR stage (config section ``validation``; off unless ``validation.every > 0``).

:func:`megasr_validation_hook` is the one call :mod:`training.stage_megasr` makes: it returns the ``on_step``
callback of :func:`training.loop.run_training` (or None when validation is off). The upscaler is
:func:`megasr_predictor`: the model being trained samples the SR of a held-out LR image the way the nodes feed
it -- the bicubic-upscaled LR at 4x as the ControlNet hint, the DAGE guidance of the LR resized to the output
size, the fixed prompt ``megasr.prompt`` -- with a DDIM schedule of ``validation.steps`` steps from the run's
noise schedule, epsilon prediction, no classifier-free guidance, seed ``validation.seed`` for every image (so
the steps compare like with like), then the frozen VAE decodes it. The scoring, grid, logging and best
checkpoint are :class:`training.validation.Validator`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .guidance import maps_to_output_size
from .validation import Predict, ValidationConfig, Validator

logger = logging.getLogger(__name__)

#: ``validation.log_with`` -> how its tracker is made (``run_name``, ``logging_dir``); tests swap in a recorder
TRACKERS: dict[str, Callable[[str, Path], Any]] = {}


def _tensorboard(run_name: str, logging_dir: Path) -> Any:
    try:
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(run_name, str(logging_dir))
        if hasattr(tracker, "start"):  # newer accelerate opens the writer in start(), older in __init__
            tracker.start()
        return tracker
    except ImportError as exc:  # neither tensorboard nor tensorboardX is installed
        raise UsageError(
            "validation.log_with", f"tensorboard needs the tensorboard package (pip install tensorboard): {exc}"
        ) from None


TRACKERS["tensorboard"] = _tensorboard


def megasr_predictor(stage: Any, steps: int, seed: int, module_key: str = "megasr") -> Predict:
    """``predict(lr [1, 3, h, w] in 0..1, modules) -> sr [1, 3, 4h, 4w]`` for a :class:`MegaSRStage`."""
    from diffusers import DDIMScheduler

    scale = int(stage.cfg.degradation.scale)
    sched = DDIMScheduler.from_config(stage.base.scheduler.config)

    @torch.no_grad()
    def predict(lr: torch.Tensor, modules: Mapping[str, nn.Module]) -> torch.Tensor:
        module = modules[module_key]
        dev, dt = stage.device, stage.weight_dtype
        lr = lr.to(dev, torch.float32)
        h, w = lr.shape[-2] * scale, lr.shape[-1] * scale
        ph, pw = -(-h // 8) * 8, -(-w // 8) * 8  # the latent grid: the output padded to a multiple of 8
        with torch.autocast(device_type=dev.type, enabled=False):
            hint = F.interpolate(lr, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
            hint = F.pad(hint, (0, pw - w, 0, ph - h), mode="replicate")
            guidance = stage.guidance(lr)
            g = maps_to_output_size(guidance, (ph, pw))
            if "clip" in guidance:
                g["clip"] = guidance["clip"]
            g = {k: v.to(dev, dt) for k, v in g.items()}
            text = stage.prompts([stage.mcfg.prompt]).to(dev, dt)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            channels = int(stage.base.vae.config.latent_channels)
            latents = torch.randn((1, channels, ph // 8, pw // 8), generator=gen).to(dev) * sched.init_noise_sigma
            sched.set_timesteps(steps, device=dev)
            for t in sched.timesteps:
                eps = module(latents.to(dt), t.reshape(1).to(dev), text, hint.to(dt), **g)
                latents = sched.step(eps.float(), t, latents).prev_sample
            image = stage.base.vae.decode((latents / stage.scaling).to(dt)).sample.float()
        return ((image + 1.0) / 2.0).clamp(0, 1)[..., :h, :w].cpu()

    return predict


def megasr_validation_hook(cfg: Any, run_dir: Path, stage: Any, accelerator: Any) -> Callable | None:
    """The ``on_step`` callback validating the MegaSR stage (None when ``validation.every`` is 0)."""
    v = cfg.validation
    if v.every <= 0:
        return None
    folders = [Path(f) for f in v.metric_folders]
    if not folders and cfg.models_dir:
        folders = [Path(cfg.models_dir) / "megasr" / "metrics"]
    vcfg = ValidationConfig(
        folder=Path(v.folder),
        every=v.every,
        metrics=tuple(v.metrics),
        best_metric=v.best_metric,
        max_images=v.max_images,
        metric_folders=tuple(folders),
        crop=v.crop_border,
        size_rule=v.size_rule,
    )
    from megasr.evaluate import EvalError

    try:
        vcfg.check(cfg.train.checkpoint_every)
        validator = Validator(vcfg, run_dir, predict=None)  # reads the held-out images first: a bad folder fails fast
    except (ValueError, OSError, EvalError) as exc:  # no such folder, no images, an interval that misses checkpoints
        raise UsageError("validation.folder" if isinstance(exc, EvalError) else "validation", str(exc)) from None
    validator.predict = megasr_predictor(stage, v.steps, v.seed)
    trackers = []
    if v.log_with and accelerator.is_main_process:
        trackers.append(TRACKERS[v.log_with]("validation", run_dir / "logs"))
    logger.info(
        "validation every %d steps on %d image(s) of %s: %s (best by %s)",
        v.every,
        len(validator.items),
        v.folder,
        ", ".join(v.metrics),
        v.best_metric,
    )
    return validator.hook(accelerator, trackers)
