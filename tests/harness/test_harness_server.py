"""The pack in the real ComfyUI server over HTTP and WebSocket (one server for the session)."""

from __future__ import annotations

import io
import uuid
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness import workflow
from harness.paths import PACK_NAME, REPO_ROOT

pytestmark = pytest.mark.server

COLOR_FIX = REPO_ROOT / "workflows" / "megasr_color_fix.json"


def test_object_info_lists_the_pack_like_in_process(comfy_server: Any, object_info: dict[str, Any]) -> None:
    remote = comfy_server.object_info()
    ours = sorted(name for name in remote if name.startswith("MegaSR"))
    assert "MegaSRColorFix" in ours
    assert ours == sorted(name for name in object_info if name.startswith("MegaSR"))
    for name in ours:  # the converter may use either source: same inputs, order, outputs
        assert _shape(remote[name]) == _shape(object_info[name]), name


def _shape(info: dict[str, Any]) -> Any:
    """A node definition without the combo option lists (those list files, which differ per process)."""
    import json

    info = json.loads(json.dumps(info))
    for section in info.get("input", {}).values():
        for name, spec in section.items():
            if isinstance(spec[0], list):
                spec[0] = "COMBO"
            if len(spec) > 1 and isinstance(spec[1], dict):
                spec[1].pop("options", None)
                spec[1].pop("default", None)
            section[name] = spec
    return info


def test_extension_js_is_served(comfy_server: Any) -> None:
    listed = comfy_server.get_json("/extensions")
    url = f"/extensions/{PACK_NAME}/megasr.js"
    assert url in listed
    assert b"registerExtension" in comfy_server.request(url)


def test_workflows_are_in_the_templates_browser(comfy_server: Any) -> None:
    templates = comfy_server.get_json("/workflow_templates")
    assert "megasr_color_fix" in templates.get(PACK_NAME, [])
    served = comfy_server.request(f"/api/workflow_templates/{PACK_NAME}/megasr_color_fix.json")
    assert served == COLOR_FIX.read_bytes()


def test_color_fix_workflow_over_http(comfy_server: Any) -> None:
    prompt = workflow.to_api(workflow.load_workflow(COLOR_FIX), comfy_server.object_info())
    prefix = f"http_{uuid.uuid4().hex[:8]}"
    workflow.set_inputs(prompt, {"3.mode": "wavelet", "SaveImage.filename_prefix": prefix})
    prompt_id = comfy_server.queue(prompt)
    entry = comfy_server.wait(prompt_id, timeout=180)
    [image] = entry["outputs"]["4"]["images"]
    assert image["filename"].startswith(prefix)
    png = Image.open(io.BytesIO(comfy_server.view(image)))
    assert png.size == (256, 192) and png.mode == "RGB"
    arr = np.asarray(png, dtype=np.float32) / 255.0
    assert arr.std() > 0.05
    comfy_server.wait_event("execution_success", prompt_id)
    kinds = [m["type"] for m in comfy_server.events(prompt_id)]
    assert "execution_start" in kinds and "executed" in kinds


def test_bad_prompt_is_refused_with_node_errors(comfy_server: Any) -> None:
    prompt = workflow.to_api(workflow.load_workflow(COLOR_FIX), comfy_server.object_info())
    del prompt["3"]["inputs"]["reference"]
    with pytest.raises(Exception, match="reference"):
        comfy_server.queue(prompt)
