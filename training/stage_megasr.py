"""MegaSR training (Eq. 4): ``python -m training megasr --config FILE``.

Frozen: the SD-2-base U-Net, its VAE and text encoder (from a local diffusers folder with ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` -- or single files: :mod:`training.base_models`) and the fine-tuned DAGE
extractors. Trained: the :class:`megasr.model.MegaSRModel` -- the ControlNet (SD encoder copy, LR condition
encoder, zero convs), the CISM² connector, per-block projections and gates, and MS-GAM.

One step (per micro-batch, every random draw from the loop's per-step generator, so a resumed run repeats it):

1. HR crops -> Real-ESRGAN second-order degradation on the device (:class:`training.data.DegradedBatch`);
2. the bicubic-upscaled LR at HR size (0..1) is the ControlNet hint -- what the MegaSR nodes feed it;
3. the HR crop (``megasr.target``) is VAE-encoded (``latents * scaling_factor``), noised at a uniform random
   timestep of the SD-2 DDPM schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon);
4. guidance from the LR image, exactly as the nodes compute it: CLIP penultimate tokens (DAGE CLIP LoRA,
   ``clip_crop`` = the CLIP node's crop option), HED / depth / segmentation maps by the DAGE extractors at
   ``dage_resolution``, encoded as the map IMAGEs the nodes pass on (HED/depth mean channel, depth normalised
   per image, segmentation in the ADE20K palette) and resized to the output size (bilinear; nearest for seg),
   optionally cached on disk (``guidance_cache``, keyed by the LR pixels -- a pure function of the HR crop
   and the step's degradation seed -- and the extractor files; it hits only when those repeat) --
   :mod:`training.guidance`;
5. text: per image the tags in ``<image>.txt`` beside it (when ``captions``), else the tags of the HR crop by the
   teacher tagger (``megasr.tags``, :mod:`training.tagging`), else ``prompt``; replaced by the empty prompt with
   probability ``train.text_dropout`` (0.5, SeeSR's; MegaSR states none; dropped images are not tagged), through the frozen tokenizer +
   text encoder (:mod:`training.prompts`);
6. modality dropout (MMSR, rate 0.1 by default as there): per sample and independently, each map is replaced by
   its null map (zeros) with probability ``megasr.<kind>_dropout`` and the image semantics are dropped (CISM²
   adds no term) with ``megasr.clip_dropout``. The nodes feed exactly these null inputs for an absent map or a strength of 0,
   so every subset of guidance the user may leave out is in distribution;
7. ``loss = MSE(eps_pred, eps)`` with :func:`megasr.model.megasr_noise_prediction`.

The stage's input checks are :func:`training.preflight.megasr_input_problems` (one pass). Optimisation,
mixed precision, gradient accumulation, checkpoints and resume are :mod:`training.loop`'s. A warm start from a
SeeSR checkpoint folder (``init.seesr_dir``) is :mod:`training.seesr`'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megasr.dage.kinds import TRAINED_KINDS

from .base_models import load_base_models
from .checkpoint import STATE_FILE, decode_tree, latest_checkpoint
from .config import RunConfig, config_to_dict
from .data import DegradedBatch
from .degradations import DegradationPipeline
from .ema import ema_weights
from .errors import SeeSRError, UsageError
from .export import megasr_provenance
from .guidance import GuidanceExtractor, apply_modality_dropout, cache_note, maps_to_output_size, modality_keep
from .loop import LoopResult, StepContext, run_training
from .preflight import check_megasr_inputs
from .prompts import PromptEncoder, captions_for
from .ram_guidance import RamGuidance
from .runs import (
    build_adam,
    build_hr_dataset,
    degradation_generator,
    hr_batches,
    loop_config,
    open_run_dir,
    warmup_scheduler,
)
from .seesr import warm_start_from_seesr
from .stage_validation import megasr_validation_hook
from .tagging import build_teacher_tagger

__all__ = [
    "MegaSRStage",
    "MegaSRTrainModule",
    "StepInputs",
    "build_megasr_model",
    "run_megasr",
    "train_megasr",
]

logger = logging.getLogger(__name__)

STAGE = "megasr"
EXPORT_NAME = "megasr_controlnet.safetensors"

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- model


class MegaSRTrainModule(nn.Module):
    """The trained :class:`MegaSRModel` (its only child) calling the frozen U-Net it is attached to.

    The U-Net is held outside the module tree: it is neither checkpointed, nor broadcast or all-reduced by DDP,
    nor moved by ``accelerate``. ``forward`` is the full MegaSR epsilon prediction, so DDP syncs every
    gradient of the MegaSR model.
    """

    def __init__(self, model: nn.Module, unet: nn.Module, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet

        self.model = model
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_adapter", attach_megasr_to_diffusers_unet(unet, model))
        self.set_gradient_checkpointing(gradient_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """``train.gradient_checkpointing``: recompute the blocks of the ControlNet *and* of the frozen U-Net
        during backward (the loss's gradient flows back through the U-Net's decoder into the ControlNet
        residuals and the MegaSR extensions on the U-Net's blocks, so its activations are kept otherwise).
        Only while this module trains; validation and inference run the blocks plainly."""
        self.model.set_gradient_checkpointing(enabled)
        if enabled:
            func = self._adapter.checkpoint_function(lambda: self.model.training)
            self._unet.enable_gradient_checkpointing(gradient_checkpointing_func=func)
        else:
            self._unet.disable_gradient_checkpointing()

    @property
    def unet(self) -> nn.Module:
        return self._unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        hint: torch.Tensor,
        clip: torch.Tensor | None = None,
        hed: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        seg: torch.Tensor | None = None,
        clip_keep: torch.Tensor | None = None,
        representation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from megasr.model import megasr_noise_prediction

        ctx = self.model.prepare_context(
            tuple(sample.shape[-2:]),
            clip,
            hed,
            depth,
            seg,
            image_keep=clip_keep,
            image_attention=self._adapter.image_attention,
            representation_tokens=representation,
        )
        return megasr_noise_prediction(self._unet, self._adapter, self.model, sample, timestep, text, hint, ctx)


def controlnet_from_unet(controlnet: nn.Module, unet: nn.Module) -> int:
    """Copy the U-Net encoder into the ControlNet (as ``ControlNetModel.from_unet``); zero convs stay zero.

    Returns the number of tensors copied.
    """
    prefixes = ("conv_in.", "time_proj.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.")
    prefixes += ("mid_block.",)
    cn_state = controlnet.state_dict()
    take = {
        k: v
        for k, v in unet.state_dict().items()
        if k.startswith(prefixes) and k in cn_state and tuple(cn_state[k].shape) == tuple(v.shape)
    }
    controlnet.load_state_dict(take, strict=False)
    return len(take)


def build_megasr_model(cfg: RunConfig, unet: nn.Module, clip_dim: int | None) -> nn.Module:
    """A fresh :class:`MegaSRModel` for ``unet``: ControlNet = the U-Net's encoder copy, new parts zero-init."""
    from megasr.model import MegaSRConfig, MegaSRModel

    overrides = dict(cfg.megasr.model)
    if clip_dim is not None:
        if "clip_dim" in overrides and int(overrides["clip_dim"]) != clip_dim:
            raise UsageError(
                "megasr.model.clip_dim",
                f"is {overrides['clip_dim']} but the DAGE CLIP extractor gives {clip_dim}-d tokens",
            )
        overrides["clip_dim"] = clip_dim
    overrides.pop("unet", None)
    try:
        mconfig = MegaSRConfig(unet=dict(unet.config), **overrides)
    except TypeError as exc:
        raise UsageError("megasr.model", str(exc)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = MegaSRModel(mconfig)
        except ValueError as exc:  # e.g. an unknown connector kind
            raise UsageError("megasr.model", str(exc)) from None
    n = controlnet_from_unet(model.controlnet, unet)
    logger.info("megasr: ControlNet initialised from the U-Net encoder (%d tensors)", n)
    return model


# ----------------------------------------------------------------------------------------------- the stage


@dataclass
class StepInputs:
    """Everything of one micro-batch except the noise: made without gradients."""

    latents: torch.Tensor  # [B, 4, H/8, W/8], scaled
    hint: torch.Tensor  # [B, 3, H, W] in 0..1
    text: torch.Tensor  # [B, 77, context]
    guidance: dict[str, torch.Tensor]  # clip tokens, hed/depth/seg at the output size
    representation: torch.Tensor | None = None  # RAM/DAPE tokens of the LR [B, N, 512] (SeeSR's branch)


class MegaSRStage:
    """The frozen parts, the trained module and the per-step computation of a MegaSR run."""

    step_inputs_class = StepInputs

    def __init__(self, cfg: RunConfig, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> None:
        from megasr.model import MegaSRModel

        self.cfg = cfg
        self.mcfg = cfg.megasr
        check_megasr_inputs(cfg)
        self.device = device
        self.weight_dtype = weight_dtype
        base = load_base_models(self.mcfg, cfg.models_dir)
        self.seesr_report = None
        self.base = base
        self.guidance = GuidanceExtractor(self.mcfg, device, weight_dtype)
        if self.guidance.cache_dir is not None:
            lr_side = cfg.data.crop_size // cfg.degradation.scale
            note = cache_note(self.mcfg, cfg.train, (lr_side, lr_side), self.guidance.clip_dim, self.guidance.kinds)
            (logger.info if cfg.train.overfit_batches else logger.warning)(note)
        model: MegaSRModel = build_megasr_model(cfg, base.unet, self.guidance.clip_dim)
        if cfg.init.seesr_dir:
            try:
                unet = base.unet if cfg.init.seesr_unet else None
                self.seesr_report = warm_start_from_seesr(model, cfg.init.seesr_dir, unet=unet)
            except SeeSRError as exc:
                raise UsageError("init.seesr_dir", str(exc)) from None
        for part in (base.unet, base.vae, base.text_encoder):
            part.to(device) if weight_dtype == torch.float32 else part.to(device=device, dtype=weight_dtype)
        self.module = MegaSRTrainModule(model, base.unet, cfg.train.gradient_checkpointing)
        self.prompts = PromptEncoder(base.tokenizer, base.text_encoder, device)
        self.ram = RamGuidance(self.mcfg, device) if self.mcfg.ram else None
        self.tagger = None
        if self.mcfg.tags.enabled and self.ram is None:  # RAM's tags replace the zero-shot teacher
            self.tagger = build_teacher_tagger(
                self.mcfg, base.tokenizer, device, weight_dtype, self.guidance.models.get("clip")
            )
        self.last_prompts: list[str] = []
        self.pipeline = DegradationPipeline(cfg.degradation)
        self.scaling = float(getattr(base.vae.config, "scaling_factor", 0.18215))
        sched = base.scheduler
        self.num_timesteps = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("megasr: %s trainable parameters; guidance: %s", f"{n_train:,}", ", ".join(self.guidance.kinds))

    @property
    def model(self) -> nn.Module:
        return self.module.model

    @torch.no_grad()
    def make_inputs(self, hr: torch.Tensor, paths: Sequence[str], generator: torch.Generator) -> StepInputs:
        """Degrade, encode, extract guidance and text for a batch of HR crops [B, 3, H, W].

        Outside autocast: the degradation runs in float32, the frozen parts in their own dtype.
        """
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self._make_inputs(hr, paths, generator)

    def _make_inputs(self, hr: torch.Tensor, paths: Sequence[str], generator: torch.Generator) -> StepInputs:
        b = DegradedBatch.build(hr, self.pipeline, generator, device=self.device)
        target = b.hr if self.mcfg.target == "hr" else b.hr_usm
        dist = self.base.vae.encode((target * 2.0 - 1.0).to(self.weight_dtype)).latent_dist
        latents = dist.sample(generator=generator).float() * self.scaling
        sidecar = captions_for(paths, None, self.mcfg.captions)
        drop = torch.rand(len(paths), generator=generator, device=generator.device) < self.cfg.train.text_dropout
        prompts = self._prompts(b.hr, sidecar, drop.tolist())
        self.last_prompts = prompts
        text = self.prompts(prompts)
        guidance = self.guidance(b.lr)
        maps = maps_to_output_size(guidance, tuple(b.hr.shape[-2:]))
        if "clip" in guidance:
            maps["clip"] = guidance["clip"]
        keep = modality_keep(len(prompts), self.mcfg, generator)
        representation = None
        if self.ram is not None and self.model.config.representation_dim:
            representation = self.ram.tokens(b.lr)
        return StepInputs(
            latents=latents,
            hint=b.lr_up,
            text=text,
            guidance=apply_modality_dropout(maps, keep),
            representation=representation,
        )

    def _prompts(self, hr: torch.Tensor, sidecar: Sequence[str | None], drop: Sequence[bool]) -> list[str]:
        """Per image: "" when dropped, else its sidecar tags, else the tags of its HR crop (RAM's with
        ``megasr.ram``, else the zero-shot teacher's), else ``megasr.prompt``. Only the images that need it are
        tagged."""
        out = ["" if d else (s if s is not None else self.mcfg.prompt) for s, d in zip(sidecar, drop, strict=True)]
        need = [i for i, (s, d) in enumerate(zip(sidecar, drop, strict=True)) if s is None and not d]
        if self.ram is not None:
            for i, text in self.ram.prompts(hr, need).items():
                if text:
                    out[i] = text
        elif self.tagger is not None and need:
            for i, tags in zip(need, self.tagger(hr[need]), strict=True):
                if tags:
                    out[i] = ", ".join(tags)
        return out

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Epsilon and uniform timesteps for ``latents``."""
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        t = torch.randint(0, self.num_timesteps, (latents.shape[0],), generator=generator, device=generator.device)
        return noise, t.to(latents.device)

    def loss(self, module: nn.Module, inputs: StepInputs, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Eq. 4: ``|| eps - eps_theta(z_t, t, text, LR, guidance) ||^2``."""
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * inputs.latents + (1.0 - a).sqrt() * noise
        dt = self.weight_dtype
        g = {k: v.to(dt) for k, v in inputs.guidance.items()}
        if inputs.representation is not None:
            g["representation"] = inputs.representation.to(dt)
        pred = module(noisy.to(dt), timesteps, inputs.text.to(dt), inputs.hint.to(dt), **g)
        return F.mse_loss(pred.float(), noise.float())

    def step_fn(self, batch: dict[str, Any], ctx: StepContext) -> torch.Tensor:
        # ctx.generator; with train.overfit_batches one fixed per cycled batch: the same degradation, latent
        # sample, text dropout, noise and timesteps every time the batch comes round
        gen = degradation_generator(ctx, self.cfg)
        inputs = self.make_inputs(batch["hr"], batch["path"], gen)
        noise, t = self.draw_noise(inputs.latents, gen)
        return self.loss(ctx.modules[STAGE], inputs, noise, t)


def make_megasr_accelerator(cfg: RunConfig, find_unused: bool) -> Any:
    """``Accelerator`` as :func:`training.loop.make_accelerator`, with DDP told whether some parameters go unused
    (a guidance input without an extractor leaves its MS-GAM / CISM² weights out of the graph)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    lcfg = loop_config(cfg)
    cpu = not torch.cuda.is_available()
    mp = lcfg.mixed_precision
    if cpu and mp == "fp16":
        logger.warning("mixed_precision fp16 needs a GPU; running in full precision on the CPU")
        mp = "no"
    kwargs = DistributedDataParallelKwargs(find_unused_parameters=find_unused)
    return Accelerator(
        cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=lcfg.grad_accum, kwargs_handlers=[kwargs]
    )


def _frozen_dtype(acc: Any) -> torch.dtype:
    """Frozen parts in the mixed-precision dtype on a GPU (as diffusers' ControlNet training), else float32."""
    mp = str(acc.mixed_precision)
    return _DTYPES.get(mp, torch.float32) if acc.device.type == "cuda" else torch.float32


def _memory_plan(cfg: RunConfig, stage: MegaSRStage, acc: Any) -> None:
    """Log the step's memory plan before the first step; with ``train.gpu_memory`` refuse one that does not fit."""
    from .memory_plan import check_fits, parse_size, plan_megasr

    autocast = _DTYPES.get(str(acc.mixed_precision)) if acc.device.type == "cuda" else None
    try:
        plan = plan_megasr(stage, cfg.train.batch_size, cfg.data.crop_size, autocast, StepInputs)
    except Exception as exc:  # noqa: BLE001 - the plan is advice; a trace it cannot make must not stop training
        if cfg.train.gpu_memory:
            raise UsageError("--gpu-memory", f"no memory plan could be made ({exc})") from None
        logger.warning("megasr: no memory plan (%s)", " ".join(str(exc).split())[:200])
        return
    logger.info("megasr: %s", plan.describe())
    if cfg.train.gpu_memory:
        check_fits(plan, parse_size(cfg.train.gpu_memory), cfg.train.grad_accum)


def _check_resumable(run_dir: Path) -> dict[str, Any] | None:
    """Refuse to resume a run of another stage (its checkpoint would not fit): one line, not a traceback."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        extra = decode_tree(meta["state"].get("extra", {}), {})
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise UsageError("--resume", f"checkpoint {ckpt} is unreadable ({exc})") from None
    stage = extra.get("stage") if isinstance(extra, dict) else None
    if stage != STAGE:
        raise UsageError("--resume", f"'{run_dir}' holds a '{stage}' run, not megasr; choose another --output")
    return extra


def train_megasr(cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> tuple[LoopResult, Path | None, MegaSRStage]:
    """Train MegaSR into ``run_dir``; returns the loop result, the exported weight file (main process) and the stage."""
    from megasr.model_io import save_megasr_model

    dataset = build_hr_dataset(cfg)
    previous = _check_resumable(run_dir) if resume else None
    mcfg = cfg.megasr
    all_guidance = all(getattr(mcfg, k.config_section) for k in TRAINED_KINDS)
    acc = make_megasr_accelerator(cfg, find_unused=not all_guidance)
    stage = MegaSRStage(cfg, acc.device, _frozen_dtype(acc))
    _memory_plan(cfg, stage, acc)
    if previous is not None and previous.get("megasr_config") is not None:
        old = json.loads(json.dumps(previous["megasr_config"]))
        new = json.loads(json.dumps(stage.model.config.to_dict()))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise UsageError(
                "--resume",
                f"the run's model was built with other settings ({', '.join(changed)}); resume with its config",
            )
    optimizer = build_adam(stage.module.parameters(), cfg)
    scheduler = warmup_scheduler(optimizer, cfg.train.lr_warmup_steps)
    extra = {
        "stage": STAGE,
        "config": config_to_dict(cfg),
        "megasr_config": stage.model.config.to_dict(),
        "seesr": stage.seesr_report.summary() if stage.seesr_report is not None else None,
    }
    result = run_training(
        run_dir=run_dir,
        config=loop_config(cfg),
        modules={STAGE: stage.module},
        optimizer=optimizer,
        scheduler=scheduler,
        step_fn=stage.step_fn,
        batches=hr_batches(dataset, cfg),
        resume=resume,
        extra_state=extra,
        accelerator=acc,
        on_step=megasr_validation_hook(cfg, run_dir, stage, acc),
    )
    export = None
    if acc.is_main_process:
        export = run_dir / "export" / EXPORT_NAME
        model = acc.unwrap_model(stage.module).model
        ckpt = result.checkpoint or latest_checkpoint(run_dir)
        prov = megasr_provenance(extra["config"], result.step, run_dir, ckpt, extra["seesr"])
        ema = (result.ema or {}).get(STAGE)
        if ema is None:
            save_megasr_model(str(export), model, prov, overwrite=True)
            logger.info("megasr: exported the trained weights (no EMA) to %s", export)
        else:  # the EMA weights go into the file; the module keeps its raw weights
            raw = {k: v.detach().clone() for k, v in stage.module.state_dict().items()}
            stage.module.load_state_dict(ema_weights(raw, ema.state_dict()))
            try:
                save_megasr_model(str(export), model, {**prov, "ema_decay": ema.decay}, overwrite=True)
            finally:
                stage.module.load_state_dict(raw)
            logger.info("megasr: exported the EMA weights (decay %g) to %s", ema.decay, export)
    acc.wait_for_everyone()
    return result, export, stage


def run_megasr(cfg: RunConfig, args: Any) -> str | None:
    """CLI entry (``python -m training megasr``); returns the summary line (None off the main process)."""
    # bad input: exit 2 before a run folder is made (the CLI's preflight ran check_megasr_inputs already)
    build_hr_dataset(cfg, "--input" if getattr(args, "input", None) else "data.hr_dirs")
    run_dir = open_run_dir(
        Path(args.output) if args.output else Path(cfg.output_dir) / STAGE,
        cfg,
        STAGE,
        resume=bool(args.resume),
        overwrite=bool(args.overwrite),
    )
    result, export, _ = train_megasr(cfg, run_dir, resume=bool(args.resume))
    if export is None:
        return None
    last = f"{result.losses[-1]:.5g}" if result.losses else "n/a"
    where = f"; weights {export}" if export is not None else ""
    return f"megasr: step {result.step} (from {result.start_step}), last loss {last}, run {run_dir}{where}"
