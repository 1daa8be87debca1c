"""DAGE fine-tuning (MegaSR Eq. 3, 5, 6): an LR student learns to give what a frozen HR teacher gives.

For each kind (``hed``, ``depth``, ``seg``, ``clip``) the student starts as a copy of the pretrained
extractor; every step a batch of HR crops is degraded on the training device (Real-ESRGAN second order),
the frozen teacher sees the HR crop, the student the raw LR image -- exactly the tensor the DAGE nodes hand it
at inference (each extractor resizes its input to its working size itself, so the student's backbone sees what
it will see in ComfyUI; :func:`student_input`) -- and the loss is
``L1(intermediate representations) + output_weight * output loss`` (:func:`megasr.dage.dage_loss`: L1 on the
HED edge maps, SILog for depth, L1 between the segmentation class distributions (Eq. 5), L1 on CLIP tokens; the
CLIP intermediate term summed over its layers as Eq. 6 writes it). HED and segmentation are
fully fine-tuned; depth and CLIP train LoRA r=8 adapters only (``peft``), and their checkpoints hold only
the LoRA tensors. At the end the student is exported as the node weight file of its component.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megasr.dage.kinds import BY_KIND, TRAINED_KINDS

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import DageConfig, RunConfig, config_to_dict
from .data import DegradedBatch, HRImageFolder
from .degradations import DegradationPipeline
from .errors import UsageError
from .loop import LoopResult, StepContext, make_accelerator, run_training
from .runs import build_adam, build_hr_dataset, degradation_generator, hr_batches, loop_config, warmup_scheduler

__all__ = ["DAGE_KINDS", "build_extractor", "export_dage", "student_input", "train_dage"]

logger = logging.getLogger(__name__)

#: kind -> (config section, weight-file component, trains LoRA only): a view of :mod:`megasr.dage.kinds`
DAGE_KINDS: dict[str, tuple[str, str, bool]] = {k.kind: (k.config_section, k.component, k.lora) for k in TRAINED_KINDS}


def _section(cfg: RunConfig, kind: str) -> DageConfig:
    return getattr(cfg, DAGE_KINDS[kind][0])


def build_extractor(kind: str, dcfg: DageConfig, seed: int = 0) -> nn.Module:
    """The pretrained extractor of ``kind`` (the student's starting point and the teacher).

    Randomly initialised from ``seed`` when ``dcfg.base`` is not set (tests; a warning says so).
    """
    from megasr.dage import extractor_class
    from megasr.errors import WeightFileError

    section = DAGE_KINDS[kind][0]
    cls = extractor_class(kind)
    ext: dict[str, Any] = dict(dcfg.extractor)
    torch.manual_seed(seed)
    try:
        if dcfg.base is None:
            logger.warning("%s: no base weights (%s.base): starting from a RANDOM %s extractor", section, section, kind)
            return cls.from_config(ext)
        if not Path(dcfg.base).exists():
            raise UsageError(f"{section}.base", f"'{dcfg.base}' does not exist")
        if kind == "hed":
            model = cls.from_config(ext)
            model.load_original(dcfg.base)
            return model
        if kind == "depth":
            kwargs = {"resolution": ext["resolution"]} if "resolution" in ext else {}
            return cls.from_base(dcfg.base, ext.get("depth_anything"), ext.get("lora"), **kwargs)
        if kind == "seg":
            kwargs = {"resolution": ext["resolution"]} if "resolution" in ext else {}
            return cls.from_base(dcfg.base, ext.get("mask2former"), **kwargs)
        return cls.from_base(dcfg.base, ext.get("clip"), ext.get("lora"))
    except UsageError:
        raise
    except (WeightFileError, KeyError, TypeError, ValueError) as exc:
        option = f"{section}.base" if isinstance(exc, WeightFileError) else f"{section}.extractor"
        raise UsageError(option, " ".join(str(exc).split())[:400]) from None
    except Exception as exc:  # noqa: BLE001 - a refused pickle, a file of another format: one line, no traceback
        from .failures import explain

        known = explain(exc)
        text = known[0] if known else "not a weight file this stage can read (safetensors or a plain-tensor .pth)"
        raise UsageError(f"{section}.base", f"'{dcfg.base}': {text}") from None


def student_input(batch: DegradedBatch) -> torch.Tensor:
    """What the student is fine-tuned on: the LR image at its own size, as the DAGE nodes feed it.

    Not the bicubic ``lr_up``: at inference the extractor resizes the raw LR (bilinear, to its working size), and
    a student trained on bicubic input would see 33% less high-frequency energy than it was trained on. The
    teacher's HR crop has the same aspect ratio, so both reach the same working size (the feature and raw-output
    terms line up pixel for pixel)."""
    return batch.lr


def _provenance(kind: str, cfg: RunConfig, step: int, run_dir: Path) -> dict[str, Any]:
    dcfg = _section(cfg, kind)
    return {
        "stage": BY_KIND[kind].stage,
        "step": step,
        "run_dir": str(run_dir),
        "base": dcfg.base,
        "seed": cfg.seed,
        "loss": f"L1(features) + {dcfg.output_weight} * output loss",
        "degradation": config_to_dict(cfg)["degradation"],
        "train": config_to_dict(cfg)["train"],
    }


def train_dage(
    kind: str, cfg: RunConfig, run_dir: Path, *, resume: bool = False, dataset: HRImageFolder | None = None
) -> tuple[LoopResult, Path | None]:
    """Fine-tune the ``kind`` extractor; returns the loop result and the exported weight file (main process)."""
    from megasr.dage import dage_loss

    if kind not in DAGE_KINDS:
        raise ValueError(f"unknown DAGE kind '{kind}' (one of {', '.join(DAGE_KINDS)})")
    section, component, lora_only = DAGE_KINDS[kind]
    dcfg = _section(cfg, kind)
    dataset = dataset if dataset is not None else build_hr_dataset(cfg)
    student = build_extractor(kind, dcfg, cfg.seed)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if not lora_only:
        student.requires_grad_(True)
        # Mask2Former reads the Swin stage outputs, never the backbone's final LayerNorm: it gets no gradient,
        # which DDP refuses ("Expected to have finished reduction"), so it stays frozen.
        for name, p in student.named_parameters():
            if ".encoder.swin.layernorm." in name:
                p.requires_grad_(False)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    logger.info("%s: %d trainable parameters (%s)", BY_KIND[kind].stage, n_train, "LoRA" if lora_only else "full")

    lcfg = loop_config(cfg, ema=False)  # train.ema_decay is the megasr stage's
    acc = make_accelerator(lcfg)
    teacher.to(acc.device)
    optimizer = build_adam(student.parameters(), cfg)
    scheduler = warmup_scheduler(optimizer, cfg.train.lr_warmup_steps)
    pipeline = DegradationPipeline(cfg.degradation)

    def step_fn(batch: dict[str, Any], ctx: StepContext) -> torch.Tensor:
        b = DegradedBatch.build(batch["hr"], pipeline, degradation_generator(ctx, cfg), device=ctx.device)
        with torch.no_grad():
            target = teacher(b.hr if dcfg.teacher_input == "hr" else b.hr_usm)
        out = ctx.modules["student"](student_input(b))
        return dage_loss(kind, out, target, dcfg.output_weight)["loss"]

    result = run_training(
        run_dir=run_dir,
        config=lcfg,
        modules={"student": student},
        optimizer=optimizer,
        scheduler=scheduler,
        step_fn=step_fn,
        batches=hr_batches(dataset, cfg),
        resume=resume,
        extra_state={"stage": BY_KIND[kind].stage, "config": config_to_dict(cfg)},
        accelerator=acc,
        trainable_only=lora_only,
    )
    export = None
    if acc.is_main_process:
        export = run_dir / "export" / f"{component}.safetensors"
        export.parent.mkdir(parents=True, exist_ok=True)
        model = acc.unwrap_model(student).eval()
        model.save(str(export), provenance=_provenance(kind, cfg, result.step, run_dir), overwrite=True)
    acc.wait_for_everyone()
    return result, export


def export_dage(kind: str, cfg: RunConfig, run_dir: Path, out_path: Path, *, overwrite: bool = False) -> Path:
    """Write the student of the newest checkpoint of ``run_dir`` as the node weight file ``out_path``.

    Refuses to replace an existing file unless ``overwrite``.
    """
    section, component, lora_only = DAGE_KINDS[kind]
    stage_name = BY_KIND[kind].stage
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UsageError("--run", f"'{run_dir}' has no checkpoint of a {stage_name} run")
    if out_path.exists() and not overwrite:
        raise UsageError("--out", f"'{out_path}' already exists; pass --force (--overwrite) to replace it")
    state = load_checkpoint(ckpt)
    stage = state.get("extra", {}).get("stage")
    if stage != stage_name:
        raise UsageError("--run", f"'{run_dir}' holds a '{stage}' run, not {stage_name}")
    student = build_extractor(kind, _section(cfg, kind), cfg.seed)
    weights = state["modules"]["student"]
    if lora_only:
        missing = {n for n, p in student.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise UsageError("--run", f"checkpoint {ckpt} lacks LoRA tensors {sorted(missing)[:3]}")
        student.load_state_dict(weights, strict=False)
    else:
        student.load_state_dict(weights)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    student.eval().save(str(out_path), provenance=_provenance(kind, cfg, int(state["step"]), run_dir), overwrite=True)
    logger.info("exported %s (%s, step %d) to %s", component, section, state["step"], out_path)
    return out_path
