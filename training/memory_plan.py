"""The training memory plan of the megasr stage, made before the first step (issue 27, "One GPU").

Weights, gradients and optimiser states are counted from the modules. Activations -- what autograd keeps for
the backward pass -- are counted by running the step's forward once on *fake* tensors (``FakeTensorMode``):
the same code at the configured batch, crop and precision, no memory allocated and no arithmetic done, every
tensor saved for backward recorded by its storage. The peak of a step is then the weights and the optimiser's
moments, the gradients, and the larger of the saved activations (backward) and the optimiser step's temporaries
(:data:`ADAM_STEP_COPIES`).

``--gpu-memory 24GB`` (``train.gpu_memory``) refuses a run whose plan does not fit, with the numbers and the
cheaper settings that would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UsageError

__all__ = ["MemoryPlan", "check_fits", "parse_size", "plan_megasr", "saved_activation_bytes"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}


def parse_size(text: str) -> int:
    """``"24GB"`` / ``"24 GiB"`` / ``"12g"`` / ``"512MB"`` -> bytes (binary units, as GPU memory is quoted)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)i?b?\s*", str(text).lower())
    if not m:
        raise UsageError("train.gpu_memory", f"'{text}' is not a size", example="--gpu-memory 24GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MB"


@dataclass
class MemoryPlan:
    """Bytes of each part of a training step's peak."""

    trainable_params: int
    weights: int  # trainable (fp32 master) + frozen (in their dtype)
    gradients: int
    optimizer: int  # the Adam moments, kept between steps
    step_temporaries: int  # made and freed by the optimiser step
    activations: int
    batch: int
    crop: int
    precision: str
    ema: int = 0  # the fp32 EMA shadow of the trained weights (train.ema_decay)
    optimizer_name: str = "adam"
    gradient_checkpointing: bool = False

    @property
    def peak(self) -> int:
        """Weights and moments, plus the larger of backward (activations + gradients, an upper bound: the
        activations are freed as the gradients are made) and the optimiser step (gradients + its temporaries)."""
        return self.weights + self.optimizer + self.ema + self.gradients + max(self.activations, self.step_temporaries)

    def describe(self) -> str:
        eight = self.optimizer_name == "adamw8bit"
        ckpt = ", gradient checkpointing" if self.gradient_checkpointing else ""
        rows = [
            ("weights", self.weights, f"{self.trainable_params:,} trained (fp32) + the frozen parts"),
            ("gradients", self.gradients, "fp32, one per trained parameter"),
            (
                "optimiser",
                self.optimizer,
                "AdamW8bit: two 8-bit moments per trained parameter"
                if eight
                else f"{self.optimizer_name}: two fp32 moments per trained parameter",
            ),
            (
                "step temps",
                self.step_temporaries,
                "AdamW8bit's fused step: none"
                if eight
                else "Adam's multi-tensor step: 3 fp32 copies of the trained weights",
            ),
            ("activations", self.activations, f"batch {self.batch} x {self.crop} px, {self.precision}{ckpt}"),
        ]
        if self.ema:
            rows.insert(3, ("ema", self.ema, "fp32 EMA shadow of the trained weights"))
        lines = [f"  {name:12s} {_gb(n):>10s}  {what}" for name, n, what in rows]
        return "memory plan (per process):\n" + "\n".join(lines) + f"\n  {'peak':12s} {_gb(self.peak):>10s}"


def saved_activation_bytes(fn: Any, exclude: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward when ``fn()`` runs (``fn`` builds its own inputs inside
    the fake mode it is called in); storages of ``exclude`` (the parameters) and repeats are not counted.

    Gradient checkpointing (``torch.utils.checkpoint.checkpoint``, which the checkpointed blocks look up when
    they run) is counted as it behaves: a checkpointed block keeps only its inputs (for the recompute), and the
    backward pass holds one block's recomputed activations at a time -- the largest block's are added.
    """
    from unittest import mock

    import torch.utils.checkpoint
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    real = {t.untyped_storage().data_ptr() for t in exclude}
    shapes = {tuple(t.shape) for t in exclude if t.dim() >= 2} | {tuple(t.shape)[::-1] for t in exclude if t.dim() >= 2}
    skip: set[int] = set()
    saved: dict[int, int] = {}
    regions: list[dict[int, int]] = []  # the checkpointed blocks being run (innermost last)
    largest_region = [0]

    def record(t: torch.Tensor, into: dict[int, int]) -> None:
        # a weight: the real parameter, its fake twin (memoised, or a trainable leaf converted on the fly)
        if isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad):
            return
        storage = t.untyped_storage()
        if storage._cdata in skip or (not isinstance(t, FakeTensor) and storage.data_ptr() in real):
            return
        if isinstance(t, FakeTensor) and tuple(t.shape) in shapes and storage.nbytes() == t.numel() * t.element_size():
            return  # a weight's converted twin or its transpose (activations carry the batch dimension)
        into[storage._cdata] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t, regions[-1] if regions else saved)
        return t

    def counted_checkpoint(function: Any, *args: Any, use_reentrant: bool | None = None, **kwargs: Any) -> Any:
        for a in args:
            if isinstance(a, torch.Tensor):
                record(a, saved)  # kept by the checkpoint for its recompute
        regions.append({})
        try:
            return function(*args, **kwargs)
        finally:
            region = regions.pop()
            largest_region[0] = max(largest_region[0], sum(n for k, n in region.items() if k not in saved))

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, mock.patch.object(torch.utils.checkpoint, "checkpoint", counted_checkpoint):
        # a real weight meeting a fake tensor is converted (memoised): its fake twin is a weight too
        skip |= {mode.from_tensor(t).untyped_storage()._cdata for t in exclude}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    return sum(saved.values()) + largest_region[0]


#: fp32 copies of the trained weights torch's multi-tensor Adam makes during ``step()`` (measured on the CPU with
#: scripts/tools/tensor_memory.py, torch 2.x: the step creates 3 x the trained fp32 bytes on top of the gradients)
ADAM_STEP_COPIES = 3
#: bytes of optimiser state per trained parameter: Adam's two fp32 moments; bitsandbytes' AdamW8bit keeps them
#: in 8 bits (its per-block scales, 2 x 4 bytes per 2048 values, are left out)
ADAM_MOMENT_BYTES = 8
#: RAM/DAPE representation tokens per image (Swin-L at 384 px: 12 x 12 patches + the class token)
RAM_TOKENS = 145
#: the frozen guidance models of a full-size run that :func:`plan_full_size` does not build (bf16 weights, an
#: allowance): CLIP ViT-H/14 (632M parameters), RAM Swin-L (~450M), Mask2Former, Depth-Anything-V2-Small, HED
FULL_SIZE_EXTRACTORS_BYTES = 3 * 2**30
ADAM8BIT_MOMENT_BYTES = 2


def _bytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def plan_megasr(
    stage: Any, batch: int, crop: int, autocast_dtype: torch.dtype | None = None, step_inputs: Any = None
) -> MemoryPlan:
    """The memory plan of one megasr step of ``stage`` (a :class:`training.stage_megasr.MegaSRStage`) at
    ``batch`` HR crops of ``crop`` px, the trained module under autocast to ``autocast_dtype`` (None: none).
    ``step_inputs``: the stage's ``StepInputs`` class (passed in: the stage module imports this one)."""
    StepInputs = step_inputs or type(stage).step_inputs_class
    module: nn.Module = stage.module
    trained = [p for p in module.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trained)
    frozen = [stage.base.unet, stage.base.vae, stage.base.text_encoder, *stage.guidance.models.values()]
    frozen_params = [p for m in frozen for p in m.parameters()]
    every = [*module.parameters(), *frozen_params]
    unet = stage.base.unet
    ctx_dim = int(unet.config.cross_attention_dim)
    clip_dim = stage.guidance.clip_dim
    latent = crop // 8
    dt = stage.weight_dtype
    device = stage.device

    def step() -> None:
        z = torch.zeros(batch, int(unet.config.in_channels), latent, latent, device=device)
        g: dict[str, torch.Tensor] = {}
        for kind, channels in (("hed", 1), ("depth", 1), ("seg", 3)):
            if kind in stage.guidance.models:
                g[kind] = torch.zeros(batch, channels, crop, crop, device=device)
        if clip_dim:
            g["clip"] = torch.zeros(batch, 257, clip_dim, device=device)
            g["clip_keep"] = torch.ones(batch, device=device)
        width = int(getattr(stage.model.config, "representation_dim", 0) or 0)
        inputs = StepInputs(
            latents=z,
            hint=torch.zeros(batch, 3, crop, crop, device=device),
            text=torch.zeros(batch, 77, ctx_dim, device=device),
            guidance=g,
            representation=torch.zeros(batch, RAM_TOKENS, width, device=device) if width else None,
        )
        t = torch.zeros(batch, dtype=torch.long, device=device)
        if autocast_dtype is None:  # (the meta device of plan_full_size has no autocast at all)
            stage.loss(module, inputs, torch.zeros_like(z), t)
            return
        with torch.autocast(device.type, dtype=autocast_dtype):
            stage.loss(module, inputs, torch.zeros_like(z), t)

    activations = saved_activation_bytes(step, every)
    precision = str(autocast_dtype).removeprefix("torch.") if autocast_dtype is not None else str(dt)[6:]
    train = stage.cfg.train
    eight = train.optimizer == "adamw8bit"
    return MemoryPlan(
        trainable_params=n_train,
        weights=_bytes(module.parameters()) + _bytes(frozen_params),
        gradients=n_train * 4,
        optimizer=n_train * (ADAM8BIT_MOMENT_BYTES if eight else ADAM_MOMENT_BYTES),
        step_temporaries=0 if eight else n_train * 4 * ADAM_STEP_COPIES,
        activations=activations,
        batch=batch,
        crop=crop,
        precision=precision,
        ema=n_train * 4 if train.ema_decay else 0,
        optimizer_name=train.optimizer,
        gradient_checkpointing=bool(train.gradient_checkpointing),
    )


def check_fits(plan: MemoryPlan, limit: int, grad_accum: int) -> None:
    """Refuse (exit 2) a plan whose peak exceeds ``limit`` bytes, naming the numbers and cheaper settings."""
    if plan.peak <= limit:
        return
    per_sample = plan.activations / max(plan.batch, 1)
    fixed = plan.weights + plan.optimizer + plan.ema + plan.gradients
    fits = int((limit - fixed) // per_sample) if limit - fixed >= plan.step_temporaries else 0
    options = []
    if fits >= 1:
        accum = -(-plan.batch * grad_accum // fits)
        options.append(
            f"train.batch_size={fits} with train.grad_accum={accum} (the same {plan.batch * grad_accum} "
            "samples per optimizer step)"
        )
    else:
        options.append(
            f"the weights, gradients and optimiser alone need {_gb(fixed + plan.step_temporaries)}: a larger device"
        )
    if plan.precision in ("float32",):
        options.append("train.mixed_precision=bf16 (activations about half)")
    if not plan.gradient_checkpointing:
        options.append("train.gradient_checkpointing=true (activations recomputed in backward)")
    if plan.optimizer_name != "adamw8bit":
        options.append("train.optimizer=adamw8bit on a CUDA GPU with bitsandbytes (moments 2 bytes a parameter)")
    if plan.ema:
        options.append("train.ema_decay unset (no EMA copy)")
    raise UsageError(
        "--gpu-memory",
        f"the run needs about {_gb(plan.peak)} per process but the device has {_gb(limit)}\n"
        + plan.describe()
        + "\ncheaper: "
        + "; ".join(options),
    )
