"""MegaSR benchmark (run by hand; not a test): prints ratios measured in one run.

    .venv/bin/python tests/benchmark.py                 # all parts, SD-2-base sized U-Net for part A
    .venv/bin/python tests/benchmark.py --unet tiny     # quick check
    .venv/bin/python tests/benchmark.py --parts B --sizes 512,1024,2048 --tile 512

A  per-step cost: full MegaSR U-Net call (ControlNet + CISM² + MS-GAM) over the plain SD-2 U-Net and over
   the plain U-Net + ControlNet, the ComfyUI U-Net patched exactly as the nodes patch it.
B  memory as the output grows: the MegaSR Sampler node in the real ComfyUI (tiny checkpoint), one fresh
   process per size, peak memory (CUDA: max allocated; CPU: peak RSS growth) at a fixed tile size, and
   tiled vs untiled time at equal output.
C  guidance extraction time per map (DAGE HED at its real size; depth/seg/CLIP tiny test configs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _timed(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def part_a(unet_kind: str, reps: int) -> dict:
    import torch
    from megasr_testing import import_comfy, perturb_zero_inits

    comfy = import_comfy()
    import comfy.model_management as mm
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from megasr.adapter_comfy import RUNTIME_KEY, MegaSRRuntime, apply_megasr_to_comfy_unet
    from megasr.blocks import comfy_unet_config
    from megasr.model import SD2_BASE_UNET, MegaSRConfig, MegaSRModel

    if unet_kind == "sd2":
        ucfg, latent, clip_dim = dict(SD2_BASE_UNET), 64, 1280
    else:
        from harness.checkpoints import TINY_SD2_UNET_CONFIG

        ucfg, latent, clip_dim = dict(TINY_SD2_UNET_CONFIG), 32, 1280
    device = mm.get_torch_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    ccfg = comfy_unet_config(ucfg)
    dm = UNetModel(**ccfg, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in dm.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    model = MegaSRModel(MegaSRConfig(unet=ucfg, clip_dim=clip_dim))
    perturb_zero_inits(model)
    model = model.to(device=device, dtype=dtype).eval()
    holder = torch.nn.Module()
    holder.diffusion_model = dm
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=device, offload_device=device)
    apply_megasr_to_comfy_unet(patcher, model)

    b = 2  # cond + uncond
    x = torch.randn(b, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.full((b,), 500.0, device=device, dtype=dtype)
    text = torch.randn(b, 77, ucfg["cross_attention_dim"], generator=g).to(device, dtype)
    hint = torch.rand(b, 3, latent * 8, latent * 8, generator=g).to(device, dtype)
    maps = {
        k: torch.rand(b, c, latent * 8, latent * 8, generator=g).to(device, dtype)
        for k, c in (("hed", 1), ("depth", 1), ("seg", 3))
    }
    tokens = torch.randn(b, 257, clip_dim, generator=g).to(device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def plain():
        dm(x, timesteps=t, context=text, transformer_options={})
        sync()

    @torch.no_grad()
    def plain_controlnet():
        down, mid = model.controlnet(x, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        dm(x, timesteps=t, context=text, control={"output": list(down), "middle": [mid]}, transformer_options={})
        sync()

    def context(step_invariant: bool):
        return model.prepare_context(
            (latent, latent), tokens, maps["hed"], maps["depth"], maps["seg"], step_invariant=step_invariant
        )

    run_ctx = None

    @torch.no_grad()
    def full(fresh: bool = False):
        # As the nodes do: one context per sampling run, so map-only work is done at the first step only.
        nonlocal run_ctx
        if fresh or run_ctx is None:
            run_ctx = context(step_invariant=True)
        ctx = run_ctx
        down, mid = model.controlnet_residuals(x, t, text, hint, ctx)
        to = dict(patcher.model_options["transformer_options"])
        to[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, id(model))
        dm(x, timesteps=t, context=text, control={"output": down, "middle": [mid]}, transformer_options=to)
        sync()

    # Interleaved rounds, best of each: a machine whose speed drifts affects every variant alike.
    variants = {"plain": plain, "controlnet": plain_controlnet, "full": full, "first": lambda: full(fresh=True)}
    best = {k: float("inf") for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    tp, tc, tf, tf1 = best["plain"], best["controlnet"], best["full"], best["first"]
    # FLOPs do not depend on what else the machine is doing: the robust form of the same ratios.
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for k in ("plain", "controlnet", "full"):
        with FlopCounterMode(display=False) as counter:
            variants[k]()
        flops[k] = counter.get_total_flops()
    n_unet = sum(p.numel() for p in dm.parameters())
    n_cn = sum(p.numel() for p in model.controlnet.parameters())
    n_ext = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("controlnet."))
    return {
        "unet": unet_kind,
        "device": str(device),
        "dtype": str(dtype),
        "latent": latent,
        "batch": b,
        "params_unet_M": round(n_unet / 1e6, 1),
        "params_controlnet_M": round(n_cn / 1e6, 1),
        "params_cism_msgam_M": round(n_ext / 1e6, 1),
        "s_plain_unet": round(tp, 4),
        "s_unet_plus_controlnet": round(tc, 4),
        "s_megasr_full": round(tf, 4),
        "s_megasr_first_step": round(tf1, 4),
        "ratio_full_over_plain_unet": round(tf / tp, 3),
        "ratio_full_over_unet_plus_controlnet": round(tf / tc, 3),
        "gflops_plain_unet": round(flops["plain"] / 1e9, 1),
        "gflops_unet_plus_controlnet": round(flops["controlnet"] / 1e9, 1),
        "gflops_megasr_full": round(flops["full"] / 1e9, 1),
        "flop_ratio_full_over_plain_unet": round(flops["full"] / flops["plain"], 3),
        "flop_ratio_full_over_unet_plus_controlnet": round(flops["full"] / flops["controlnet"], 3),
    }


def _sampler_child(size: int, tile: int, steps: int) -> dict:
    """Runs in a fresh process: the MegaSR Sampler node at output ``size`` with ``tile`` px tiles."""
    import tempfile

    import torch
    from harness.checkpoints import CHECKPOINT_NAME, ensure_tiny_sd2_checkpoint
    from harness.comfy import get_runner
    from harness.images import write_test_image
    from megasr_fixtures import CLIP_VISION_NAME, MEGASR_NAME, ensure_tiny_clip_vision, ensure_tiny_megasr

    base = Path(tempfile.mkdtemp(prefix="megasr_bench_"))
    runner = get_runner(base / "in", base / "out", base / "tmp")  # boots ComfyUI (puts its tree on sys.path)
    import folder_paths

    runner.register_model_dir("checkpoints", ensure_tiny_sd2_checkpoint().parent)
    runner.register_model_dir("clip_vision", ensure_tiny_clip_vision().parent)
    runner.register_model_dir("megasr", ensure_tiny_megasr().parent)
    lr = size // 4
    write_test_image(f"{folder_paths.get_input_directory()}/lr.png", width=lr, height=lr, seed=1)
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_NAME}},
        "msr": {"class_type": "MegaSRModelLoader", "inputs": {"megasr_name": MEGASR_NAME}},
        "lr": {"class_type": "LoadImage", "inputs": {"image": "lr.png"}},
        "sem": {
            "class_type": "MegaSRClipSemantics",
            "inputs": {"image": ["lr", 0], "clip_vision": ["cv", 0], "crop": "none"},
        },
        "cism": {
            "class_type": "MegaSRCismInjection",
            "inputs": {
                "model": ["ckpt", 0],
                "megasr_model": ["msr", 0],
                "semantics": ["sem", 0],
                "strength": 1.0,
                "strength_full_res": 1.0,
                "strength_half_res": 1.0,
                "strength_quarter_res": 1.0,
                "strength_eighth_res": 1.0,
            },
        },
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "clean", "clip": ["ckpt", 1]}},
        "gam": {
            "class_type": "MegaSRGuidanceFusion",
            "inputs": {
                "positive": ["pos", 0],
                "negative": ["pos", 0],
                "megasr_model": ["msr", 0],
                "lr_image": ["lr", 0],
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "hed_strength": 1.0,
                "depth_strength": 1.0,
                "seg_strength": 1.0,
                "hed": ["lr", 0],
                "depth": ["lr", 0],
                "seg": ["lr", 0],
            },
        },
        "sample": {
            "class_type": "MegaSRSampler",
            "inputs": {
                "model": ["cism", 0],
                "positive": ["gam", 0],
                "negative": ["gam", 1],
                "vae": ["ckpt", 2],
                "lr_image": ["lr", 0],
                "scale": 4.0,
                "seed": 0,
                "steps": steps,
                "cfg": 5.5,
                "sampler_name": "ddpm",
                "scheduler": "normal",
                "denoise": 1.0,
                "tile_size": tile,
                "tile_overlap": min(64, tile // 4),
                "color_fix": "adain",
            },
        },
        "save": {"class_type": "PreviewImage", "inputs": {"images": ["sample", 0]}},
    }
    # Load everything once at a tiny size so the measured run sees only the sampling itself.
    warm = json.loads(json.dumps(g))
    write_test_image(f"{folder_paths.get_input_directory()}/warm.png", width=8, height=8, seed=2)
    warm["lr"]["inputs"]["image"] = "warm.png"
    runner.run(warm)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    runner.run(g)
    dt = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    )
    return {
        "size": size,
        "tile": tile,
        "seconds": round(dt, 2),
        "peak_MB": round(peak / 2**20, 1),
        "measure": "cuda max allocated" if cuda else "peak RSS growth",
    }


def part_b(sizes: list[int], tile: int, steps: int) -> list[dict]:
    rows = []
    for size in sizes:
        for t in [tile, 8192] if size <= 1024 else [tile]:  # untiled only where it fits in memory
            out = subprocess.run(
                [sys.executable, __file__, "--child", f"{size},{t},{steps}"],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            )
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not line:
                rows.append({"size": size, "tile": t, "error": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(line[-1]))
            print("  ", rows[-1], flush=True)
    return rows


def part_c(reps: int) -> list[dict]:
    import torch
    from dage_fixtures import tiny_clip, tiny_depth, tiny_seg

    from megasr.dage.hed import HedExtractor

    img = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        hed = HedExtractor.from_config({}).eval()
        for name, model in (
            ("hed (real size)", hed),
            ("depth (tiny)", tiny_depth()[0]),
            ("seg (tiny)", tiny_seg()[0]),
            ("clip (tiny)", tiny_clip()[0]),
        ):
            s = _timed(lambda m=model: m(img, resolution=512), reps)
            rows.append({"map": name, "resolution": 512, "seconds": round(s, 3)})
            print("  ", rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ABC")
    ap.add_argument("--unet", choices=["sd2", "tiny"], default="sd2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="512,1024,2048")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        size, tile, steps = (int(v) for v in args.child.split(","))
        print(json.dumps(_sampler_child(size, tile, steps)), flush=True)
        return
    report = {}
    if "A" in args.parts:
        print("A  per-step cost of the U-Net call", flush=True)
        report["A"] = part_a(args.unet, args.reps)
        print("  ", report["A"], flush=True)
    if "B" in args.parts:
        print(f"B  sampler peak memory vs output size (tile {args.tile} px)", flush=True)
        report["B"] = part_b([int(s) for s in args.sizes.split(",")], args.tile, args.steps)
        tiled = [r for r in report["B"] if r.get("tile") == args.tile and "peak_MB" in r]
        if len(tiled) >= 2:
            print(
                f"   peak ratio {tiled[-1]['size']} px / {tiled[0]['size']} px (tiled): "
                f"{tiled[-1]['peak_MB'] / max(tiled[0]['peak_MB'], 1e-6):.2f}"
            )
        for size in {r["size"] for r in report["B"]}:
            pair = {r["tile"]: r for r in report["B"] if r["size"] == size and "seconds" in r}
            if args.tile in pair and 8192 in pair:
                print(
                    f"   {size} px: tiled / untiled time {pair[args.tile]['seconds'] / pair[8192]['seconds']:.2f}, "
                    f"peak {pair[args.tile]['peak_MB']} MB vs {pair[8192]['peak_MB']} MB"
                )
    if "C" in args.parts:
        print("C  guidance extraction time per map", flush=True)
        report["C"] = part_c(args.reps)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
