"""scripts/tools/benchmark.py at a CI size: every part runs, the JSON has its schema, every ratio carries its spread.

Catches a benchmark that rots (a changed node input, a moved fixture), a ratio printed without its spread,
a "too noisy" ratio that still claims a number, and a README table that is not generated from the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench_stats import goal_verdict, median_ci_ranks, ratio_summary, with_goal
from harness.paths import REPO_ROOT

BENCH = REPO_ROOT / "scripts" / "tools" / "benchmark.py"
RATIO_KEYS = {"ratio", "median", "ci_low", "ci_high", "min", "max", "spread", "max_spread", "rounds", "verdict"}


def test_ratio_summary_is_the_median_of_paired_rounds_with_its_interval_and_refuses_noise() -> None:
    """Nine per-round ratios: median, the 2nd and 8th smallest as its 95 % interval, min..max beside it.

    Catches a spread taken from min..max (one disturbed round would mark any run noisy, so more rounds
    could never help), an interval from the wrong ranks, unpaired rounds, and a goal called met while part
    of the interval is above it.
    """
    per_round = [1.10, 1.02, 1.60, 1.08, 1.05, 1.07, 0.70, 1.12, 1.04]  # two disturbed rounds: 1.60, 0.70
    s = ratio_summary([2 * r for r in per_round], [2.0] * 9, max_spread=0.25)
    assert (s["median"], s["ci_low"], s["ci_high"], s["min"], s["max"]) == (1.07, 1.02, 1.12, 0.7, 1.6)
    assert (s["spread"], s["verdict"], s["ratio"]) == (round(0.10 / 1.07, 3), "ok", 1.07)
    assert goal_verdict(s, 1.15) == "met" and goal_verdict(s, 1.10) == "undecided"
    assert goal_verdict(s, 1.0) == "missed"
    assert with_goal(s, 1.15)["goal_verdict"] == "met"
    noisy = ratio_summary([2 * r for r in per_round], [2.0] * 9, max_spread=0.05)
    assert noisy["ratio"] is None and noisy["verdict"] == "too noisy" and noisy["median"] == 1.07
    assert goal_verdict(noisy, 1.15) == "undecided"
    # too few rounds for a 95 % interval: no number
    assert ratio_summary([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])["verdict"] == "too noisy"
    # pairing matters: the ratio of medians here would be 9.0 / 1.0, the per-round median is 1.0
    assert ratio_summary([1.0, 2.0, 9.0, 3, 4, 5], [1.0, 2.0, 9.0, 3, 4, 5])["ratio"] == 1.0
    assert [median_ci_ranks(n) for n in (5, 6, 9, 12, 17)] == [None, (1, 6), (2, 8), (3, 10), (5, 13)]
    with pytest.raises(ValueError):
        ratio_summary([1.0], [1.0, 2.0])


def _readme_script():
    spec = importlib.util.spec_from_file_location("update_readme_perf", REPO_ROOT / "scripts" / "update_readme_perf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_perf_block_is_what_the_committed_json_generates() -> None:
    """README's performance block == update_readme_perf.py run on the committed docs/benchmark JSON.

    Catches a hand-typed or hand-edited figure, a JSON re-measured without regenerating the README (or the
    reverse), and a CI-sized run committed as the project's figures (the committed run must be full size:
    the SD-2-base U-Net in part A, every ratio with its spread, part B's 512..4096 px each measured or its
    failure recorded).
    """
    script = _readme_script()
    paths = script.committed_reports()
    assert paths and paths[0].name == "cpu.json", "docs/benchmark/cpu.json (the CPU run) must be committed"
    reports = [json.loads(p.read_text()) for p in paths]
    block = script.readme_block((REPO_ROOT / "README.md").read_text())
    assert block == "\n" + script.render(reports), "README perf block is stale: run scripts/update_readme_perf.py"
    cpu = reports[0]
    assert cpu["A"]["unet"] == "sd2" and cpu["A"]["params_M"]["unet"] > 800, cpu["A"]["params_M"]
    for s in cpu["A"]["time_ratio"].values():
        _check_ratio(s)
    assert set(cpu["parts_measured"]) == {"A", "B", "C"}
    sizes = []
    for rep in reports:
        if "B" not in rep:
            continue
        timing = rep["B"]["timing"]
        if "error" not in timing and "skipped" not in timing:  # a failure is recorded as such, never a number
            assert timing["tiles"] == 4
            assert timing["overlap"] == 128  # the goal figure is at the node's default overlap
            for t in [timing, *rep["B"].get("timing_more", [])]:
                _check_ratio(t["tiled_over_untiled"])
                assert t["tiled_over_untiled"]["goal_verdict"] in {"met", "missed", "undecided"}
        sizes += [r.get("size", r.get("spec", {}).get("size")) for r in rep["B"]["memory"]]
    assert {512, 1024, 2048, 4096} <= set(sizes), sizes  # every size measured or its failure recorded
    memory = [r for rep in reports for r in rep.get("B", {}).get("memory", [])]
    assert any(r.get("size") == 512 and r["sampler_peak_MB"] > 0 for r in memory), memory
    assert cpu["A"]["time_ratio"]["full_over_unet_plus_controlnet"]["goal"] == 1.15


def _check_ratio(s: dict) -> None:
    assert RATIO_KEYS <= s.keys(), s
    assert s["min"] <= s["ci_low"] <= s["median"] <= s["ci_high"] <= s["max"]
    assert (s["verdict"] == "ok") == (s["ratio"] is not None)


def _run(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"bench_{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args, "--json", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_part_runs_at_ci_size_and_feeds_the_readme(tmp_path: Path) -> None:
    cpu = _run(
        "--parts ABC --unet tiny --latent 8 --rounds 2 --sizes 64,128 --tile 64 --overlap 16 --steps 2 "
        "--timing-tiles 64:16,64:8 "
        "--c-resolution 64".split(),
        tmp_path,
    )
    gpu = _run(["--gpu", "--gpu-scale", "tiny"], tmp_path)
    assert cpu["schema"] == gpu["schema"] == 1
    assert cpu["machine"]["torch_threads"] == 1

    a = cpu["A"]
    for s in a["time_ratio"].values():
        _check_ratio(s)
    assert a["gflops"]["plain"] < a["gflops"]["controlnet"] < a["gflops"]["full"]
    assert a["extra_cost_breakdown"]["cism_image_attention"]["flop_share_of_extra"] > 0
    for part in ("cism_image_attention", "msgam_saft_and_projection"):
        br = a["extra_cost_breakdown"][part]
        # MS-GAM's null-map contribution runs even without maps, so its removal may save no FLOPs
        assert 0 <= br["flop_share_of_extra"] <= 1
        if br["time_share_of_extra"] is not None:
            _check_ratio(br["time_share_of_extra"])

    b = cpu["B"]
    assert [r["size"] for r in b["memory"]] == [64, 128] and all(r["peak_MB"] >= 0 for r in b["memory"])
    _check_ratio(b["timing"]["tiled_over_untiled"])
    _check_ratio(b["timing"]["tiled_over_untiled_per_step"])  # from the progress events of the later steps
    assert b["timing"]["tiles"] == 4 and b["timing"]["output_px"] == 2 * 64 - 16
    assert [t["output_px"] for t in b["timing_more"]] == [2 * 64 - 8]
    assert b["timing"]["tiled_over_untiled"]["goal"] == 1.25 and "goal_verdict" in b["timing"]["tiled_over_untiled"]
    assert {r["map"] for r in cpu["C"]} == {"hed (real size)", "depth (tiny)", "seg (tiny)", "clip (tiny)"}

    rows = gpu["GPU"]["rows"]
    assert [r["output"] for r in rows] == ["64x64", "96x64"], rows
    assert all(r["wall_s"] > 0 and r["per_step_s"] is not None and r["per_step_s"] > 0 for r in rows), rows

    readme = tmp_path / "README.md"
    shutil.copyfile(REPO_ROOT / "README.md", readme)
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "update_readme_perf.py"), "--readme", str(readme)]
        + [str(p) for p in sorted(tmp_path.glob("bench_*.json"))],
        check=True,
    )
    text = readme.read_text()
    block = text.split("<!-- perf:begin -->")[1].split("<!-- perf:end -->")[0]
    assert f"| plain SD-2 U-Net | {a['gflops']['plain']} | {a['median_s']['plain']} | 1 |" in block
    full = a["time_ratio"]["full_over_unet_plus_controlnet"]
    if full["verdict"] == "ok":
        assert f"{full['ratio']:.2f}x** (95 % CI {full['ci_low']:.2f}..{full['ci_high']:.2f}" in block
    else:  # --rounds 2: too few for an interval, and the README says so instead of a number
        assert full["rounds"] == 2 and "too few rounds (2) for a 95 % interval" in block
    assert "No CUDA machine has run the GPU mode yet" in block  # the tiny GPU-mode run is not a GPU figure
    assert text.split("<!-- perf:begin -->")[0] == (REPO_ROOT / "README.md").read_text().split("<!-- perf:begin -->")[0]
