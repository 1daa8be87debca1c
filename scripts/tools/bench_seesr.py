"""SeeSR through the pack vs SeeSR's own code: one denoising call, and RAM tagging time (issue 25; CPU, random weights).

    .venv/bin/python scripts/tools/bench_seesr.py --json docs/benchmark/seesr_cpu.json \\
        --seesr-code /path/to/SeeSR --seesr-python /path/to/seesr-venv/bin/python [--seesr-path /path/to/stubs]
    .venv/bin/python scripts/tools/bench_seesr.py --unet tiny --rounds 6      # quick check, pack side only

One denoising call = what a sampler step costs: ControlNet (with SeeSR's representation branch reading RAM's
145 x 512 tokens) + U-Net (with the branch), classifier-free guidance as a batch of 2, at the SD-2-base size
(866M U-Net) with random weights, float32 on the CPU:

- the pack: the nodes' path -- ComfyUI's ``UNetModel`` patched by ``apply_megasr_to_comfy_unet`` (the U-Net's
  representation branch as object patches), ``MegaSRModel.controlnet_residuals`` with a guidance context built
  once per run (as the MegaSR control does; CISM² and MS-GAM at the zero init of a converted SeeSR file, no maps);
- SeeSR's own (``--seesr-code``: a checkout of cswry/SeeSR, never part of this repository): its
  ``models/unet_2d_condition.UNet2DConditionModel`` and ``models/controlnet.ControlNetModel`` with
  ``use_image_cross_attention=True``, called as its pipeline calls them (``pipelines/pipeline_seesr.py``). SeeSR
  pins diffusers 0.21, which cannot share a process with ours: that half runs in ``--seesr-python`` (a venv with
  SeeSR's dependencies) as a child process that builds its models once and times each call itself when asked,
  so the two sides run interleaved, call for call (scripts/tools/bench_stats.py: per-round ratios, median and
  its 95 % interval).

RAM tagging: the pack's ``megasr.ram`` at RAM's full Swin-L size (4585 classes, random weights) on one image,
resized to RAM's 384 px, per image. The goal (issue 25): the pack's call no slower than SeeSR's own (ratio <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures"), str(ROOT), str(Path(__file__).parent)]

GOAL = 1.0  # the pack's call over SeeSR's own, in time
TEXT_TOKENS = 77
RAM_TOKENS = 145  # RAM at 384 px: one pooled token + 12 x 12
RAM_WIDTH = 512
TIMESTEP = 500
#: SD-2-base's unet/config.json, the config SeeSR's U-Net was trained from (and its ControlNet copied)
SD2_DIFFUSERS = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}


def _unet_config(kind: str) -> dict[str, Any]:
    if kind == "sd2":
        return dict(SD2_DIFFUSERS)
    from harness.checkpoints import TINY_SD2_UNET_CONFIG

    return {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_SD2_UNET_CONFIG.items()}


def _randomize(module, seed: int, only=None) -> None:
    """Every parameter (or those whose name ``only`` accepts) to N(0, 0.02): as trained weights, no zeros."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is None or only(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _inputs(cfg: dict[str, Any], latent: int, seed: int = 1) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 4, latent, latent, generator=g),
        "text": torch.randn(2, TEXT_TOKENS, cfg["cross_attention_dim"], generator=g),
        "hint": torch.rand(1, 3, latent * 8, latent * 8, generator=g),
        "ram": torch.randn(1, RAM_TOKENS, RAM_WIDTH, generator=g),
    }


# --------------------------------------------------------------------------------------------- the pack's side


def pack_call(unet_kind: str, latent: int, comfy_attention: str):
    """(one call, parameter counts, context build seconds) of the pack's SeeSR path."""
    import torch
    from megasr_testing import COMFY_DIR, import_comfy

    sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args as comfy_args

    # ComfyUI picks the U-Net's attention at import: PyTorch's SDPA on NVIDIA (its default there) or with
    # --use-pytorch-cross-attention; on a CPU its default is the sub-quadratic (chunked) attention
    comfy_args.use_pytorch_cross_attention = comfy_attention == "pytorch"
    comfy = import_comfy()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from megasr.adapter_comfy import RUNTIME_KEY, MegaSRRuntime, apply_megasr_to_comfy_unet
    from megasr.blocks import comfy_unet_config
    from megasr.model import MegaSRConfig, MegaSRModel
    from megasr.seesr_branch import REPRESENTATION_DIM

    cfg = _unet_config(unet_kind)
    dm = UNetModel(
        **comfy_unet_config(cfg), dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init
    )
    _randomize(dm, 0)
    model = MegaSRModel(MegaSRConfig(unet=cfg, clip_dim=1280, representation_dim=REPRESENTATION_DIM)).eval()
    # SeeSR's parts trained; CISM² and MS-GAM at the zero init a converted SeeSR file has
    _randomize(model, 2, only=lambda n: n.startswith(("controlnet.", "unet_representation.")))
    model.requires_grad_(False)
    holder = torch.nn.Module()
    holder.diffusion_model = dm
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device="cpu", offload_device="cpu")
    patch = apply_megasr_to_comfy_unet(patcher, model)
    patcher.patch_model()  # the representation branch is an object patch of every SpatialTransformer
    inp = _inputs(cfg, latent)
    x, text, ram = inp["x"], inp["text"], inp["ram"]
    hint = inp["hint"].expand(2, -1, -1, -1)
    t = torch.full((2,), float(TIMESTEP))
    t0 = time.perf_counter()
    with torch.no_grad():
        ctx = model.prepare_context(
            (latent, latent), image_attention=patch.image_attention, step_invariant=True, representation_tokens=ram
        )
    context_s = time.perf_counter() - t0
    to = dict(patcher.model_options["transformer_options"])
    to[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, id(model))

    def controlnet():
        with torch.no_grad():
            return model.controlnet_residuals(x, t, text, hint, ctx)

    def unet(residuals) -> None:
        down, mid = residuals
        with torch.no_grad():
            dm(x, timesteps=t, context=text, control={"output": list(down), "middle": [mid]}, transformer_options=to)

    def call() -> None:
        unet(controlnet())

    residuals = controlnet()
    call.parts = {"controlnet": controlnet, "unet": lambda: unet(residuals)}
    params = {
        "unet_M": round(sum(p.numel() for p in dm.parameters()) / 1e6, 1),
        "controlnet_M": round(sum(p.numel() for p in model.controlnet.parameters()) / 1e6, 1),
        "unet_representation_M": round(sum(p.numel() for p in model.unet_representation.parameters()) / 1e6, 1),
    }
    return call, params, context_s


# ------------------------------------------------------------------------------------------ SeeSR's own side


def reference_child(args: argparse.Namespace) -> None:
    """Runs in SeeSR's environment: build SeeSR's U-Net + ControlNet once, then time one call per ``run`` line."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path[:0] = [args.seesr_code, *args.seesr_path]
    from models.controlnet import ControlNetModel  # SeeSR's own modules, from the user's checkout
    from models.unet_2d_condition import UNet2DConditionModel

    cfg = _unet_config(args.unet) if args.unet == "sd2" else json.loads(args.unet_json)
    unet = UNet2DConditionModel(**cfg, use_image_cross_attention=True).eval()
    cn = ControlNetModel.from_unet(unet, use_image_cross_attention=True).eval()
    _randomize(unet, 0)
    _randomize(cn, 2)
    inp = _inputs(cfg, args.latent)
    x, text = inp["x"], inp["text"]
    ram = torch.cat([inp["ram"]] * 2)  # pipeline_seesr.py: the RAM embeddings are repeated for the CFG batch
    hint = torch.cat([inp["hint"]] * 2)
    t = torch.tensor(TIMESTEP)

    def controlnet():
        with torch.no_grad():  # pipelines/pipeline_seesr.py, untiled branch, guess_mode False, scale 1
            return cn(
                x,
                t,
                encoder_hidden_states=text,
                controlnet_cond=hint,
                conditioning_scale=1.0,
                guess_mode=False,
                return_dict=False,
                image_encoder_hidden_states=ram,
            )

    def unet_call(residuals) -> None:
        down, mid = residuals
        with torch.no_grad():
            unet(
                x,
                t,
                encoder_hidden_states=text,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
                image_encoder_hidden_states=ram,
            )

    import diffusers

    params = {
        "unet_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "controlnet_M": round(sum(p.numel() for p in cn.parameters()) / 1e6, 1),
        "diffusers": diffusers.__version__,
    }
    print(json.dumps({"ready": params}), flush=True)
    residuals = controlnet()
    commands = {
        "run": lambda: unet_call(controlnet()),
        "controlnet": controlnet,
        "unet": lambda: unet_call(residuals),
    }
    for line in sys.stdin:
        if line.strip() not in commands:
            break
        t0 = time.perf_counter()
        commands[line.strip()]()
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


class Reference:
    """SeeSR's side as a child process in its own environment, one timed call per :meth:`__call__`."""

    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [args.seesr_python, __file__, "--reference-child", "--seesr-code", args.seesr_code]
        cmd += ["--unet", args.unet, "--latent", str(args.latent), "--threads", str(args.threads)]
        cmd += ["--unet-json", json.dumps(_unet_config(args.unet))]
        for p in args.seesr_path:
            cmd += ["--seesr-path", p]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.params = self._read()["ready"]
        self.history: list[float] = []

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the SeeSR reference process ended (exit {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def __call__(self, command: str = "run") -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        self.history.append(self._read()["s"])

    def timed(self, command: str):
        """A variant for interleaved_times that runs ``command`` and records the child's own seconds."""
        own: list[float] = []

        def run() -> None:
            self(command)
            own.append(self.history[-1])

        run.own = own
        return run

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------------- RAM


def ram_times(rounds: int, full: bool) -> dict[str, Any]:
    import torch

    from megasr.ram.config import SWIN_L_384
    from megasr.ram.loader import ram_from_config

    config = SWIN_L_384 if full else _tiny_ram_config()
    model = ram_from_config(config)
    image = torch.rand(1, 3, 512, 384, generator=torch.Generator().manual_seed(3))  # any LR size: resized to 384
    times = []
    with torch.no_grad():
        model(image)  # warm-up
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = model(image)
            times.append(time.perf_counter() - t0)
    assert out.tokens.shape[-1] == RAM_WIDTH
    return {
        "size": "Swin-L 384 px, 4585 classes" if full else "tiny",
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "tokens": list(out.tokens.shape),
        "input_px": [512, 384],
        "rounds": rounds,
        "median_s_per_image": round(sorted(times)[len(times) // 2], 3),
        "min_s_per_image": round(min(times), 3),
    }


def _tiny_ram_config():
    from dataclasses import replace

    from megasr.ram.config import SWIN_L_384

    return replace(
        SWIN_L_384,
        embed_dim=32,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        head_hidden_size=32,
        head_num_heads=2,
        head_num_layers=1,
        head_intermediate_size=64,
        num_classes=16,
    )


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", choices=["sd2", "tiny"], default="sd2", help="SD-2-base size (default) or tiny")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: a 256 px tile; 64: SD-2's 512 px)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (>= 6 for a 95 %% interval)")
    ap.add_argument("--ram-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seesr-code", help="a checkout of cswry/SeeSR (its models/ package); omit: pack side only")
    ap.add_argument("--seesr-python", default=sys.executable, help="python of an environment with SeeSR's deps")
    ap.add_argument("--seesr-path", action="append", default=[], help="extra sys.path entry for SeeSR's side")
    ap.add_argument(
        "--comfy-attention",
        choices=["pytorch", "default"],
        default="pytorch",
        help="ComfyUI's U-Net attention: pytorch (SDPA, as SeeSR's diffusers and ComfyUI on NVIDIA) or ComfyUI's "
        "CPU default (sub-quadratic)",
    )
    ap.add_argument("--breakdown", action="store_true", help="also time the ControlNet and the U-Net apart")
    ap.add_argument("--no-ram", action="store_true", help="skip the RAM tagging time")
    ap.add_argument("--json", type=Path, help="write the report here (e.g. docs/benchmark/seesr_cpu.json)")
    ap.add_argument("--reference-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unet-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference_child:
        reference_child(args)
        return

    import torch
    from bench_stats import format_ratio, interleaved_times, median_seconds, ratio_summary, with_goal

    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "what": "one SeeSR denoising call (ControlNet + U-Net, both with the representation branch, CFG batch 2), "
        "the pack's nodes' path vs SeeSR's own code; RAM tagging per image (pack)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "threads": args.threads,
        "unet": args.unet,
        "latent": args.latent,
        "output_px": args.latent * 8,
        "batch": 2,
        "dtype": "float32",
        "device": "cpu",
    }
    pack, params, context_s = pack_call(args.unet, args.latent, args.comfy_attention)
    report["comfy_attention"] = args.comfy_attention
    report["pack"] = {"params": params, "context_build_once_per_run_s": round(context_s, 4)}
    variants = {"pack": pack}
    ref = None
    if args.seesr_code:
        ref = Reference(args)
        report["seesr"] = {"params": ref.params, "code": "cswry/SeeSR models/ (user's checkout, not in the repo)"}
        variants["seesr"] = ref
    try:
        times = interleaved_times(variants, args.rounds)
        if ref is not None:  # the child's own clock on each timed call (without the pipe round trip)
            times["seesr"] = ref.history[-args.rounds :]
        if args.breakdown:
            parts: dict[str, Any] = {f"pack_{k}": f for k, f in pack.parts.items()}
            if ref is not None:
                parts.update({f"seesr_{k}": ref.timed(k) for k in pack.parts})
            part_times = interleaved_times(parts, args.rounds)
            for k, f in parts.items():  # the child's own clock (without the pipe round trip)
                if hasattr(f, "own"):
                    part_times[k] = f.own[-args.rounds :]
            report["breakdown_median_s"] = {k: median_seconds(v) for k, v in part_times.items()}
            if ref is not None:
                report["breakdown_pack_over_seesr"] = {
                    k: ratio_summary(part_times[f"pack_{k}"], part_times[f"seesr_{k}"]) for k in pack.parts
                }
                for k, r in report["breakdown_pack_over_seesr"].items():
                    print(f"  {k} alone, pack / SeeSR's own: {format_ratio(r)}")
    finally:
        if ref is not None:
            ref.close()
    report["median_s"] = {k: median_seconds(v) for k, v in times.items()}
    report["times_s"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
    if ref is not None:
        ratio = with_goal(ratio_summary(times["pack"], times["seesr"]), GOAL)
        report["pack_over_seesr"] = ratio
        print(f"one call, pack / SeeSR's own: {format_ratio(ratio)} (goal <= {GOAL}: {ratio['goal_verdict']})")
    print("median seconds per call:", report["median_s"])
    if not args.no_ram:
        report["ram"] = ram_times(args.ram_rounds, full=args.unet == "sd2")
        print(f"RAM tagging: {report['ram']['median_s_per_image']} s per image ({report['ram']['size']})")
    text = json.dumps(report, indent=1, allow_nan=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
