"""The map workbench (web/megasr.js) in the real frontend, driven with real mouse strokes (tests/browser/workbench.mjs).

What each check catches:
- seg: a "sky" stroke saves exactly the palette colour on the stroke and the original colours everywhere else
  (a shifted stroke, anti-aliased edges, a colour-managed export, a resampled map all fail it);
- depth / HED: a stroke changes the saved map only within the brush of the stroke, by the amount asked;
- undo gives the original back bit for bit, redo the edit;
- the edit is wired in: a MegaSR Edited Map node after the map node, its consumers moved onto it, and the re-run
  saves exactly the edited file (the run uses the edit); on megasr_x4 the MS-GAM seg input differs from the
  extracted map exactly where painted;
- gallery lists every map of the last run; compare shows the result beside torch's bicubic upscale of the LR;
- both with Nodes 2.0 off and on; a reloaded page with the saved workflow still has the edit wired in;
- the newest frontend (comfyui-frontend-package 1.58, main.py --front-end-root) passes the same edit-every-map checks.
Screenshots go into docs/images/ when MEGASR_UPDATE_SCREENSHOTS=1 (README links them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import comfy, workflow
from harness.paths import REPO_ROOT, cache_dir
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

DRIVER = REPO_ROOT / "tests" / "browser" / "workbench.mjs"
DOC_IMAGES = REPO_ROOT / "docs" / "images"
NEWEST_FRONTEND = REPO_ROOT / ".cache" / "frontend-newest" / "unpacked" / "comfyui_frontend_package" / "static"
SKY = [6, 230, 230]

# megasr_guidance_maps: 3 = HED, 5 = depth, 7 = seg map nodes; 8/9/10 their Save Image nodes
EDITS = [
    {"node": 7, "kind": "seg", "cls": "sky", "tool": "brush", "size": 6, "from": [20, 30], "to": [60, 30]},
    {"node": 5, "kind": "depth", "tool": "nearer", "size": 10, "hardness": 0.8, "from": [30, 60], "to": [90, 60]},
    {"node": 3, "kind": "hed", "tool": "draw", "size": 2, "hardness": 0.8, "from": [10, 80], "to": [110, 80]},
]
SAVE_OF = {7: 10, 5: 9, 3: 8}


def _overrides(name: str, comfy_runner: comfy.ComfyRunner, ckpt: str, info: dict, base: dict, **extra: Any) -> dict:
    import megasr_fixtures
    from test_browser import _widget_overrides

    env = megasr_fixtures.megasr_env(comfy_runner, ckpt, info)
    return _widget_overrides(base, megasr_fixtures.prompt(env, name, **extra))


def _copy_inputs(dest: Path) -> None:
    import folder_paths

    for f in Path(folder_paths.get_input_directory()).iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)


def _drive(server: Any, plan: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(plan))
    cmd = ["node", str(DRIVER), "--url", server.url, "--out", str(out), "--plan", str(plan_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report_path = out / "report.json"
    assert report_path.is_file(), f"driver wrote no report (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert report["ok"], json.dumps({k: report.get(k) for k in ("error", "page_errors", "console_errors", "steps")})[
        :6000
    ]
    assert not [e for e in report["page_errors"] if "megasr" in e.lower()], report["page_errors"]
    return report


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _run_file(server: Any, image: dict) -> Path:
    # main.py --temp-directory X puts the temp folder at X/temp
    base = {"output": server.output_dir, "temp": server.temp_dir / "temp", "input": server.input_dir}
    return Path(base[image.get("type", "output")]) / image.get("subfolder", "") / image["filename"]


def _dist_to_segment(h: int, w: int, a: list[int], b: list[int]) -> np.ndarray:
    """Distance of every pixel centre to the segment between the centres of pixels a and b."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    ax, ay, bx, by = a[0] + 0.5, a[1] + 0.5, b[0] + 0.5, b[1] + 0.5
    t = np.clip(((xs - ax) * (bx - ax) + (ys - ay) * (by - ay)) / max((bx - ax) ** 2 + (by - ay) ** 2, 1e-9), 0, 1)
    return np.hypot(xs - (ax + t * (bx - ax)), ys - (ay + t * (by - ay)))


def _check_edit(edit: dict, original: np.ndarray, saved: np.ndarray) -> None:
    assert saved.shape == original.shape
    h, w, _ = saved.shape
    d = _dist_to_segment(h, w, edit["from"], edit["to"])
    r = edit["size"] / 2
    changed = (saved != original).any(axis=-1)
    assert changed.any(), f"{edit['kind']}: the stroke changed nothing"
    assert d[changed].max() <= r + 0.75, f"{edit['kind']}: pixels changed outside the brush"
    on_line = d <= 0.5
    if edit["kind"] == "seg":
        assert (saved[changed] == SKY).all(), "seg: a painted pixel is not exactly the sky colour"
        assert (saved[d <= r - 1] == SKY).all(), "seg: a pixel inside the brush is not sky"
    elif edit["kind"] == "depth":
        want = np.clip(original[..., 0] + 38, 0, 255)  # nearer by 0.15 * 255 at full brush weight
        assert (saved[on_line][:, 0] == want[on_line]).all(), "depth: not pushed nearer by the amount on the stroke"
        assert (saved[changed][:, 0] >= original[changed][:, 0]).all(), "depth: 'nearer' made a pixel farther"
    else:
        assert (saved[on_line] == 255).all(), "hed: the drawn edge is not white"
    if edit["kind"] != "seg":
        assert (saved[..., 0] == saved[..., 1]).all() and (saved[..., 1] == saved[..., 2]).all(), "gray map not gray"


def _check_guidance_report(report: dict, server: Any, vue: bool) -> None:
    assert report["vue_nodes"] is vue
    assert "MegaSR.MapWorkbench" in report["extensions"] and "MegaSR.Core" in report["extensions"]
    edits = {s["node"]: s for s in report["steps"] if s["name"] == "edit"}
    assert set(edits) == {7, 5, 3}
    for spec in EDITS:
        got = edits[spec["node"]]
        assert "Edit map (MegaSR)" in got["menu"]
        if not vue:  # classic canvas: the frontend's own node menu carries the item
            assert "Edit map (MegaSR)" in got["native_menu"], got["native_menu"]
        assert got["has_lr"], "the LR image is not shown beneath the map"
        assert got["after_undo_equals_original"] and got["after_redo_equals_edit"]
        original = _rgb(_run_file(server, report["first_run"][str(spec["node"])][0]))
        saved_path = server.input_dir / got["saved"]
        assert got["saved"].startswith("megasr_edits/") and saved_path.is_file()
        saved = _rgb(saved_path)
        _check_edit(spec, original, saved)
        wiring = got["wiring"]
        # node ids are numbers on the pinned frontend and strings on 1.58 (litegraph's NodeId is number | string)
        assert wiring["type"] == "MegaSREditedMap" and str(wiring["original_from"]) == str(spec["node"])
        assert {k: wiring["widgets"][k] for k in ("kind", "image")} == {"kind": spec["kind"], "image": got["saved"]}
        assert [str(SAVE_OF[spec["node"]]), "images"] in [[str(n), name] for n, name in wiring["targets"]]
        # the re-run saved exactly the edited file: the graph uses the edit
        rerun = _run_file(server, report["second_run"][str(SAVE_OF[spec["node"]])][0])
        assert np.array_equal(_rgb(rerun), saved)
        if spec["kind"] == "seg":
            assert got["visible_classes"][:2] == ["sky", "skyscraper"] and "sky (2)" in got["current_class"]
            assert "sky" in got["hover"]
    # the re-run answered the map nodes from the server's cache: their maps are still the last run's
    for nid in SAVE_OF:
        assert report["second_run"].get(str(nid)) == report["first_run"][str(nid)], f"map node {nid} left the last run"
    kinds = sorted(c["kind"] for c in report["gallery"])
    assert kinds == ["depth", "depth", "hed", "hed", "seg", "seg"], report["gallery"]  # 3 extracted + 3 edited
    assert "Guidance maps of the last run (MegaSR)" in report["canvas_menu"]
    # reloaded page, saved workflow opened again: the edit is still wired in and re-opens in the editor
    seg = edits[7]
    prompt = report["reloaded_prompt"]
    node = prompt[str(seg["edited_node"])]
    assert node["class_type"] == "MegaSREditedMap" and node["inputs"]["image"] == seg["saved"]
    assert prompt["10"]["inputs"]["images"] == [str(seg["edited_node"]), 0]
    hed = edits[3]
    assert report["reopened"]["kind"] == "hed" and "megasr_edits" in report["reopened"]["url"]
    assert hed["saved"].rsplit("/", 1)[-1] in report["reopened"]["url"].replace("%20", " ").replace("+", " ")


def _guidance_plan(comfy_server: Any, comfy_runner: comfy.ComfyRunner, ckpt: str, info: dict, vue: bool, shots: bool):
    path = REPO_ROOT / "workflows" / "megasr_guidance_maps.json"
    base = workflow.to_api(workflow.load_workflow(path), comfy_server.object_info())
    mode = "vue" if vue else "classic"
    # an LR file and prefixes per mode, so neither run is answered from the other's cache: a cached map node is
    # not executed again, and a fresh page would never see its images (the first run waits for them)
    _copy_inputs(comfy_server.input_dir)
    lr = f"wb_{mode}_lr.png"
    shutil.copyfile(REPO_ROOT / "workflows" / "input" / "megasr_example_lr.png", comfy_server.input_dir / lr)
    ov = _overrides("megasr_guidance_maps", comfy_runner, ckpt, info, base, **{"LR image.image": lr})
    for sid in SAVE_OF.values():
        ov.setdefault(str(sid), {})["filename_prefix"] = f"wb_{mode}_{sid}"
    edits = [dict(e) for e in EDITS]
    if shots:
        for e in edits:
            e["shot"] = f"workbench_{e['kind']}.png"
    return {
        "workflow": str(path),
        "overrides": ov,
        "vue": vue,
        "edits": edits,
        "wait": list(SAVE_OF.values()),
        "gallery": True,
        "gallery_shot": "workbench_gallery.png" if shots else None,
        "reload": True,
    }


def _keep_screenshots(out: Path) -> None:
    if os.environ.get("MEGASR_UPDATE_SCREENSHOTS") != "1":
        return
    DOC_IMAGES.mkdir(parents=True, exist_ok=True)
    for f in out.glob("workbench_*.png"):
        shutil.copyfile(f, DOC_IMAGES / f.name)


@pytest.mark.parametrize(
    "vue",
    [False, True],
    ids=["classic", "nodes2"],
)
def test_edit_every_map_and_run(
    vue: bool,
    run_browser: Any,
    comfy_server: Any,
    comfy_runner: comfy.ComfyRunner,
    tiny_sd2_ckpt: str,
    object_info: dict,
    tmp_path: Path,
) -> None:
    plan = _guidance_plan(comfy_server, comfy_runner, tiny_sd2_ckpt, object_info, vue, shots=not vue)
    report = _drive(comfy_server, plan, tmp_path / "wb")
    _check_guidance_report(report, comfy_server, vue)
    if not vue:
        _keep_screenshots(tmp_path / "wb")


@pytest.mark.parametrize("vue", [False, True], ids=["classic", "nodes2"])
def test_compare_slider_against_bicubic(
    vue: bool, run_browser: Any, comfy_server: Any, comfy_runner: comfy.ComfyRunner, tmp_path: Path
) -> None:
    """megasr_color_fix (x2), Nodes 2.0 off and on: the compare dialog shows the result and torch's bicubic upscale
    of the LR, split at the slider (a resampled "before", a missing image or a slider that moves nothing fail)."""
    import base64
    import io

    import torch

    path = REPO_ROOT / "workflows" / "megasr_color_fix.json"
    wf = workflow.load_workflow(path)
    save = next(n["id"] for n in wf["nodes"] if n["type"] == "SaveImage")
    _copy_inputs(comfy_server.input_dir)
    plan = {
        "workflow": str(path),
        "overrides": {str(save): {"filename_prefix": f"wb_compare_{'vue' if vue else 'classic'}"}},
        "vue": vue,
        "edits": [],
        "wait": [save],
        "queue_after": False,
        "compare": {"node": save, "shot": None if vue else "workbench_compare.png"},
    }
    report = _drive(comfy_server, plan, tmp_path / "cmp")
    assert report["vue_nodes"] is vue
    c = report["compare"]
    assert c["bicubic_size"] == c["result_size"] == [256, 192]
    assert c["clip"].replace(" ", "") == "inset(0px70%0px0px)" or c["clip"].replace(" ", "") == "inset(070%00)"
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(c["bicubic_png"].split(",", 1)[1]))).convert("RGB"))
    lr = torch.from_numpy(_rgb(REPO_ROOT / "workflows" / "input" / "megasr_example_lr.png").astype(np.float32))
    ref = torch.nn.functional.interpolate(
        lr.permute(2, 0, 1)[None], size=(192, 256), mode="bicubic", align_corners=False
    )
    ref = ref[0].permute(1, 2, 0).clamp(0, 255).round().numpy()
    assert np.abs(shown.astype(np.float32) - ref).max() <= 1.0, "the 'before' image is not a bicubic upscale of the LR"
    _keep_screenshots(tmp_path / "cmp")


@pytest.mark.xfail(
    strict=False,
    reason="finding after issue 25's RAM prompt in megasr_swap_guidance/megasr_x4: the workbench driver's queue "
    "never finishes (frontend 'Cannot read properties of undefined (reading id)' on load); not yet diagnosed",
)
def test_the_edit_reaches_ms_gam(
    run_browser: Any,
    comfy_server: Any,
    comfy_runner: comfy.ComfyRunner,
    tiny_sd2_ckpt: str,
    object_info: dict,
    tmp_path: Path,
) -> None:
    """megasr_x4: after a sky stroke on the seg map, MS-GAM's seg input is the edited map, which differs from the
    extracted map exactly at the stroke (re-computed in-process from the prompt the frontend queued), and the full
    graph runs with it in the browser."""
    import folder_paths

    path = REPO_ROOT / "workflows" / "megasr_x4.json"
    base = workflow.to_api(workflow.load_workflow(path), comfy_server.object_info())
    ov = _overrides("megasr_x4", comfy_runner, tiny_sd2_ckpt, object_info, base)
    ov.setdefault("11", {})["filename_prefix"] = "wb_x4"
    _copy_inputs(comfy_server.input_dir)
    edit = {"node": 17, "kind": "seg", "cls": "sky", "tool": "brush", "size": 3, "from": [2, 5], "to": [9, 5]}
    plan = {"workflow": str(path), "overrides": ov, "edits": [edit], "wait": [11]}
    report = _drive(comfy_server, plan, tmp_path / "x4")
    step = next(s for s in report["steps"] if s["name"] == "edit")
    prompt = report["edited_prompt"]
    eid = str(step["edited_node"])
    assert prompt["18"]["inputs"]["seg"] == [eid, 0] and prompt[eid]["inputs"]["original"] == ["17", 0]
    assert report["second_run"]["11"], "the full graph did not run with the edit"

    # in-process: the two maps MS-GAM could get, from the queued prompt
    dest = Path(folder_paths.get_input_directory()) / step["saved"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(comfy_server.input_dir / step["saved"], dest)
    keep = {k: v for k, v in prompt.items() if k in {"4", "16", "17", eid}}
    keep["90"] = {"class_type": "SaveImage", "inputs": {"images": [eid, 0], "filename_prefix": "wb_msgam_edit"}}
    keep["91"] = {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": "wb_msgam_orig"}}
    result = comfy_runner.run(keep)
    edited, extracted = _rgb(result.images("90")[0]), _rgb(result.images("91")[0])
    _check_edit(edit, extracted, edited)
    assert np.array_equal(edited, _rgb(comfy_server.input_dir / step["saved"]))


@pytest.fixture(scope="module")
def newest_frontend_server(tmp_path_factory: pytest.TempPathFactory, comfy_server: Any) -> Any:
    if not (NEWEST_FRONTEND / "index.html").is_file():
        if os.environ.get("CI"):
            pytest.fail("the newest frontend is not installed (bash scripts/setup.sh --browser)")
        pytest.skip("the newest frontend is not installed (bash scripts/setup.sh --browser)")
    from harness.server import ComfyServer, fixture_model_paths

    work = tmp_path_factory.mktemp("comfy_server_newest_fe")
    srv = ComfyServer(
        work, model_paths=fixture_model_paths(cache_dir()), extra_args=["--front-end-root", str(NEWEST_FRONTEND)]
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_newest_frontend_edit_every_map(
    run_browser: Any,
    newest_frontend_server: Any,
    comfy_runner: comfy.ComfyRunner,
    tiny_sd2_ckpt: str,
    object_info: dict,
    tmp_path: Path,
) -> None:
    """The whole workbench on comfyui-frontend-package 1.58 (classic canvas), checked as on the pinned one: seg,
    depth and HED strokes exact where painted and nowhere else, undo/redo, wiring, the re-run uses every edit,
    gallery, reload + re-open. Catches a hook or API the newest frontend dropped or changed."""
    srv = newest_frontend_server
    plan = _guidance_plan(srv, comfy_runner, tiny_sd2_ckpt, object_info, False, shots=False)
    report = _drive(srv, plan, tmp_path / "newest")
    assert report["frontend_version"] and report["frontend_version"].startswith("1.58"), report["frontend_version"]
    _check_guidance_report(report, srv, False)
