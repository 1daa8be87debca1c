"""A generic, resumable training loop around ``accelerate.Accelerator``.

Every stage (DAGE fine-tuning, MegaSR) plugs into :func:`run_training` with

- ``modules``: the ``nn.Module``s whose state is trained and checkpointed (wrapped for DDP by accelerate);
- ``optimizer`` (and optionally ``scheduler``), built on those modules' parameters;
- ``batches(start, rank, world_size)``: an iterable of micro-batches starting at micro-batch ``start`` for
  this rank (e.g. :func:`training.data.make_hr_loader`), so a resumed run sees the same data;
- ``step_fn(batch, ctx) -> loss``: computes the loss of one micro-batch. It must call the modules through
  ``ctx.modules`` (the DDP-wrapped ones, so gradients are all-reduced) and draw randomness from
  ``ctx.generator``, seeded by (seed, step, micro-batch, rank): a resumed run repeats it exactly.

The loop does gradient accumulation, mixed precision, optional gradient clipping, tqdm progress on the main
process, loss logging, an atomic checkpoint every ``checkpoint_every`` steps, at the end, and when the
process receives SIGINT / SIGTERM (at the next step boundary, on every rank), and resume from the newest
checkpoint (modules, optimizer, scheduler, grad scaler, global RNG states, step).

One process: ``python -m training ...``. Several: ``torchrun --nproc_per_node N -m training ...`` or
``accelerate launch ...`` on GPUs; on CPU-only machines ``torchrun`` with ``Accelerator(cpu=True)`` (gloo)
-- ``accelerate launch --cpu --num_processes 2`` starts only one process.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import capture_rng_states, latest_checkpoint, load_checkpoint, restore_rng_states, save_checkpoint

__all__ = [
    "LoopConfig",
    "LoopResult",
    "StepContext",
    "clear_stop_signal",
    "make_accelerator",
    "run_training",
    "step_seed",
    "stop_signal",
]

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class LoopConfig:
    """How the loop runs (not what it trains)."""

    max_steps: int
    grad_accum: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    max_grad_norm: float | None = None
    cpu: bool | None = None  # None: CPU when no CUDA device is present
    ema_decay: float | None = None  # > 0: an fp32 EMA of the trained weights (training.ema), checkpointed

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.grad_accum < 1 or self.checkpoint_every < 1 or self.keep_last < 1:
            raise ValueError("max_steps >= 0, grad_accum >= 1, checkpoint_every >= 1, keep_last >= 1 required")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got '{self.mixed_precision}'")


@dataclass
class StepContext:
    """What ``step_fn`` gets beside the batch."""

    step: int  # the optimizer step being computed (0-based)
    micro: int  # micro-batch within the accumulation window
    generator: torch.Generator  # on ``device``, seeded by (seed, step, micro, rank)
    modules: dict[str, nn.Module]  # prepared (possibly DDP-wrapped) modules: call these
    accelerator: Accelerator
    device: torch.device


@dataclass
class LoopResult:
    """What a call of :func:`run_training` did."""

    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, mean over micro-batches and ranks
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    interrupted: bool = False
    signal: int | None = None  # what stopped it (SIGTERM when another rank was signalled)
    ema: dict[str, Any] | None = None  # module name -> its training.ema.EmaShadow (train.ema_decay on)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, micro, rank)."""
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def make_accelerator(config: LoopConfig) -> Accelerator:
    """An ``Accelerator`` for ``config``: CPU when no CUDA (fp16 then falls back to full precision)."""
    cpu = (not torch.cuda.is_available()) if config.cpu is None else config.cpu
    mp = config.mixed_precision
    if cpu and mp == "fp16":
        logger.warning("mixed_precision fp16 needs a GPU; running in full precision on the CPU")
        mp = "no"
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=config.grad_accum)


#: The signal that stopped this process's last training run (a signal stops the whole process: the CLI exits
#: with 128 + it once the run has saved, so ``megasr-train all && next-step`` does not carry on).
_STOPPED_BY: list[int | None] = [None]


def stop_signal() -> int | None:
    """The signal (SIGINT / SIGTERM) that stopped a training run in this process since the last clear."""
    return _STOPPED_BY[0]


def clear_stop_signal() -> None:
    _STOPPED_BY[0] = None


class _StopFlag:
    """Set by SIGINT / SIGTERM; the loop stops at the next step boundary after a checkpoint."""

    def __init__(self) -> None:
        self.set = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:  # second signal: give up at once
            raise KeyboardInterrupt
        logger.warning("signal %d: saving a checkpoint at the end of this step, then stopping", signum)
        self.set = True
        self.signum = int(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _module_state(module: nn.Module, trainable_only: bool) -> dict[str, Any]:
    state = module.state_dict()
    if not trainable_only:
        return state
    keep = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in keep}


def _load_module_state(module: nn.Module, state: Mapping[str, Any], trainable_only: bool, where: str) -> None:
    if not trainable_only:
        module.load_state_dict(state)
        return
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - trainable)
    if missing or unexpected:
        raise KeyError(f"{where}: trainable tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    module.load_state_dict(state, strict=False)


def run_training(
    *,
    run_dir: str | Path,
    config: LoopConfig,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[Any, StepContext], torch.Tensor],
    batches: Callable[[int, int, int], Iterable[Any]],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    resume: bool = False,
    extra_state: Mapping[str, Any] | None = None,
    accelerator: Accelerator | None = None,
    trainable_only: bool = False,
    on_step: Callable[[int, dict[str, nn.Module], Path | None], None] | None = None,
) -> LoopResult:
    """Train ``modules`` until ``config.max_steps`` optimizer steps, checkpointing into ``run_dir``.

    With ``resume`` the newest checkpoint of ``run_dir`` (if any) is loaded first and training continues at its
    step with its optimizer, scheduler and RNG states. ``extra_state`` (e.g. the run config) is saved with
    every checkpoint under ``"extra"``. With ``trainable_only`` checkpoints hold only the parameters that
    require gradients (LoRA runs: the frozen base is rebuilt from its own weights, not copied every time).
    ``on_step(step, unwrapped modules, checkpoint saved at this step or None)`` runs after each step (on every
    process; e.g. ``training.validation.Validator.hook``).
    """
    run_dir = Path(run_dir)
    acc = accelerator if accelerator is not None else make_accelerator(config)
    names = list(modules)
    prepared = acc.prepare(*[modules[n] for n in names], optimizer)
    if not isinstance(prepared, (tuple, list)):
        prepared = (prepared,)
    wrapped = dict(zip(names, prepared[: len(names)], strict=True))
    opt = prepared[len(names)]
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]

    start_step = 0
    resumed_from: Path | None = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            logger.info("no checkpoint in %s: starting from step 0", run_dir)
        else:
            state = load_checkpoint(ckpt, map_location="cpu")
            for name in names:
                if name not in state["modules"]:
                    raise KeyError(f"checkpoint {ckpt} has no state for module '{name}'")
                where = f"checkpoint {ckpt}, module '{name}'"
                _load_module_state(acc.unwrap_model(wrapped[name]), state["modules"][name], trainable_only, where)
            opt.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            if acc.scaler is not None and state.get("scaler") is not None:
                acc.scaler.load_state_dict(state["scaler"])
            restore_rng_states(state["rng"])
            start_step = int(state["step"])
            resumed_from = ckpt
            logger.info("resumed from %s at step %d", ckpt, start_step)

    ema = None
    if config.ema_decay:  # made from the (resumed) weights; a checkpoint's own EMA replaces it exactly
        from .ema import EmaShadow

        ema = {n: EmaShadow(acc.unwrap_model(wrapped[n]), config.ema_decay) for n in names}
        if resumed_from is not None:
            if state.get("ema"):
                for name in names:
                    ema[name].load_state_dict(state["ema"][name], f"checkpoint {resumed_from}, EMA of '{name}'")
            else:
                logger.warning("checkpoint %s has no EMA: the EMA starts from its weights", resumed_from)

    def save(step: int) -> Path | None:
        path = None
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "modules": {n: _module_state(acc.unwrap_model(m), trainable_only) for n, m in wrapped.items()},
                "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": capture_rng_states(),
                "loop": asdict(config),
                "extra": dict(extra_state or {}),
                "world_size": acc.num_processes,
                "ema": {n: e.state_dict() for n, e in ema.items()} if ema is not None else None,
            }
            path = save_checkpoint(run_dir, step, state, keep_last=config.keep_last)
        acc.wait_for_everyone()
        return path

    result = LoopResult(start_step=start_step, step=start_step, resumed_from=resumed_from, ema=ema)
    if start_step >= config.max_steps:
        logger.info("already at step %d >= max_steps %d: nothing to do", start_step, config.max_steps)
        return result

    for m in wrapped.values():
        m.train()
    data: Iterator[Any] = iter(batches(start_step * config.grad_accum, acc.process_index, acc.num_processes))
    device = acc.device
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not acc.is_local_main_process,
        dynamic_ncols=True,
    )
    last_saved: Path | None = None
    step = start_step
    with _StopFlag() as stop:
        while step < config.max_steps:
            micro_losses = []
            for micro in range(config.grad_accum):
                try:
                    batch = next(data)
                except StopIteration as exc:
                    raise RuntimeError(f"batches ran out at step {step}, micro-batch {micro}") from exc
                gen = torch.Generator(device=device).manual_seed(step_seed(config.seed, step, micro, acc.process_index))
                ctx = StepContext(step, micro, gen, wrapped, acc, device)
                with acc.accumulate(*wrapped.values()):
                    with acc.autocast():
                        loss = step_fn(batch, ctx)
                    if not torch.isfinite(loss.detach()).all():
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}, micro-batch {micro}")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if config.max_grad_norm is not None:
                            acc.clip_grad_norm_(params, config.max_grad_norm)
                        opt.step()
                        if scheduler is not None and not acc.optimizer_step_was_skipped:
                            scheduler.step()
                        if ema is not None and not acc.optimizer_step_was_skipped:
                            for n in names:
                                ema[n].update(acc.unwrap_model(wrapped[n]))
                        opt.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach().float())
            step += 1
            mean_loss = torch.stack(micro_losses).mean()
            mean_loss = acc.reduce(mean_loss.to(device), reduction="mean") if acc.num_processes > 1 else mean_loss
            result.losses.append(float(mean_loss))
            bar.update(1)
            if step % config.log_every == 0 or step == config.max_steps:
                lr = opt.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{result.losses[-1]:.4g}", lr=f"{lr:.3g}")
                logger.info("step %d loss %.6g lr %.3g", step, result.losses[-1], lr)
            stop_now = stop.set
            if acc.num_processes > 1:
                flag = torch.tensor([1.0 if stop.set else 0.0], device=device)
                stop_now = bool(acc.reduce(flag, reduction="sum").item() > 0)
            saved_now = None
            if step % config.checkpoint_every == 0 or step == config.max_steps or stop_now:
                last_saved = saved_now = save(step)
            if on_step is not None and not stop_now:
                on_step(step, {n: acc.unwrap_model(m) for n, m in wrapped.items()}, saved_now)
            if stop_now:
                result.interrupted = True
                result.signal = stop.signum or int(signal.SIGTERM)
                _STOPPED_BY[0] = result.signal
                break
    bar.close()
    result.step = step
    result.checkpoint = last_saved
    return result
