"""Training-step benchmark of the megasr stage (issue 27; run by hand, not a timed test).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/tools/bench_training_step.py --width 64 --json docs/benchmark/training_step_cpu.json
    .venv/bin/python scripts/tools/bench_training_step.py --device cuda --width 320 --latent 64   # SD-2 size, fp32

One optimiser step (forward, backward, optimiser step; inputs made beforehand, as the VAE/guidance are frozen
and run without gradients in both) of

- ``controlnet``: the anchor, diffusers' ``examples/controlnet/train_controlnet.py`` layout -- a
  ``ControlNetModel.from_unet`` copy of the frozen ``UNet2DConditionModel``, its residuals added to the U-Net's,
  epsilon MSE, AdamW over the ControlNet;
- ``megasr``: the megasr stage's trained computation on the same U-Net (:class:`training.stage_megasr.
  MegaSRTrainModule`: ControlNet + CISM² + MS-GAM with HED/depth/seg maps and CLIP tokens), epsilon MSE, AdamW
  (the stage's Adam at weight decay 0 is the same step);
- the cheap recipes: ``megasr_ckpt`` (``train.gradient_checkpointing``), ``controlnet_ckpt`` (diffusers' own
  checkpointing, for reference) and ``megasr_new_parts`` (the ControlNet's SD encoder copy frozen, only
  CISM², MS-GAM and the connector trained -- a measurement of what that would cost, not a shipped option).

Times are interleaved rounds (``scripts/tools/bench_stats.py``: median of per-round ratios, 95 % interval,
"too noisy" when too wide). Memory is counted exactly (``scripts/tools/tensor_memory.py``): the tensors a
steady-state step creates (activations, gradients, optimiser temporaries) plus the trained weights' optimiser
moments and gradients that persist; the frozen weights are the same in every variant and reported apart.
The U-Net is SD-2-base's layout at a reduced width (``--width``: channels width x (1, 2, 4, 4), one head per
32 channels), random weights; the width is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from bench_stats import interleaved_times, ratio_summary  # noqa: E402
from tensor_memory import TensorMemory  # noqa: E402

logger = logging.getLogger("bench_training_step")


def unet_config(width: int, context: int) -> dict:
    from megasr.model import SD2_BASE_UNET

    cfg = dict(SD2_BASE_UNET)
    channels = [width * m for m in (1, 2, 4, 4)]
    cfg.update(
        block_out_channels=channels,
        attention_head_dim=[max(1, c // 32) for c in channels],  # diffusers' SD-2 naming: heads per level
        cross_attention_dim=context,
        norm_num_groups=min(32, width),
    )
    return cfg


def _bytes(tensors) -> int:  # noqa: ANN001
    return sum(t.numel() * t.element_size() for t in tensors)


class Variant:
    """One training step: ``step()`` runs forward, backward, AdamW step, zero_grad."""

    def __init__(self, name: str, trained: list[torch.nn.Parameter], loss: Callable[[], torch.Tensor]) -> None:
        self.name = name
        self.trained = trained
        self.loss = loss
        self.opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.0)

    def step(self) -> None:
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.trained[0].is_cuda:
            torch.cuda.synchronize()

    def memory(self) -> dict[str, int]:
        self.step()  # the moments exist: steady state
        with TensorMemory() as tm:
            self.loss().backward()
            backward = tm.peak  # activations + gradients (what checkpointing reduces)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        moments = sum(
            _bytes(v for v in s.values() if torch.is_tensor(v) and v.dim() > 0) for s in self.opt.state.values()
        )
        return {
            "trained_params": sum(p.numel() for p in self.trained),
            "backward_peak_bytes": backward,
            "step_peak_bytes": tm.peak,  # activations, gradients, optimiser temporaries made by the step
            "moments_bytes": moments,
            "total_bytes": tm.peak + moments + _bytes(self.trained),  # + the trained fp32 weights
        }


def build(width: int, batch: int, latent: int, seed: int, device: str = "cpu") -> tuple[dict[str, Variant], int]:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from megasr.model import MegaSRConfig, MegaSRModel
    from training.stage_megasr import MegaSRTrainModule, controlnet_from_unet

    torch.manual_seed(seed)
    context, clip_dim = 1024, 1280
    ucfg = unet_config(width, context)
    unet = UNet2DConditionModel(**ucfg).requires_grad_(False).eval().to(device)
    g = torch.Generator().manual_seed(seed)
    px = latent * 8
    z = torch.randn(batch, 4, latent, latent, generator=g)
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, 77, context, generator=g)
    hint = torch.rand(batch, 3, px, px, generator=g)
    maps = {
        "hed": torch.rand(batch, 1, px, px, generator=g),
        "depth": torch.rand(batch, 1, px, px, generator=g),
        "seg": torch.rand(batch, 3, px, px, generator=g),
        "clip": torch.randn(batch, 257, clip_dim, generator=g),
    }
    z, noise, t, text, hint = (x.to(device) for x in (z, noise, t, text, hint))
    maps = {k: v.to(device) for k, v in maps.items()}

    def controlnet_variant(name: str, checkpointing: bool) -> Variant:
        cn = ControlNetModel.from_unet(unet).to(unet.device).train()
        if checkpointing:
            cn.enable_gradient_checkpointing()
            unet.enable_gradient_checkpointing()

        def loss() -> torch.Tensor:
            if checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            down, mid = cn(z, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
            pred = unet(
                z, t, encoder_hidden_states=text, down_block_additional_residuals=list(down),
                mid_block_additional_residual=mid, return_dict=False,
            )[0]  # fmt: skip
            return F.mse_loss(pred.float(), noise.float())

        return Variant(name, list(cn.parameters()), loss)

    def megasr_variant(name: str, checkpointing: bool, new_parts_only: bool) -> Variant:
        torch.manual_seed(seed)
        model = MegaSRModel(MegaSRConfig(unet=dict(unet.config), clip_dim=clip_dim)).to(device)
        controlnet_from_unet(model.controlnet, unet)
        with torch.no_grad():  # the new parts start at zero; small values make the step do its full work
            for n, p in model.named_parameters():
                if not n.startswith("controlnet.") and p.abs().max() == 0:
                    p.normal_(0, 1e-3)
        if new_parts_only:
            model.controlnet.requires_grad_(False)
        module = MegaSRTrainModule(model, unet, gradient_checkpointing=checkpointing).train()

        def loss() -> torch.Tensor:
            module.set_gradient_checkpointing(checkpointing)  # the U-Net is shared by the variants
            pred = module(z, t, text, hint, clip=maps["clip"], hed=maps["hed"], depth=maps["depth"], seg=maps["seg"])
            return F.mse_loss(pred.float(), noise.float())

        return Variant(name, [p for p in module.parameters() if p.requires_grad], loss)

    variants = {
        "controlnet": controlnet_variant("controlnet", False),
        "megasr": megasr_variant("megasr", False, False),
        "megasr_ckpt": megasr_variant("megasr_ckpt", True, False),
        "megasr_new_parts": megasr_variant("megasr_new_parts", False, True),
        "controlnet_ckpt": controlnet_variant("controlnet_ckpt", True),
    }
    return variants, _bytes(unet.parameters())


RATIOS = {
    "megasr_over_controlnet": ("megasr", "controlnet"),
    "megasr_ckpt_over_megasr": ("megasr_ckpt", "megasr"),
    "megasr_new_parts_over_megasr": ("megasr_new_parts", "megasr"),
    "controlnet_ckpt_over_controlnet": ("controlnet_ckpt", "controlnet"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=32, help="U-Net base width (SD-2: 320)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32, help="latent side (crop = 8 x this)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    t0 = time.perf_counter()
    variants, frozen = build(args.width, args.batch, args.latent, args.seed, args.device)
    memory = {name: v.memory() for name, v in variants.items()}
    times = interleaved_times({n: v.step for n, v in variants.items()}, rounds=args.rounds, warmup=1)
    report = {
        "what": "one training step (forward + backward + AdamW step), CPU, fp32; see the script's docstring",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "unet": {
            "layout": "SD-2 base",
            "width": args.width,
            "block_out_channels": [args.width * m for m in (1, 2, 4, 4)],
        },
        "batch": args.batch,
        "crop_px": args.latent * 8,
        "latent": args.latent,
        "frozen_unet_bytes": frozen,
        "seconds_median": {n: round(sorted(ts)[len(ts) // 2], 4) for n, ts in times.items()},
        "memory": memory,
        "time_ratios": {k: ratio_summary(times[a], times[b]) for k, (a, b) in RATIOS.items()},
        "memory_ratios": {
            k: round(memory[a]["total_bytes"] / memory[b]["total_bytes"], 3) for k, (a, b) in RATIOS.items()
        },
        "backward_memory_ratios": {
            k: round(memory[a]["backward_peak_bytes"] / memory[b]["backward_peak_bytes"], 3)
            for k, (a, b) in RATIOS.items()
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(report, indent=1)
    for k in RATIOS:
        r = report["time_ratios"][k]
        logger.info(
            "%-32s time %s (median %.3f, 95%% %.3f..%.3f)  memory %.3f  backward memory %.3f",
            k, r["ratio"] if r["ratio"] is not None else "too noisy", r["median"], r["ci_low"], r["ci_high"],
            report["memory_ratios"][k], report["backward_memory_ratios"][k],
        )  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
