"""Rewrite README.md's performance tables from scripts/tools/benchmark.py JSON reports (nothing hand-typed).

    .venv/bin/python scripts/update_readme_perf.py                      # from the committed docs/benchmark/*.json
    .venv/bin/python scripts/update_readme_perf.py bench_out/cpu.json [bench_out/gpu.json] [--readme README.md]

The tables go between ``<!-- perf:begin -->`` and ``<!-- perf:end -->``; everything else is left alone.
A ratio the benchmark marked "too noisy" is printed as such, never as a number. The committed reports
(docs/benchmark/cpu.json, cpu_memory_sweep.json, and gpu.json once a CUDA machine has run ``--gpu``) are the README's only source;
tests/tools/test_benchmark.py checks that regenerating from them gives the committed README text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
ROOT = Path(__file__).resolve().parents[1]
#: The committed benchmark reports the README block is generated from, in this order (absent ones skipped):
#: the CPU run, the CPU memory sweep over output sizes (a separate, longer run), the GPU run.
COMMITTED_REPORTS = tuple(ROOT / "docs" / "benchmark" / f"{n}.json" for n in ("cpu", "cpu_memory_sweep", "gpu"))


def committed_reports() -> list[Path]:
    return [p for p in COMMITTED_REPORTS if p.exists()]


def readme_block(text: str) -> str:
    """The text between the perf markers (what :func:`rewrite` writes: a newline, then :func:`render`)."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"no {BEGIN} ... {END} block in the README")
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def _noisy(s: dict[str, Any]) -> str:
    if "ci_low" in s and s.get("rounds", 0) < 6:  # under 6 rounds no 95 % interval of the median exists
        return f"too few rounds ({s.get('rounds')}) for a 95 % interval"
    if s.get("spread") is None:  # median <= 0: no relative spread (older reports wrote Infinity)
        return f"n/a (median {s.get('median')}, no relative spread)"
    return f"too noisy (spread {s['spread']} > {s['max_spread']})"


def _interval(s: dict[str, Any]) -> str:
    """The median's 95 % interval (reports before it was measured carry min..max only)."""
    if "ci_low" in s:
        return f"95 % CI {s['ci_low']:.2f}..{s['ci_high']:.2f}"
    return f"{s['min']:.2f}..{s['max']:.2f}"


def _goal(s: dict[str, Any] | None, goal: float) -> str:
    """The benchmark's verdict on a goal (met only when the whole 95 % interval is at or under it)."""
    if not s or "goal_verdict" not in s:
        return f"goal <= {goal}"
    return f"goal <= {s['goal']}: {s['goal_verdict']}"


def _ratio(s: dict[str, Any] | None) -> str:
    if not s:
        return "n/a"
    if s.get("verdict") != "ok":
        return _noisy(s)
    return f"**{s['ratio']:.2f}x** ({_interval(s)}, {s['rounds']} rounds)"


def _share(s: dict[str, Any] | None) -> str:
    """A fraction of the extra time (median of per-round fractions, min..max); may exceed 1 when removing the
    part saves more than the whole extra over U-Net + ControlNet (the variants are different code paths)."""
    if not s:
        return "n/a"
    if s.get("verdict") != "ok":
        return _noisy(s)
    return f"{s['ratio']:.2f} ({_interval(s)}, {s['rounds']} rounds)"


def _machine(m: dict[str, Any]) -> str:
    dev = m.get("gpu") or f"CPU, {m.get('cpu_count')} cores"
    return f"{dev}; torch {m.get('torch')}, {m.get('torch_threads')} thread(s); {m.get('platform')}"


def part_a_md(a: dict[str, Any]) -> list[str]:
    p, s, g, tr = a["params_M"], a["median_s"], a["gflops"], a["time_ratio"]
    br = a["extra_cost_breakdown"]
    lines = [
        f"**A. Per-step cost of one MegaSR U-Net call** ({a['unet']} U-Net {p['unet']}M + ControlNet "
        f"{p['controlnet']}M + CISM²/MS-GAM {p['cism_msgam']}M parameters, random weights, {a['output_px']} px output "
        f"= {a['latent']}x{a['latent']} latent, batch {a['batch']} = cond + uncond, {a['dtype']}, {a['device']}; "
        "the nodes' code path):",
        "",
        "| | GFLOPs | median time (s) | time ratio (median of per-round ratios, its 95 % interval) |",
        "|---|---|---|---|",
        f"| plain SD-2 U-Net | {g['plain']} | {s['plain']} | 1 |",
        f"| U-Net + plain ControlNet | {g['controlnet']} | {s['controlnet']} | {_ratio(tr['controlnet_over_plain_unet'])} |",
        f"| full MegaSR (ControlNet + CISM² + MS-GAM) | {g['full']} | {s['full']} | "
        f"{_ratio(tr['full_over_plain_unet'])} over the U-Net; {_ratio(tr['full_over_unet_plus_controlnet'])} "
        f"over U-Net + ControlNet ({_goal(tr['full_over_unet_plus_controlnet'], 1.15)}) |",
        "",
        f"FLOP ratios: {a['flop_ratio']['full_over_plain_unet']} over the plain U-Net, "
        f"{a['flop_ratio']['full_over_unet_plus_controlnet']} over U-Net + ControlNet.",
        "",
        "Where the extra cost over U-Net + ControlNet goes (FLOP share exact; time share from paired rounds):",
        "",
        "| part | GFLOPs | FLOP share | time share |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("cism_image_attention", "CISM² image attention"),
        ("msgam_saft_and_projection", "MS-GAM SAFT + projection"),
    ):
        part = br[key]
        lines.append(
            f"| {label} | {part['flops_G']} | {part['flop_share_of_extra']} | {_share(part['time_share_of_extra'])} |"
        )
    lines += [
        "",
        "Once per sampling run (not per step): context build (connector, MS-GAM stage 1, SAFT gamma/beta"
        + (", CISM² image K/V" if "per_run_context_build_gflops" in br else "")
        + f") {br['per_run_context_build_s']} s"
        + (
            f" ({br['per_run_context_build_gflops']} GFLOPs; the first step's extra over a later step)"
            if "per_run_context_build_gflops" in br
            else ""
        )
        + f"; hint and map preparation {br['per_run_hint_and_map_preparation_s']} s.",
    ]
    return lines


def _failed(error: list[str]) -> str:
    text = " ".join(error)
    return text[:200] if text.startswith("not run") else f"failed: {text[:120]}"


def part_b_md(b: dict[str, Any]) -> list[str]:
    if not b["memory"]:  # a timing-only run (--sizes ""): its memory sweep is its own report
        return _timing_md(
            b,
            [
                "**B. MegaSR Sampler node in the real ComfyUI** (shipped `megasr_x4` graph, tiny SD-2 "
                "test checkpoint with TAESD, fresh process per part run)."
            ],
        )
    ok = [r for r in b["memory"] if "error" not in r]
    steps = sorted({r.get("steps", "?") for r in ok}) or ["?"]
    lines = [
        "**B. MegaSR Sampler node in the real ComfyUI** (shipped `megasr_x4` graph, tiny SD-2 test checkpoint with "
        f"TAESD, {'/'.join(map(str, steps))} sampling step(s), fresh process per output size). CPU peak memory = "
        "growth of the process's peak RSS (reset by `clear_refs`): the whole graph (LR load, guidance maps, sampler "
        "with VAE encode/decode, save), then the sampler node alone (same LR, new seed; ComfyUI re-runs only the "
        "sampler and the save). Canvas = the output image as float32 RGB:",
        "",
        "| output | tile / overlap | graph time (s) | graph peak (MB) | sampler time (s) | sampler peak (MB) "
        "| canvas (MB) | sampler peak minus canvas (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in b["memory"]:
        if "error" in r:
            size = r.get("spec", {}).get("size")
            lines.append(f"| {size} px | | {_failed(r['error'])} | | | | | |")
        else:
            lines.append(
                f"| {r['size']} px | {r['tile']} / {r['overlap']} px"
                + (f" ({r['tiles']} tiles)" if "tiles" in r else "")
                + f" | {r['seconds']} | {r['peak_MB']} | "
                f"{r['sampler_seconds']} | {r['sampler_peak_MB']} | {r['canvas_MB']} | "
                f"{r['sampler_peak_minus_canvas_MB']} |"
            )
    flat = b.get("sampler_peak_minus_canvas_ratio_largest_over_smallest")
    if flat is not None:
        lines += ["", f"Sampler peak minus canvas, largest over smallest measured output: {flat}x (goal: flat)."]
    return _timing_md(b, lines)


def _timing_md(b: dict[str, Any], lines: list[str]) -> list[str]:
    lines.append("")
    t = b["timing"]
    if "skipped" in t:
        lines.append(f"Tiled vs untiled: {t['skipped']}.")
        return lines
    if "error" in t:
        lines.append(f"Tiled vs untiled timing failed: {t.get('error')}")
        return lines
    lines += [
        "Tiled vs untiled at equal output, 2 x 2 tiles (the first row is the goal figure: the node's default "
        "128 px overlap), each variant once per round: whole graph (maps cached) and the sampler's later steps "
        "(progress events):",
        "",
        "| output | tile / overlap | tiled cells / untiled | tiled attention / untiled | median graph s (tiled, "
        "untiled) | tiled / untiled, graph | tiled / untiled, per step | tile_batch 4 vs 1 speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [t, *b.get("timing_more", [])]:
        if "error" in r:
            lines.append(f"| | | | | failed: {' '.join(r['error'])[:120]} | | | |")
            continue
        per_step = r.get("tiled_over_untiled_per_step")
        lines.append(
            f"| {r['output_px']} px | {r['tile']} / {r['overlap']} px | {r.get('tiled_cells_over_untiled')} | "
            f"{r.get('tiled_attention_over_untiled', 'n/a')} | {r['median_s']['tiled']}, {r['median_s']['untiled']} | "
            f"{_ratio(r['tiled_over_untiled'])} ({_goal(r['tiled_over_untiled'], 1.25)}) | "
            + (f"{_ratio(per_step)} ({_goal(per_step, 1.25)})" if per_step else "n/a")
            + f" | {_ratio(r.get('tile_batch_speedup'))} |"
        )
    if "note" in t:
        lines += ["", f"Why: {t['note']}."]
    return lines


def part_c_md(c: list[dict[str, Any]]) -> list[str]:
    cells = "; ".join(f"{r['map']} {r['median_s']} s" for r in c)
    return [f"**C. Guidance extraction per map at {c[0]['resolution']} px** (median): {cells}."]


def gpu_md(gpu: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    lines = [
        f"**GPU** ({_machine(machine)}; SD-2-base-sized random weights, real MegaSR Sampler node):",
        "",
        "| case | dtype | output | wall (s) | per step (s) | peak VRAM (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in gpu["rows"]:
        if "error" in r:
            lines.append(f"| {r.get('dtype')} | failed: {r['error']} | | | | |")
        else:
            lines.append(
                f"| {r['case']} | {r['dtype']} | {r['output']} | {r['wall_s']} | {r['per_step_s']} | {r['peak_vram_MB']} |"
            )
    return lines


def render(reports: list[dict[str, Any]]) -> str:
    out: list[str] = []
    gpu_seen = False
    for rep in reports:
        out.append(
            f"Measured by `scripts/tools/benchmark.py` on: {_machine(rep['machine'])}; spread bound {rep['max_spread']}."
        )
        if rep.get("note"):
            out.append(f"Note: {rep['note']}")
        when = rep.get("parts_measured", {})
        if when:
            out.append(
                "Part runs (UTC, wall time, 1/5/15-min load average at the end, commit): "
                + "; ".join(
                    f"{k} {v['utc']}, {v['wall_s']} s, load {'/'.join(map(str, v['load_average']))}, {v.get('commit')}"
                    for k, v in sorted(when.items())
                )
                + "."
            )
        out.append("")
        for key, fn in (("A", part_a_md), ("B", part_b_md), ("C", part_c_md)):
            if key in rep:
                out += fn(rep[key]) + [""]
        if "GPU" in rep and rep["GPU"].get("scale") == "sd2":
            out += gpu_md(rep["GPU"], rep["machine"]) + [""]
            gpu_seen = True
    if not gpu_seen:
        out.append(
            "No CUDA machine has run the GPU mode yet (`scripts/tools/benchmark.py --gpu`), so there is no GPU figure."
        )
    return "\n".join(out).rstrip() + "\n"


def rewrite(readme: Path, reports: list[dict[str, Any]]) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render(reports)}{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="*", type=Path, help="benchmark JSON files (default: the committed ones)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    paths = args.reports or committed_reports()
    if not paths:
        raise SystemExit("no benchmark report given and none committed under docs/benchmark/")
    rewrite(args.readme, [json.loads(p.read_text()) for p in paths])


if __name__ == "__main__":
    main()
