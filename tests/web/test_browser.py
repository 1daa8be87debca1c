"""The real frontend in Debian chromium: each shipped workflow loads with no missing node, queues, shows its image.

The shipped workflows name real model files (e.g. an SD-2 checkpoint). Before queueing, the test points
their widgets at the tiny generated fixtures: the same substitutions the in-process workflow tests make
(``megasr_fixtures.prompt`` when that helper exists, else the tiny checkpoint for CheckpointLoaderSimple),
computed as the difference between the converted workflow and the substituted prompt and applied to the
widgets in the page. The fixture inputs are copied into the server's input folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from harness import comfy, workflow
from harness.paths import REPO_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

SHIPPED = sorted((REPO_ROOT / "workflows").glob("*.json"))
DATA = Path(__file__).resolve().parents[1] / "harness" / "data"

#: Expected output image sizes per shipped workflow (the example input is 128 x 96).
EXPECTED_SIZES = {"megasr_color_fix": (256, 192)}


def _explain(report: dict[str, Any]) -> str:
    names = ("error", "missing", "missing_dialog", "page_errors", "output_nodes", "centered_on", "screenshot", "stderr")
    keep = {k: report.get(k) for k in names}
    return json.dumps(keep, indent=1)[:4000]


def _fixture_prompt(name: str, base: dict, runner: comfy.ComfyRunner, ckpt: str, info: dict) -> dict:
    if name == "seesr_x4":  # tiny SeeSR- and RAM-layout files (tests/fixtures/seesr_fixtures.py)
        import seesr_fixtures

        return seesr_fixtures.seesr_prompt(seesr_fixtures.seesr_env(runner, ckpt, info))
    try:
        import megasr_fixtures
    except ImportError:
        megasr_fixtures = None
    if megasr_fixtures is not None and hasattr(megasr_fixtures, "megasr_env") and name != "megasr_color_fix":
        env = megasr_fixtures.megasr_env(runner, ckpt, info)
        return megasr_fixtures.prompt(env, name)
    overrides = {f"{nid}.ckpt_name": ckpt for nid in workflow.find_nodes(base, "CheckpointLoaderSimple")}
    return workflow.set_inputs(json.loads(json.dumps(base)), overrides)


def _widget_overrides(base: dict, target: dict) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for nid, node in target.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                continue
            if base.get(nid, {}).get("inputs", {}).get(name) != value:
                out.setdefault(nid, {})[name] = value
    return out


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_workflow_in_the_browser(
    path: Path,
    run_browser: Any,
    comfy_server: Any,
    comfy_runner: comfy.ComfyRunner,
    tiny_sd2_ckpt: str,
    object_info: dict,
    tmp_path: Path,
) -> None:
    base = workflow.to_api(workflow.load_workflow(path), comfy_server.object_info())
    target = _fixture_prompt(path.stem, base, comfy_runner, tiny_sd2_ckpt, object_info)
    comfy_runner.validate(target)  # runnable with the fixtures, else this says why
    import folder_paths

    for f in Path(folder_paths.get_input_directory()).iterdir():
        if f.is_file():
            shutil.copyfile(f, comfy_server.input_dir / f.name)
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps(_widget_overrides(base, target)))

    report = run_browser(path, "--queue", "--overrides", str(overrides))
    assert report["missing"] == [] and not report["missing_dialog"], _explain(report)
    assert "MegaSR.Core" in report["extensions"]
    assert not [e for e in report["page_errors"] if "megasr" in e.lower()], report["page_errors"]
    assert report["ok"], _explain(report)
    # What the frontend queued is exactly what our converter produces from the file plus the overrides.
    assert report["prompt"] == workflow.to_api(workflow.load_workflow(path), comfy_server.object_info()) | {
        nid: {**base[nid], "inputs": {**base[nid]["inputs"], **vals}}
        for nid, vals in _widget_overrides(base, target).items()
    }
    assert report["images"], _explain(report)
    if path.stem in EXPECTED_SIZES:
        assert {(i["width"], i["height"]) for i in report["images"]} == {EXPECTED_SIZES[path.stem]}


@pytest.mark.parametrize("case", ["frontend_case", "frontend_subgraph_case"])
def test_recorded_frontend_case_still_matches_the_frontend(case: str, run_browser: Any) -> None:
    """The converter's recorded references (Reroute, PrimitiveNode, bypass, mute, Note; a subgraph),
    re-checked live: the frontend still queues exactly the recorded prompt."""
    recorded = json.loads((DATA / f"{case}.json").read_text())
    report = run_browser(DATA / f"{case}_workflow.json")
    assert report["ok"], _explain(report)
    assert report["prompt"] == recorded["frontend_prompt"]


def test_a_missing_node_is_reported(run_browser: Any, tmp_path: Path) -> None:
    """The check is not vacuous: an unknown node type is flagged (red node and the missing-nodes dialog)."""
    wf = json.loads((REPO_ROOT / "workflows" / "megasr_color_fix.json").read_text())
    for node in wf["nodes"]:
        if node["type"] == "MegaSRColorFix":
            node["type"] = "MegaSRDoesNotExist"
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(wf))
    report = run_browser(path, "--queue")
    assert not report["ok"]
    assert report["missing"] == ["MegaSRDoesNotExist"] and report["missing_dialog"], _explain(report)
    assert Path(report["screenshot"]).name == "failure.png" and Path(report["screenshot"]).is_file()


def test_the_templates_browser_opens_and_runs_our_workflow(run_browser: Any) -> None:
    """A user's path: Templates -> EXTENSIONS -> ComfyUI-MegaSR -> megasr_color_fix, then Run."""
    report = run_browser(None, "--template", "megasr_color_fix", "--queue")
    assert report["ok"], _explain(report)
    listed = report["template"]["listed"]
    for shipped in SHIPPED:
        assert shipped.stem in listed
    expected = ["ImageScaleBy", "LoadImage", "MegaSRColorFix", "Note", "SaveImage"]
    assert sorted(report["template"]["loaded"]) == expected
    assert {(i["width"], i["height"]) for i in report["images"]} == {EXPECTED_SIZES["megasr_color_fix"]}
