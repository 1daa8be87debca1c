"""The megasr stage's memory plan at full SD-2-base size without any weights (issue 27's 24 GB recipe).

Apart from :mod:`training.memory_plan` because it builds a :class:`training.stage_megasr.MegaSRStage`, which
itself imports the plan (one module each way would be an import circle).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .memory_plan import FULL_SIZE_EXTRACTORS_BYTES, MemoryPlan, plan_megasr

__all__ = ["plan_full_size"]


def plan_full_size(
    cfg: Any,
    frozen_extra_bytes: int = FULL_SIZE_EXTRACTORS_BYTES,
    trace_dtype: torch.dtype = torch.float32,
    seesr_start: bool | None = None,
) -> MemoryPlan:
    """The plan of ``cfg``'s megasr step at full SD-2-base size without any weights: the U-Net, VAE, text encoder
    and the MegaSR model (with ``cfg.megasr.model``) are built on the ``meta`` device and the step traced on fake
    tensors. Frozen weights are counted in the mixed-precision dtype (as a GPU run stores them), the other frozen
    guidance models as ``frozen_extra_bytes``. The activations are traced in float32 (the meta device has no
    autocast): an upper bound of a bf16/fp16 run's. ``trace_dtype=torch.bfloat16`` traces everything in bf16
    instead: about a bf16 run's (autocast keeps some fp32 tensors beside: norms, softmax, the loss).
    ``seesr_start`` (default: ``init.seesr_dir`` is set): the U-Net side of SeeSR's branch is frozen, as the warm
    start leaves it (``megasr.seesr_weights``); a recipe file names no folder, so its plan passes ``True``."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from megasr.model import SD2_BASE_UNET, MegaSRConfig, MegaSRModel

    from .stage_megasr import MegaSRStage, MegaSRTrainModule, StepInputs

    half = {"fp16": 2, "bf16": 2}.get(cfg.train.mixed_precision, 4)
    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SD2_BASE_UNET).requires_grad_(False)
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
        ).requires_grad_(False)
        text = CLIPTextModel(  # SD-2's OpenCLIP ViT-H/14 text tower as diffusers ships it (23 layers)
            CLIPTextConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,
                num_attention_heads=16,
                hidden_act="gelu",
            )
        ).requires_grad_(False)
        overrides = {k: v for k, v in cfg.megasr.model.items() if k != "unet"}
        model = MegaSRModel(MegaSRConfig(unet=dict(SD2_BASE_UNET), **{"clip_dim": 1280, **overrides}))
    if seesr_start is None:
        seesr_start = bool(getattr(getattr(cfg, "init", None), "seesr_dir", None))
    if seesr_start and getattr(model, "unet_representation", None) is not None:
        model.unet_representation.requires_grad_(False)
    module = MegaSRTrainModule(model, unet, bool(cfg.train.gradient_checkpointing))
    stage = MegaSRStage.__new__(MegaSRStage)
    nn.Module.to(module, trace_dtype), nn.Module.to(unet, trace_dtype)  # (diffusers' own .to warns about dtypes)
    stage.cfg, stage.module, stage.device, stage.weight_dtype = cfg, module, meta, trace_dtype
    stage.base = SimpleNamespace(unet=unet, vae=vae, text_encoder=text)
    stage.guidance = SimpleNamespace(
        models={"hed": nn.Identity(), "depth": nn.Identity(), "seg": nn.Identity()}, clip_dim=1280
    )
    stage.alphas_cumprod = torch.ones(1000, device=meta)
    plan = plan_megasr(stage, cfg.train.batch_size, cfg.data.crop_size, None, StepInputs)
    frozen = sum(p.numel() for m in (unet, vae, text) for p in m.parameters())
    plan.weights = plan.trainable_params * 4 + frozen * half + frozen_extra_bytes  # fp32 master + stored dtype
    bound = "an upper bound of" if trace_dtype == torch.float32 else "about"
    plan.precision = f"{str(trace_dtype)[6:]} trace ({bound} a {cfg.train.mixed_precision} run's)"
    return plan
