"""MegaSR benchmark (run by hand or by tests/tools/test_benchmark.py at a tiny size; not a timed test).

    .venv/bin/python scripts/tools/benchmark.py --json bench_out/cpu.json            # parts A, B, C on this machine
    .venv/bin/python scripts/tools/benchmark.py --parts A --unet tiny --rounds 5     # quick check
    .venv/bin/python scripts/tools/benchmark.py --gpu --json bench_out/gpu.json      # on a CUDA machine (~8 min)
    .venv/bin/python scripts/update_readme_perf.py bench_out/cpu.json [bench_out/gpu.json]   # README tables

Every time ratio is measured in interleaved rounds (A B C A B C ...) and reported as the median of the
per-round ratios with the median's distribution-free 95 % interval; when the interval is wider than
``--max-spread`` of the median it says "too noisy" instead of a number, and a goal counts as met only when the
whole interval is at or under it (scripts/tools/bench_stats.py). FLOP ratios (``torch.utils.flop_counter``) do not depend on machine load.

A  per-step cost of one U-Net call, the nodes' code path (ComfyUI ``UNetModel`` patched as the nodes patch
   it): full MegaSR (ControlNet + CISM² + MS-GAM) over the plain SD-2 U-Net and over U-Net + plain
   ControlNet, and a breakdown of the extra cost over U-Net + ControlNet: CISM² image attention, MS-GAM
   (SAFT modulation + projection), the per-run context build (connector, MS-GAM stage 1, SAFT gamma/beta)
   and the hint/map preparation, in FLOPs and in time share.
B  the MegaSR Sampler node in the real ComfyUI (shipped megasr_x4 graph, tiny checkpoint), fresh process per
   measurement: peak memory vs output size with tiles; tiled vs untiled time at equal output (4 tiles,
   default overlap); tile-batch speed-up where the node has a ``tile_batch`` input.
C  guidance extraction time per map (DAGE HED at its real size; depth/seg/CLIP tiny test configs).
GPU  (``--gpu``) the real MegaSR Sampler node in the real ComfyUI with SD-2-base-sized random weights made
   here (nothing downloaded), fp16 and bf16: 512 px x4 output with 50 DDPM steps and a 3840x2160 output with
   tiles; wall time, per-step time, peak VRAM (``torch.cuda.max_memory_allocated``). ``--gpu-scale tiny``
   runs the same code on the CPU at a tiny size (what CI does so it cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# a dev tool, not product code: it runs on the test harness and fixtures (tests/harness, tests/fixtures)
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures"), str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_stats import (  # noqa: E402
    MAX_RELATIVE_SPREAD,
    format_ratio,
    interleaved_times,
    median_seconds,
    ratio_summary,
    with_goal,
)

SCHEMA_VERSION = 1
PART_A_GOAL = 1.15  # full MegaSR call over U-Net + plain ControlNet, in time (issue 8)
PART_B_GOAL = 1.25  # tiled over untiled at equal output, 4 tiles, the node's default overlap (issue 8)


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["commit"] = head.stdout.strip() or None  # the code measured (a dev tool: the product runs no git)
    return info


def pin_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------- A


def part_a(unet_kind: str, rounds: int, latent: int | None, max_spread: float) -> dict[str, Any]:
    import torch
    from megasr_testing import import_comfy, perturb_zero_inits

    comfy = import_comfy()
    import comfy.model_management as mm
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from torch.utils.flop_counter import FlopCounterMode

    from megasr.adapter_comfy import RUNTIME_KEY, MegaSRRuntime, apply_megasr_to_comfy_unet
    from megasr.blocks import comfy_unet_config
    from megasr.model import SD2_BASE_UNET, MegaSRConfig, MegaSRModel

    device = mm.get_torch_device()
    if unet_kind == "sd2":
        ucfg = dict(SD2_BASE_UNET)
        latent = latent or (64 if device.type == "cuda" else 32)
    else:
        from harness.checkpoints import TINY_SD2_UNET_CONFIG

        ucfg = dict(TINY_SD2_UNET_CONFIG)
        latent = latent or 16
    clip_dim = 1280
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dm = UNetModel(**comfy_unet_config(ucfg), dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
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
    patch = apply_megasr_to_comfy_unet(patcher, model)

    b = 2  # cond + uncond
    px = latent * 8
    x = torch.randn(b, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.full((b,), 500.0, device=device, dtype=dtype)
    text = torch.randn(b, 77, ucfg["cross_attention_dim"], generator=g).to(device, dtype)
    lr = torch.rand(1, 3, px // 4, px // 4, generator=g).to(device, torch.float32)
    lr_maps = {k: torch.rand(1, c, px // 4, px // 4, generator=g).to(device) for k, c in (("hed", 1), ("depth", 1))}
    lr_maps["seg"] = torch.rand(1, 3, px // 4, px // 4, generator=g).to(device)
    # one LR image's CLIP tokens, shared by cond and uncond (what the CISM² node hands over: batch 1)
    tokens = torch.randn(1, 257, clip_dim, generator=g).to(device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def prepare_inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # What MegaSRControl does once per run: LR hint and maps to the output size (float32, then cast).
        hint = comfy.utils.common_upscale(lr, px, px, "bicubic", "disabled").clamp(0, 1)
        maps = {
            k: comfy.utils.common_upscale(m, px, px, "nearest-exact" if k == "seg" else "bilinear", "disabled")
            for k, m in lr_maps.items()
        }
        sync()
        return hint.to(dtype).expand(b, -1, -1, -1), {k: v.to(dtype).expand(b, -1, -1, -1) for k, v in maps.items()}

    hint, maps = prepare_inputs()

    def context(with_tokens: bool = True, with_maps: bool = True):
        m = maps if with_maps else {}
        return model.prepare_context(
            (latent, latent),
            tokens if with_tokens else None,
            m.get("hed"),
            m.get("depth"),
            m.get("seg"),
            image_attention=patch.image_attention,  # the ControlNet's image path borrows the U-Net's attention
            step_invariant=True,
        )

    contexts: dict[str, Any] = {}

    def megasr_call(kind: str) -> None:
        # As the nodes do: one context per sampling run, so map-only work happens at the first step only.
        if kind not in contexts:
            contexts[kind] = context(with_tokens=kind != "no_cism", with_maps=kind != "no_msgam")
        ctx = contexts[kind]
        down, mid = model.controlnet_residuals(x, t, text, hint, ctx)
        to = dict(patcher.model_options["transformer_options"])
        to[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, id(model))
        dm(x, timesteps=t, context=text, control={"output": list(down), "middle": [mid]}, transformer_options=to)
        sync()

    def plain() -> None:
        dm(x, timesteps=t, context=text, transformer_options={})
        sync()

    def plain_controlnet() -> None:
        down, mid = model.controlnet(x, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        dm(x, timesteps=t, context=text, control={"output": list(down), "middle": [mid]}, transformer_options={})
        sync()

    def first_step() -> None:
        # A sampling run's first step: a new context (connector, MS-GAM stage 1), whose SAFT modulations and
        # CISM² image K/V are computed in this call and re-used by every later step ("full").
        contexts.pop("first", None)
        megasr_call("first")
        contexts.pop("first", None)

    variants = {
        "plain": plain,
        "controlnet": plain_controlnet,
        "full": lambda: megasr_call("full"),
        "no_cism": lambda: megasr_call("no_cism"),
        "no_msgam": lambda: megasr_call("no_msgam"),
        "first_step": first_step,
    }
    with torch.no_grad():
        times = interleaved_times(variants, rounds)
        once = interleaved_times({"prepare_inputs": prepare_inputs}, rounds)
        flops: dict[str, int] = {}
        for k, fn in variants.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[k] = counter.get_total_flops()
    # per run = the first step's extra over a later step, paired per round
    per_run = sorted(f - s for f, s in zip(times["first_step"], times["full"]))
    per_run_s = round(per_run[len(per_run) // 2], 4)

    def share(minus: str) -> dict[str, Any]:
        # Extra time of the full call attributable to one part: full - (full without it), per round,
        # over the extra time of the full call beyond U-Net + ControlNet.
        extra = [f - c for f, c in zip(times["full"], times["controlnet"])]
        part = [f - m for f, m in zip(times["full"], times[minus])]
        pairs = [(p, e) for p, e in zip(part, extra) if e > 0]
        s = ratio_summary([p for p, _ in pairs], [e for _, e in pairs], max_spread=max_spread * 4) if pairs else None
        return {
            "flops_G": round((flops["full"] - flops[minus]) / 1e9, 3),
            "flop_share_of_extra": round(
                (flops["full"] - flops[minus]) / max(flops["full"] - flops["controlnet"], 1), 3
            ),
            "time_share_of_extra": s,
        }

    n_ext = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("controlnet."))
    return {
        "unet": unet_kind,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "latent": latent,
        "output_px": px,
        "batch": b,
        "rounds": rounds,
        "params_M": {
            "unet": round(sum(p.numel() for p in dm.parameters()) / 1e6, 1),
            "controlnet": round(sum(p.numel() for p in model.controlnet.parameters()) / 1e6, 1),
            "cism_msgam": round(n_ext / 1e6, 1),
        },
        "median_s": {k: median_seconds(v) for k, v in {**times, **once}.items()},
        "gflops": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "time_ratio": {
            "full_over_plain_unet": ratio_summary(times["full"], times["plain"], max_spread),
            "full_over_unet_plus_controlnet": with_goal(
                ratio_summary(times["full"], times["controlnet"], max_spread), PART_A_GOAL
            ),
            "controlnet_over_plain_unet": ratio_summary(times["controlnet"], times["plain"], max_spread),
        },
        "flop_ratio": {
            "full_over_plain_unet": round(flops["full"] / flops["plain"], 3),
            "full_over_unet_plus_controlnet": round(flops["full"] / flops["controlnet"], 3),
        },
        "extra_cost_breakdown": {
            "cism_image_attention": share("no_cism"),
            "msgam_saft_and_projection": share("no_msgam"),
            "per_run_context_build_s": per_run_s,
            "per_run_context_build_gflops": round((flops["first_step"] - flops["full"]) / 1e9, 2),
            "per_run_hint_and_map_preparation_s": median_seconds(once["prepare_inputs"]),
            "note": (
                "once per sampling run (amortised over the steps): the context build (connector, MS-GAM stage 1, "
                "SAFT gamma/beta, CISM² image K/V) = the first step's extra over a later step, median of paired "
                "rounds; hint and map preparation"
            ),
        },
    }


# --------------------------------------------------------------------------------------- B and GPU (children)


def _write_lr(path: str, width: int, height: int, seed: int) -> None:
    from harness.images import write_test_image

    write_test_image(path, width=width, height=height, seed=seed)


def _boot_runner(scale: str, dtype: str | None):
    """Boot the in-process ComfyUI (accelerator allowed in GPU mode), register the benchmark's models."""
    from harness import comfy as hcomfy

    hcomfy.bootstrap()
    from comfy.cli_args import args

    if scale == "sd2":
        args.cpu = False  # read once, when comfy.model_management is first imported (below)
    if dtype in ("fp16", "bf16"):
        setattr(args, f"{dtype}_unet", True)
    import comfy.model_management  # noqa: F401

    base = Path(tempfile.mkdtemp(prefix="megasr_bench_"))
    runner = hcomfy.get_runner(base / "in", base / "out", base / "tmp")
    return runner, base


def _models(runner, scale: str) -> dict[str, str]:
    """Register the checkpoint/MegaSR/CLIP-vision files for ``scale``; returns the prompt overrides."""
    from harness.checkpoints import ensure_tiny_sd2_checkpoint
    from harness.paths import cache_dir
    from megasr_fixtures import ensure_dage_files, ensure_tiny_clip_vision, ensure_tiny_megasr, models_dir

    for folder in ("checkpoints", "megasr", "clip_vision"):
        runner.register_model_dir(folder, models_dir(folder))
    ensure_dage_files()
    if scale == "tiny":
        ckpt, clip, megasr = ensure_tiny_sd2_checkpoint(), ensure_tiny_clip_vision(), ensure_tiny_megasr()
    else:
        from bench_models import ensure_sd2_base_files

        files = ensure_sd2_base_files(cache_dir() / "bench")
        for folder, path in files.items():
            runner.register_model_dir(folder, path.parent)
        ckpt, clip, megasr = files["checkpoints"], files["clip_vision"], files["megasr"]
    return {
        "CheckpointLoaderSimple.ckpt_name": ckpt.name,
        "CLIPVisionLoader.clip_name": clip.name,
        "MegaSRModelLoader.megasr_name": megasr.name,
    }


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux clear_refs 5); returns that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _peak_rss() -> int:
    return _status_kb("VmHWM")


class _EventClock:
    """Timestamps the executor's progress events of one node (per-step time of the sampler)."""

    def __init__(self, server, node_id: str) -> None:
        self.node_id = node_id
        self.stamps: list[float] = []
        self._send = server.send_sync

        def send_sync(event, data, sid=None):  # noqa: ANN001, ANN202
            if event == "progress" and str(data.get("node")) == node_id:
                self.stamps.append(time.perf_counter())
            return self._send(event, data, sid)

        server.send_sync = send_sync

    def per_step_s(self) -> float | None:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return round(sorted(gaps)[len(gaps) // 2], 4) if gaps else None


def _graph(runner, workflow: str, overrides: dict[str, Any], scale: str) -> tuple[dict, str]:
    from megasr_fixtures import prompt

    info = runner.object_info()
    p = prompt((runner, overrides["CheckpointLoaderSimple.ckpt_name"], info), workflow, **overrides)
    if scale == "sd2":  # the tiny DAGE CLIP LoRA fits the tiny ViT-L test tower, not ViT-H: leave it out
        for node in p.values():
            if node["class_type"] == "MegaSRClipSemantics":
                for key, value in list(node["inputs"].items()):
                    if isinstance(value, list) and p[str(value[0])]["class_type"] == "MegaSRDageLoader":
                        del node["inputs"][key]
    sampler = [k for k, n in p.items() if n["class_type"] == "MegaSRSampler"]
    return p, sampler[0]


def child_sampler(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process. ``spec``: mode ("memory" | "tiled_vs_untiled" | "gpu"), sizes, tiles, ..."""
    import torch

    runner, base = _boot_runner(spec.get("scale", "tiny"), spec.get("dtype"))
    import folder_paths

    overrides = _models(runner, spec.get("scale", "tiny"))
    node_info = runner.node_info("MegaSRSampler")
    sampler_inputs = {**node_info["input"].get("required", {}), **node_info["input"].get("optional", {})}
    inp = folder_paths.get_input_directory()
    cuda = torch.cuda.is_available() and spec.get("scale") == "sd2"
    seed = [100]

    def run(workflow: str, lr_w: int, lr_h: int, **sampler) -> tuple[float, dict]:
        name = f"lr_{lr_w}x{lr_h}.png"
        if not os.path.exists(f"{inp}/{name}"):
            _write_lr(f"{inp}/{name}", lr_w, lr_h, seed=lr_w * 7 + lr_h)
        seed[0] += 1  # a new seed per run: ComfyUI re-runs the sampler, the cached loaders/maps stay cached
        ov = {**overrides, "LR image.image": name, "MegaSRSampler.seed": seed[0]}
        ov.update({f"MegaSRSampler.{k}": v for k, v in sampler.items() if k in sampler_inputs})
        p, sid = _graph(runner, workflow, ov, spec.get("scale", "tiny"))
        clock = _EventClock(runner.server, sid)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        runner.run(p, check_keys=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, {"per_step_s": clock.per_step_s()}

    steps = spec.get("steps", 1)
    mode = spec["mode"]
    # Load every model once at a tiny size so the measurements see the sampling only.
    run("megasr_x4", 8, 8, steps=1)
    if mode == "memory":
        lr = spec["size"] // 4
        tiles = {"tile_size": spec["tile"], "tile_overlap": spec["overlap"]}
        base_rss = _reset_peak_rss()
        dt, _ = run("megasr_x4", lr, lr, steps=steps, **tiles)
        graph_peak = _peak_rss() - base_rss
        # Same LR again with a new seed: ComfyUI re-runs only the sampler (and SaveImage), maps stay cached.
        base_rss = _reset_peak_rss()
        dt_sampler, _ = run("megasr_x4", lr, lr, steps=steps, **tiles)
        sampler_peak = _peak_rss() - base_rss
        # The canvas itself (output image, float32 RGB) grows with the output; everything else should not.
        canvas = spec["size"] * spec["size"] * 3 * 4
        mb = 2**20
        return {
            "size": spec["size"],
            "tile": spec["tile"],
            "overlap": spec["overlap"],
            "steps": steps,
            "map_resolution": 64,  # tests/fixtures/megasr_fixtures.prompt sets the DAGE nodes' resolution
            "seconds": round(dt, 2),
            "sampler_seconds": round(dt_sampler, 2),
            "peak_MB": round(graph_peak / mb, 1),
            "sampler_peak_MB": round(sampler_peak / mb, 1),
            "canvas_MB": round(canvas / mb, 1),
            "sampler_peak_minus_canvas_MB": round((sampler_peak - canvas) / mb, 1),
        }
    if mode == "tiled_vs_untiled":
        tile, overlap = spec["tile"], spec["overlap"]
        out = 2 * tile - overlap  # 2 x 2 tiles with the overlap
        lr = out // 4
        variants = {
            "tiled": lambda: run("megasr_x4", lr, lr, steps=steps, tile_size=tile, tile_overlap=overlap),
            "untiled": lambda: run("megasr_x4", lr, lr, steps=steps, tile_size=8192, tile_overlap=overlap),
        }
        if "tile_batch" in sampler_inputs:
            variants["tiled_batch1"] = lambda: run(
                "megasr_x4", lr, lr, steps=steps, tile_size=tile, tile_overlap=overlap, tile_batch=1
            )
        # each run's later-step time from the sampler's progress events (the first step also builds the
        # run's context and each tile's CLIP crop); steps >= 2 for it
        per_step: dict[str, list[float]] = {k: [] for k in variants}

        def timed(name: str):
            def call() -> None:
                _, extra = variants[name]()
                if extra["per_step_s"] is not None:
                    per_step[name].append(extra["per_step_s"])

            return call

        times = interleaved_times({k: timed(k) for k in variants}, spec["rounds"], warmup=0)
        ms = spec["max_spread"]
        res = {
            "output_px": lr * 4,
            "tile": tile,
            "overlap": overlap,
            "tiles": 4,
            "steps": steps,
            "rounds": spec["rounds"],
            "median_s": {k: median_seconds(v) for k, v in times.items()},
            "tiled_over_untiled": with_goal(ratio_summary(times["tiled"], times["untiled"], ms), PART_B_GOAL),
        }
        if all(len(v) == spec["rounds"] for v in per_step.values()):
            res["median_step_s"] = {k: median_seconds(v) for k, v in per_step.items()}
            res["tiled_over_untiled_per_step"] = with_goal(
                ratio_summary(per_step["tiled"], per_step["untiled"], ms), PART_B_GOAL
            )
        if "tiled_batch1" in times:
            res["tile_batch_speedup"] = ratio_summary(times["tiled_batch1"], times["tiled"], ms)
        return res
    if mode == "gpu":
        rows = []
        for case in spec["cases"]:
            dt, extra = run(
                case["workflow"], case["lr_w"], case["lr_h"], steps=case["steps"], **case.get("sampler", {})
            )
            rows.append(
                {
                    "case": case["name"],
                    "dtype": spec.get("dtype") or "fp32",
                    "output": f"{case['lr_w'] * 4}x{case['lr_h'] * 4}",
                    "steps": case["steps"],
                    "wall_s": round(dt, 2),
                    "per_step_s": extra["per_step_s"],
                    "peak_vram_MB": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                }
            )
            print("  ", rows[-1], flush=True)
        return {"rows": rows}
    raise ValueError(f"unknown child mode {mode!r}")


def _child(spec: dict[str, Any], threads: int, timeout: float | None = None) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(threads)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": [f"timed out after {timeout:g} s"]}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"spec": spec, "error": [_failure_text(out.returncode, out.stderr)]}
    return json.loads(lines[-1])


def _failure_text(returncode: int, stderr: str) -> str:
    """What a failed child says: its exception line, or how it ended; never a progress bar's output."""
    if returncode < 0:
        return f"killed by signal {-returncode}"
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    lines = [ln for ln in lines if "it/s]" not in ln and "s/it]" not in ln and "%|" not in ln]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt"))]
    return (errors or lines or [f"exit status {returncode}, no output"])[-1][:200]


def _tile_cells(size_px: int, tile_px: int, overlap_px: int) -> tuple[int, int]:
    """(tiles, latent cells summed over the tiles) of a square ``size_px`` output: the U-Net work of a step
    in cells, against ``(size_px // 8) ** 2`` cells untiled."""
    from megasr.tiling import tiles

    cells = -(-size_px // 8)
    grid = tiles(cells, cells, max(1, tile_px // 8), min(overlap_px // 8, max(1, tile_px // 8) // 2))
    return len(grid), sum((t.y1 - t.y0) * (t.x1 - t.x0) for t in grid)


def _timing(
    tile: int, overlap: int, steps: int, rounds: int, threads: int, max_spread: float, child_timeout: float | None
) -> dict[str, Any]:
    """Tiled (2 x 2 tiles of ``tile`` px, ``overlap``) vs untiled at the same output, in one child."""
    spec = {
        "mode": "tiled_vs_untiled",
        "tile": tile,
        "overlap": overlap,
        "steps": steps,
        "rounds": rounds,
        "max_spread": max_spread,
    }
    timing = _child(spec, threads, child_timeout)
    if "error" not in timing:
        out_px = timing["output_px"]
        n, cells = _tile_cells(out_px, tile, overlap)
        timing["tiled_cells_over_untiled"] = round(cells / (-(-out_px // 8)) ** 2, 3)
        # self-attention work ~ tokens squared per tile: where it dominates, tiles are cheaper than one canvas
        timing["tiled_attention_over_untiled"] = round(n * ((tile // 8) ** 2) ** 2 / ((-(-out_px // 8)) ** 2) ** 2, 3)
        timing["note"] = (
            f"{n} tiles cover {timing['tiled_cells_over_untiled']}x the untiled latent cells (the overlaps are "
            "computed twice or four times), but their full-resolution self-attention (quadratic in the tokens) "
            f"is {timing['tiled_attention_over_untiled']}x the untiled one; each tile's LR crop is CLIP-encoded "
            f"once per run ({n} CLIP vision forwards the untiled run does not make); on one CPU thread a stack "
            "of tiles does the same work as the tiles one by one, so tile_batch can only win where the device "
            "runs a batch in parallel (GPU)"
        )
    return timing


def part_b(
    sizes: list[int],
    tile: int,
    overlap: int,
    steps: int,
    rounds: int,
    threads: int,
    max_spread: float,
    child_timeout: float | None = None,
    timing_run: bool = True,
    timing_tiles: list[tuple[int, int]] | None = None,
):
    # the time ratio first: it is the goal figure, the memory sweep's big sizes may run out of time
    configs = timing_tiles or [(tile, overlap)]
    if not timing_run:
        timing: dict[str, Any] = {"skipped": "tiled vs untiled not measured in this run (--no-b-timing)"}
        more: list[dict[str, Any]] = []
    else:
        runs = [_timing(t, o, steps, rounds, threads, max_spread, child_timeout) for t, o in configs]
        timing, more = runs[0], runs[1:]
    for t in [timing, *more]:
        print("  ", t, flush=True)
    memory = []
    per_cell_s = None  # measured sampler seconds per tiled latent cell (one run), to skip what cannot finish
    for size in sizes:
        spec = {"mode": "memory", "size": size, "tile": tile, "overlap": overlap, "steps": steps}
        n, cells = _tile_cells(size, tile, overlap)
        if per_cell_s is not None and child_timeout:
            estimate = 2 * per_cell_s * cells  # the child samples this size twice (whole graph, sampler alone)
            if estimate > child_timeout:
                row = {
                    "spec": spec,
                    "error": [
                        f"not run: at least {estimate / 60:.0f} min estimated ({n} tiles, {cells} latent cells at "
                        f"{per_cell_s * 1e3:.2f} ms per cell measured at a smaller size) > the {child_timeout:g} s limit"
                    ],
                }
                memory.append(row)
                print("  ", row, flush=True)
                continue
        row = _child(spec, threads, child_timeout)
        if "sampler_seconds" in row:
            per_cell_s = row["sampler_seconds"] / cells
            row["tiles"] = n
        memory.append(row)
        print("  ", row, flush=True)
    tiled = [r for r in memory if "peak_MB" in r]
    flat = None
    if len(tiled) >= 2:  # the sampler's own peak beyond the canvas, largest output over smallest
        flat = round(tiled[-1]["sampler_peak_minus_canvas_MB"] / max(tiled[0]["sampler_peak_minus_canvas_MB"], 1), 2)
    return {
        "memory": memory,
        "sampler_peak_minus_canvas_ratio_largest_over_smallest": flat,
        "timing": timing,
        "timing_more": more,
    }


def part_gpu(scale: str, dtypes: list[str], threads: int) -> dict[str, Any]:
    if scale == "sd2":
        cases = [
            {"name": "512 px x4, 50 DDPM steps", "workflow": "megasr_x4", "lr_w": 128, "lr_h": 128, "steps": 50},
            {
                "name": "3840x2160 x4, tiled, 50 DDPM steps",
                "workflow": "megasr_large_tiled",
                "lr_w": 960,
                "lr_h": 540,
                "steps": 50,
            },
        ]
    else:  # the same code at a CPU-sized scale (CI)
        cases = [
            {"name": "64 px x4, 2 steps", "workflow": "megasr_x4", "lr_w": 16, "lr_h": 16, "steps": 2},
            {
                "name": "96x64 x4, tiled, 2 steps",
                "workflow": "megasr_large_tiled",
                "lr_w": 24,
                "lr_h": 16,
                "steps": 2,
                "sampler": {"tile_size": 64, "tile_overlap": 16},
            },
        ]
    rows = []
    for dtype in dtypes:
        res = _child({"mode": "gpu", "scale": scale, "dtype": dtype, "cases": cases}, threads)
        rows.extend(res.get("rows", [{"dtype": dtype, "error": res.get("error")}]))
    return {"scale": scale, "rows": rows}


# ------------------------------------------------------------------------------------------------------ C


def part_c(rounds: int, resolution: int) -> list[dict[str, Any]]:
    import torch
    from dage_fixtures import tiny_clip, tiny_depth, tiny_seg

    from megasr.dage.hed import HedExtractor

    img = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    models = {
        "hed (real size)": HedExtractor.from_config({}).eval(),
        "depth (tiny)": tiny_depth()[0],
        "seg (tiny)": tiny_seg()[0],
        "clip (tiny)": tiny_clip()[0],
    }
    with torch.no_grad():
        times = interleaved_times({k: (lambda m=m: m(img, resolution=resolution)) for k, m in models.items()}, rounds)
    return [{"map": k, "resolution": resolution, "median_s": median_seconds(v)} for k, v in times.items()]


# --------------------------------------------------------------------------------------------------- main


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    a = report.get("A")
    if a:
        tr = a["time_ratio"]
        lines.append(f"A full / plain U-Net: {format_ratio(tr['full_over_plain_unet'])}")
        lines.append(
            f"A full / U-Net + ControlNet: {format_ratio(tr['full_over_unet_plus_controlnet'])} "
            f"(goal <= {PART_A_GOAL}: {tr['full_over_unet_plus_controlnet'].get('goal_verdict')})"
        )
        lines.append(f"A FLOP ratios: {a['flop_ratio']}")
    b = report.get("B")
    for row in (b or {}).get("memory", []):
        lines.append(f"B memory {row.get('size', row.get('spec', {}).get('size'))} px: {row.get('error') or row}")
    for t in [b.get("timing", {}), *b.get("timing_more", [])] if b else []:
        if "tiled_over_untiled" not in t:
            continue
        where = f"{t['output_px']} px, 4 tiles of {t['tile']} / {t['overlap']} px"
        for key, what in (("tiled_over_untiled", "graph"), ("tiled_over_untiled_per_step", "per step")):
            if key in t:
                lines.append(
                    f"B tiled / untiled ({where}, {what}): {format_ratio(t[key])} "
                    f"(goal <= {PART_B_GOAL}: {t[key].get('goal_verdict')})"
                )
        if "tile_batch_speedup" in t:
            lines.append(f"B tile_batch speed-up ({where}): {format_ratio(t['tile_batch_speedup'])}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ABC", help="any of A, B, C (default ABC)")
    ap.add_argument("--gpu", action="store_true", help="run the GPU mode (fp16, bf16) instead of A/B/C")
    ap.add_argument("--gpu-scale", choices=["sd2", "tiny"], default="sd2")
    ap.add_argument("--dtypes", default=None, help="GPU mode dtypes (default fp16,bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--unet", choices=["sd2", "tiny"], default="sd2", help="part A U-Net size")
    ap.add_argument("--latent", type=int, default=None, help="part A latent size (default 64 CUDA, 32 CPU)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds per ratio")
    ap.add_argument("--max-spread", type=float, default=MAX_RELATIVE_SPREAD)
    ap.add_argument("--sizes", default="512,1024,2048,4096", help='part B output sizes (memory; "" for none)')
    ap.add_argument("--tile", type=int, default=256, help="part B tile size in output px")
    ap.add_argument("--overlap", type=int, default=64, help="part B tile overlap in output px")
    ap.add_argument("--steps", type=int, default=1, help="part B sampling steps")
    ap.add_argument(
        "--timing-tiles",
        default=None,
        help="part B tiled vs untiled: TILE:OVERLAP px pairs, comma-separated (default --tile:--overlap); the first "
        "is the goal figure",
    )
    ap.add_argument("--c-resolution", type=int, default=512)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the parts of an existing --json report that this run does not measure (run parts separately)",
    )
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds per part B child process")
    ap.add_argument("--no-b-timing", action="store_true", help="part B: the memory sweep only (no tiled vs untiled)")
    ap.add_argument("--note", default=None, help="a note on this run, printed above its tables in the README")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    if args.child:
        print(json.dumps(child_sampler(json.loads(args.child))), flush=True)
        return
    report: dict[str, Any] = {"schema": SCHEMA_VERSION, "machine": machine_info(), "max_spread": args.max_spread}
    if args.gpu:
        import torch

        dtypes = (args.dtypes or ("fp16,bf16" if torch.cuda.is_available() else "fp32")).split(",")
        print(f"GPU mode ({args.gpu_scale}, {dtypes})", flush=True)
        report["GPU"] = part_gpu(args.gpu_scale, dtypes, args.threads)
    else:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]  # "" = no memory sweep
        parts = {
            "A": (
                "per-step cost of the U-Net call",
                lambda: part_a(args.unet, args.rounds, args.latent, args.max_spread),
            ),
            "B": (
                f"MegaSR Sampler: memory vs output size, tiled vs untiled (tile {args.tile} px)",
                lambda: part_b(
                    sizes,
                    args.tile,
                    args.overlap,
                    args.steps,
                    args.rounds,
                    args.threads,
                    args.max_spread,
                    args.child_timeout,
                    not args.no_b_timing,
                    [tuple(int(v) for v in pair.split(":")) for pair in args.timing_tiles.split(",")]
                    if args.timing_tiles
                    else None,
                ),
            ),
            "C": ("guidance extraction time per map", lambda: part_c(args.rounds, args.c_resolution)),
        }
        if args.merge and args.json and args.json.exists():
            old = json.loads(args.json.read_text())
            report.update({k: v for k, v in old.items() if k in parts and k not in args.parts})
            report["parts_measured"] = old.get("parts_measured", {})
        report.setdefault("parts_measured", {})
        if args.note:
            report["note"] = args.note
        for key, (title, fn) in parts.items():
            if key not in args.parts:
                continue
            print(f"{key}  {title}", flush=True)
            t0 = time.perf_counter()
            report[key] = fn()
            report["parts_measured"][key] = {
                "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "wall_s": round(time.perf_counter() - t0, 1),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "commit": report["machine"].get("commit"),
            }
    for line in summary_lines(report):
        print(line)
    text = json.dumps(report, indent=1, allow_nan=False)  # a NaN/Infinity is a bug, never a figure
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
