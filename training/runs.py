"""Scaffolding shared by the training stages: run folders, the HR data stream, the optimizer."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, config_to_dict
from .data import HRImageFolder, StepBatchSampler, collate_hr, make_hr_loader
from .errors import UsageError
from .loop import LoopConfig, StepContext, step_seed

__all__ = [
    "build_adam",
    "check_optimizer",
    "check_output_dir",
    "run_in_use",
    "degradation_generator",
    "build_hr_dataset",
    "hr_batches",
    "loop_config",
    "open_run_dir",
    "prepare_output_dir",
    "warmup_scheduler",
]

logger = logging.getLogger(__name__)


def check_output_dir(path: Path, *, overwrite: bool, resume: bool | None = None, option: str = "--output") -> str:
    """What :func:`prepare_output_dir` would do -- ``"create"``, ``"keep"`` or ``"wipe"`` -- without doing it.

    Raises :class:`UsageError` for a non-empty folder without ``overwrite`` / ``resume``. ``resume=None``: the
    caller has no resume (the hint then only offers ``--overwrite``). Free of side effects, so every process
    of a multi-process run can check before the main one acts.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(option, f"'{path}' exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if resume:
            return "keep"
        if resume is not None and not run_in_use(path):
            return "keep"  # a run that never checkpointed a step (it failed early): nothing to lose
        if not overwrite:
            hint = (
                "pass --force (--overwrite) to replace it"
                if resume is None
                else "pass --resume to continue it or --force"
            )
            raise UsageError(option, f"'{path}' already exists and is not empty; {hint}")
        return "wipe"
    return "create"


#: What a training stage writes into its run folder before its first checkpoint.
RUN_FILES = {"run_config.json", "train.log", "checkpoints", "export"}


def run_in_use(path: Path) -> bool:
    """A run folder is in use once a step is checkpointed (or it holds anything a run does not write)."""
    from .checkpoint import latest_checkpoint

    path = Path(path)
    if any(p.name not in RUN_FILES for p in path.iterdir()):
        return True
    if (path / "export").is_dir() and any((path / "export").iterdir()):
        return True
    return latest_checkpoint(path) is not None


def prepare_output_dir(path: Path, *, overwrite: bool, resume: bool | None = None, option: str = "--output") -> Path:
    """Create ``path``; refuse a non-empty one unless ``overwrite`` (emptied first) or ``resume`` (kept)."""
    path = Path(path)
    if check_output_dir(path, overwrite=overwrite, resume=resume, option=option) == "wipe":
        for child in path.iterdir():  # the run's own log (open while we run) stays
            if child.name == "train.log":
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_run_dir(path: Path, cfg: RunConfig, stage: str, *, resume: bool, overwrite: bool) -> Path:
    """The run folder of a training stage, with the resolved config written to ``run_config.json``.

    Under several processes every rank checks, the main process wipes/creates/writes, the others wait.
    """
    from accelerate import PartialState

    path = Path(path)
    check_output_dir(path, overwrite=overwrite, resume=resume)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        prepare_output_dir(path, overwrite=overwrite, resume=resume)
        record = {"stage": stage, "config": config_to_dict(cfg)}
        (path / "run_config.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    state.wait_for_everyone()
    return path


def build_hr_dataset(cfg: RunConfig, option: str = "data.hr_dirs") -> HRImageFolder:
    """The HR image folder dataset of ``cfg``; bad folders are a :class:`UsageError` naming ``option``."""
    if not cfg.data.hr_dirs:
        raise UsageError(option, "no HR image folder given (set data.hr_dirs in the config or pass --input DIR)")
    try:
        return HRImageFolder(
            cfg.data.hr_dirs,
            crop_size=cfg.data.crop_size,
            seed=cfg.seed,
            hflip=cfg.data.hflip,
            vflip=cfg.data.vflip,
            rot90=cfg.data.rot90,
            small_images=cfg.data.small_images,
            check_files=cfg.data.check_files,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(option, str(exc)) from None


def hr_batches(dataset: HRImageFolder, cfg: RunConfig) -> Callable[[int, int, int], Iterable[Any]]:
    """``batches(start, rank, world)`` for :func:`training.loop.run_training`: resumable HR batches.

    With ``train.overfit_batches = N > 0`` the stream cycles over the first N micro-batches.
    """

    def batches(start: int, rank: int, world: int) -> Iterable[Any]:
        n = cfg.train.overfit_batches
        if n > 0:
            sampler = StepBatchSampler(len(dataset), cfg.train.batch_size, cfg.seed, rank, world)
            fixed = [collate_hr([dataset[key] for key in sampler.batch(k)]) for k in range(n)]
            return (fixed[k % n] for k in itertools.count(start))
        return make_hr_loader(
            dataset,
            cfg.train.batch_size,
            seed=cfg.seed,
            rank=rank,
            world_size=world,
            start=start,
            num_workers=cfg.data.num_workers,
        )

    return batches


def degradation_generator(ctx: StepContext, cfg: RunConfig) -> torch.Generator:
    """The generator for a micro-batch's degradation: ``ctx.generator``, or, when overfitting N batches, one
    seeded by the micro-batch's place in the cycle (so a repeated batch is degraded identically)."""
    n = cfg.train.overfit_batches
    if n <= 0:
        return ctx.generator
    k = (ctx.step * cfg.train.grad_accum + ctx.micro) % n
    rank = ctx.accelerator.process_index
    return torch.Generator(device=ctx.device).manual_seed(step_seed(cfg.seed, k, 0, rank))


def loop_config(cfg: RunConfig, ema: bool = True) -> LoopConfig:
    """The loop settings of a run config; ``ema=False``: no EMA whatever ``train.ema_decay`` says (the DAGE
    stages export their raw weights)."""
    t = cfg.train
    return LoopConfig(
        max_steps=t.max_steps,
        grad_accum=t.grad_accum,
        mixed_precision=t.mixed_precision,
        checkpoint_every=t.checkpoint_every,
        keep_last=t.keep_last,
        log_every=t.log_every,
        seed=cfg.seed,
        max_grad_norm=t.max_grad_norm,
        ema_decay=(t.ema_decay or None) if ema else None,
    )


def build_adam(params: Iterable[torch.nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    """The run's optimiser (``train.optimizer``) with its lr, betas, eps and weight decay: Adam (the paper's,
    lr 2.5e-5), AdamW, or bitsandbytes' AdamW8bit (:func:`check_optimizer` refuses it where it cannot run)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires gradients")
    t = cfg.train
    kwargs = {"lr": t.lr, "betas": t.adam_betas, "eps": t.adam_eps, "weight_decay": t.weight_decay}
    if t.optimizer == "adamw8bit":
        check_optimizer(cfg)
        import bitsandbytes as bnb  # noqa: PLC0415 - optional, CUDA only

        return bnb.optim.AdamW8bit(params, **kwargs)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    return torch.optim.Adam(params, **kwargs)


def check_optimizer(cfg: RunConfig, cuda: bool | None = None) -> None:
    """Refuse ``train.optimizer=adamw8bit`` where it cannot run (bitsandbytes missing, or no CUDA GPU), in one
    message, before anything trains. ``cuda``: whether the run has a CUDA device (default: one is present)."""
    if cfg.train.optimizer != "adamw8bit":
        return
    import importlib.util

    has_cuda = torch.cuda.is_available() if cuda is None else cuda
    missing = importlib.util.find_spec("bitsandbytes") is None
    if missing or not has_cuda:
        why = []
        if missing:
            why.append("the bitsandbytes library is not installed (pip install bitsandbytes)")
        if not has_cuda:
            why.append("it needs a CUDA GPU and this run has none")
        raise UsageError(
            "train.optimizer",
            "adamw8bit (bitsandbytes' 8-bit AdamW) cannot run here: "
            + "; ".join(why)
            + ". Use train.optimizer=adam (the default) or install bitsandbytes on a CUDA machine",
            example="train.optimizer=adam",
        )


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Linear warm-up to the base lr over ``warmup_steps`` (``None`` when 0: constant lr, as in the paper)."""
    if warmup_steps <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(warmup_steps))


class _Warmup:
    """Picklable lr factor (LambdaLR keeps callable objects' ``__dict__`` in its state dict)."""

    def __init__(self, steps: int) -> None:
        self.steps = int(steps)

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)
