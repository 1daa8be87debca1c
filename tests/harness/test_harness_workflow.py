"""The UI->API converter against the real frontend's own output and the real node definitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness import workflow
from harness.paths import REPO_ROOT

DATA = Path(__file__).parent / "data"
SHIPPED = sorted((REPO_ROOT / "workflows").glob("*.json"))


def test_converter_matches_recorded_frontend(object_info: dict[str, Any]) -> None:
    case = json.loads((DATA / "frontend_case.json").read_text())
    assert workflow.to_api(case["workflow"], object_info) == case["frontend_prompt"]


def test_converter_flattens_subgraphs_like_the_frontend(object_info: dict[str, Any]) -> None:
    case = json.loads((DATA / "frontend_subgraph_case.json").read_text())
    prompt = workflow.to_api(case["workflow"], object_info)
    assert prompt == case["frontend_prompt"]
    assert {"5:2", "5:3"} <= set(prompt)


def test_subgraph_prompt_runs_in_the_executor(comfy_runner: Any, object_info: dict[str, Any]) -> None:
    case = json.loads((DATA / "frontend_subgraph_case.json").read_text())
    prompt = workflow.to_api(case["workflow"], object_info)
    result = comfy_runner.run(prompt)
    [image] = result.images()
    assert image.name.startswith("subgraph_case")


def test_widget_layouts_have_the_frontend_companions(object_info: dict[str, Any]) -> None:
    ks = workflow.widget_layout(object_info["KSampler"])
    assert ks == ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert workflow.widget_layout(object_info["LoadImage"]) == ["image", None]
    assert workflow.widget_layout(object_info["MegaSRColorFix"]) == ["mode"]
    assert workflow.widget_layout(object_info["VAEDecode"]) == []


def test_missing_node_types_are_reported(object_info: dict[str, Any]) -> None:
    case = json.loads((DATA / "frontend_case.json").read_text())
    case["workflow"]["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(workflow.MissingNodeTypes, match="NoSuchNode"):
        workflow.to_api(case["workflow"], object_info)


def test_set_inputs_by_id_type_and_title(object_info: dict[str, Any]) -> None:
    prompt = workflow.to_api(json.loads((DATA / "frontend_case.json").read_text())["workflow"], object_info)
    workflow.set_inputs(prompt, {"7.seed": 5, "CLIPTextEncode.text": "x", "MegaSR Colour Fix.mode": "adain"})
    assert prompt["7"]["inputs"]["seed"] == 5
    assert prompt["2"]["inputs"]["text"] == prompt["3"]["inputs"]["text"] == "x"
    assert prompt["11"]["inputs"]["mode"] == "adain"
    with pytest.raises(workflow.WorkflowError, match="no node"):
        workflow.set_inputs(prompt, {"Nope.seed": 1})
    assert workflow.parse_value("2.5") == 2.5 and workflow.parse_value("wavelet") == "wavelet"


def test_shipped_workflows_exist() -> None:
    assert (REPO_ROOT / "workflows" / "megasr_color_fix.json") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_workflow_converts_completely(path: Path, object_info: dict[str, Any]) -> None:
    """Every shipped workflow: no missing node type, every link resolves, every required input is given."""
    prompt = workflow.to_api(workflow.load_workflow(path), object_info)
    assert prompt, f"{path.name} has no executable node"
    assert workflow.output_nodes(prompt, object_info), f"{path.name} has no output node"
    for nid, node in prompt.items():
        info = object_info[node["class_type"]]
        for name in info["input"].get("required", {}):
            assert name in node["inputs"], f"{path.name}: node {nid} ({node['class_type']}) lacks input '{name}'"
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                assert value[0] in prompt, f"{path.name}: node {nid}.{name} links to absent node {value[0]}"
