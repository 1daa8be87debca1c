"""UI-format workflow JSON (what the frontend saves and users share) -> API-format prompt (what it queues).

This follows what the ComfyUI frontend (1.32, shipped with ComfyUI 0.3.75) does in ``graphToPrompt``,
driven by the node definitions of ``/object_info``:

- ``widgets_values`` are positional, one entry per widget in input order (required, then optional).
  An input is a widget when its type is INT, FLOAT, STRING, BOOLEAN or a combo and it is not
  ``forceInput``. Some widgets carry a companion that takes a position but is never sent:
  ``control_after_generate`` after an INT that asks for it (or any INT named ``seed``/``noise_seed``) and
  after a COMBO that asks for it; the ``upload`` button after a combo with ``image_upload`` (and the
  video/audio variants).
- Links become ``[origin_id, origin_slot]``; a link into a widget input (a "converted" widget) replaces
  the widget value.
- Virtual nodes are not sent: ``Reroute`` is followed to its source, ``PrimitiveNode`` gives its value to
  the widgets it feeds, ``Note``/``MarkdownNote`` vanish.
- Muted nodes (mode 2) are not sent and links from them are dropped; bypassed nodes (mode 4) are not sent
  and a link from one is redirected to the bypassed node's input of the same type (same slot index
  first, else the first input of that type), as the frontend does.
- Subgraphs are flattened: the nodes of instance ``5`` become ``"5:<inner id>"``. (Widgets promoted to
  a subgraph's inputs and left unlinked keep the inner node's own value.)

The converter needs no ComfyUI import: pass it the ``/object_info`` dict (over HTTP, or in-process from
``comfyrun.runner.object_info``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4

VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")

#: Placeholder for widget positions that are never sent to the server (control_after_generate, upload).
_COMPANION = None


class WorkflowError(ValueError):
    pass


class MissingNodeTypes(WorkflowError):
    """The workflow uses node types the server does not know (the frontend's red "missing" nodes)."""

    def __init__(self, missing: dict[str, list[str]]) -> None:
        self.missing = missing
        listing = ", ".join(f"{t} (node {', '.join(ids)})" for t, ids in sorted(missing.items()))
        super().__init__(f"workflow uses node types that are not installed: {listing}")


def load_workflow(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or "nodes" not in data:
        raise WorkflowError(f"{path} is not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
    return data


def _input_type(spec: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return "*", {}
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        return "COMBO", opts
    return str(kind), opts


def widget_layout(info: Mapping[str, Any]) -> list[str | None]:
    """Names of the positions of ``widgets_values`` for a node type; None for positions never sent."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {sec: list(inputs.get(sec, {})) for sec in ("required", "optional")}
    layout: list[str | None] = []
    for section in ("required", "optional"):
        specs = inputs.get(section, {}) or {}
        for name in order.get(section, list(specs)):
            if name not in specs:
                continue
            kind, opts = _input_type(specs[name])
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            layout.append(name)
            if kind == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
                layout.append(_COMPANION)
            elif kind == "COMBO" and opts.get("control_after_generate"):
                layout.append(_COMPANION)
            if kind == "COMBO" and any(opts.get(k) for k in UPLOAD_OPTIONS):
                layout.append(_COMPANION)
    return layout


def _links_table(workflow: Mapping[str, Any]) -> dict[int, tuple[int, int, int, int, str]]:
    table = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            lid, o, os_, t, ts, ty = (
                link["id"],
                link["origin_id"],
                link["origin_slot"],
                link["target_id"],
                link["target_slot"],
                link.get("type", "*"),
            )
        else:
            lid, o, os_, t, ts, ty = link[:6]
        table[int(lid)] = (int(o), int(os_), int(t), int(ts), str(ty))
    return table


def _widget_values(node: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some extensions save widgets by name
        return dict(values)
    out: dict[str, Any] = {}
    layout = widget_layout(info)
    for name, value in zip(layout, values, strict=False):
        if name is not None:
            out[name] = value
    return out


SUBGRAPH_INPUT_NODE = -10
SUBGRAPH_OUTPUT_NODE = -20


class _Scope:
    """One graph level: the root graph, or one instance of a subgraph (ids prefixed ``"<instance>:"``)."""

    def __init__(
        self,
        graph: Mapping[str, Any],
        prefix: str = "",
        parent: _Scope | None = None,
        instance: Mapping[str, Any] | None = None,
    ) -> None:
        self.graph = graph
        self.nodes = {int(n["id"]): n for n in graph.get("nodes", [])}
        self.links = _links_table(graph)
        self.prefix = prefix
        self.parent = parent
        self.instance = instance


def _input_link(node: Mapping[str, Any], slot: int) -> int | None:
    ins = node.get("inputs") or []
    if 0 <= slot < len(ins):
        link = ins[slot].get("link")
        return None if link is None else int(link)
    return None


def _mode(node: Mapping[str, Any]) -> int:
    return int(node.get("mode", MODE_ALWAYS) or 0)


def to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to the API-format prompt the frontend would queue.

    Subgraphs (``definitions.subgraphs``) are flattened as the frontend does: a node inside instance 5 of
    a subgraph gets the id ``"5:<inner id>"`` (nested: ``"5:7:2"``); links cross the subgraph's input
    (-10) and output (-20) nodes.
    """
    workflow = copy.deepcopy(dict(workflow))
    subgraphs = {sg["id"]: sg for sg in (workflow.get("definitions") or {}).get("subgraphs", []) or []}

    missing: dict[str, list[str]] = {}
    for graph in [workflow, *subgraphs.values()]:
        for node in graph.get("nodes", []):
            ntype = node.get("type")
            if ntype not in VIRTUAL_NODE_TYPES and ntype not in object_info and ntype not in subgraphs:
                missing.setdefault(str(ntype), []).append(str(node.get("id")))
    if missing:
        raise MissingNodeTypes(missing)

    def inner(scope: _Scope, node: Mapping[str, Any]) -> _Scope:
        return _Scope(subgraphs[node["type"]], f"{scope.prefix}{node['id']}:", scope, node)

    def resolve(scope: _Scope, link_id: int | None, depth: int = 0) -> tuple[str, int] | None:
        """Follow a link upstream through Reroutes, bypassed nodes and subgraph borders."""
        if link_id is None or link_id not in scope.links or depth > 256:
            return None
        origin, slot, _t, _ts, ltype = scope.links[link_id]
        if origin == SUBGRAPH_INPUT_NODE:  # leave the subgraph through the instance's input slot
            if scope.parent is None or scope.instance is None:
                return None
            return resolve(scope.parent, _input_link(scope.instance, slot), depth + 1)
        src = scope.nodes.get(origin)
        if src is None:
            return None
        mode = _mode(src)
        if src.get("type") == "Reroute":
            return resolve(scope, _input_link(src, 0), depth + 1)
        if src.get("type") in VIRTUAL_NODE_TYPES:
            return None  # PrimitiveNode: its value was applied to the target widget
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            outs = src.get("outputs") or []
            otype = outs[slot].get("type", ltype) if slot < len(outs) else ltype
            ins = src.get("inputs") or []
            idx = slot if slot < len(ins) and ins[slot].get("type") == otype else None
            if idx is None:
                idx = next((i for i, inp in enumerate(ins) if inp.get("type") == otype), None)
            if idx is None:
                return None
            return resolve(scope, _input_link(src, idx), depth + 1)
        if src.get("type") in subgraphs:  # enter the subgraph through its output node
            sub = inner(scope, src)
            into_output = [lid for lid, lk in sub.links.items() if lk[2] == SUBGRAPH_OUTPUT_NODE and lk[3] == slot]
            return resolve(sub, into_output[0], depth + 1) if into_output else None
        return (f"{scope.prefix}{origin}", slot)

    def primitive_value(scope: _Scope, link_id: int | None, depth: int = 0) -> tuple[bool, Any]:
        if link_id is None or link_id not in scope.links or depth > 256:
            return False, None
        origin = scope.links[link_id][0]
        if origin == SUBGRAPH_INPUT_NODE and scope.parent is not None and scope.instance is not None:
            return primitive_value(scope.parent, _input_link(scope.instance, scope.links[link_id][1]), depth + 1)
        src = scope.nodes.get(origin)
        if src is None:
            return False, None
        if src.get("type") == "Reroute":
            return primitive_value(scope, _input_link(src, 0), depth + 1)
        if src.get("type") == "PrimitiveNode" and src.get("widgets_values"):
            return True, src["widgets_values"][0]
        return False, None

    prompt: dict[str, dict[str, Any]] = {}

    def emit(scope: _Scope) -> None:
        for nid in sorted(scope.nodes):
            node = scope.nodes[nid]
            ntype = node["type"]
            if ntype in VIRTUAL_NODE_TYPES or _mode(node) in (MODE_NEVER, MODE_BYPASS):
                continue
            if ntype in subgraphs:
                emit(inner(scope, node))
                continue
            info = object_info[ntype]
            inputs = _widget_values(node, info)
            for inp in node.get("inputs") or []:
                link = inp.get("link")
                if link is None:
                    continue
                name = inp.get("name")
                widget = (inp.get("widget") or {}).get("name")
                found, value = primitive_value(scope, int(link))
                if found:
                    inputs[widget or name] = value
                    continue
                source = resolve(scope, int(link))
                if source is not None:
                    inputs[widget or name] = [source[0], source[1]]
            title = node.get("title") or info.get("display_name") or ntype
            prompt[f"{scope.prefix}{nid}"] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}

    emit(_Scope(workflow))
    return prompt


def find_nodes(prompt: Mapping[str, Mapping[str, Any]], key: str) -> list[str]:
    """Node ids matched by ``key``: a node id, a class type, or a title (``_meta.title``)."""
    if key in prompt:
        return [key]
    by_type = [nid for nid, n in prompt.items() if n.get("class_type") == key]
    if by_type:
        return by_type
    return [nid for nid, n in prompt.items() if (n.get("_meta") or {}).get("title") == key]


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when it parses (numbers, true/false, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_inputs(prompt: dict[str, dict[str, Any]], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Override inputs in place: ``{"3.seed": 7, "LoadImage.image": "a.png", "My title.mode": "wavelet"}``.

    The part before the last dot names nodes (id, class type or title; a class type matches all its
    nodes). Raises ``WorkflowError`` when nothing matches, so a typo never goes unnoticed.
    """
    for target, value in overrides.items():
        if "." not in target:
            raise WorkflowError(f"override '{target}' must look like NODE.INPUT")
        key, name = target.rsplit(".", 1)
        ids = find_nodes(prompt, key)
        if not ids:
            raise WorkflowError(f"override '{target}': no node with id, type or title '{key}'")
        for nid in ids:
            prompt[nid]["inputs"][name] = value
    return prompt


def output_nodes(prompt: Mapping[str, Mapping[str, Any]], object_info: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [nid for nid, n in prompt.items() if object_info.get(n["class_type"], {}).get("output_node")]
