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

The converter needs no ComfyUI import: pass it the ``/object_info`` dict (over HTTP, or in-process from
``harness.comfy.object_info``).
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


def to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to the API-format prompt the frontend would queue."""
    workflow = copy.deepcopy(dict(workflow))
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = _links_table(workflow)

    missing: dict[str, list[str]] = {}
    for nid, node in nodes.items():
        ntype = node.get("type")
        if ntype not in VIRTUAL_NODE_TYPES and ntype not in object_info:
            missing.setdefault(str(ntype), []).append(str(nid))
    if missing:
        raise MissingNodeTypes(missing)

    def input_link(node: Mapping[str, Any], slot: int) -> int | None:
        ins = node.get("inputs") or []
        if 0 <= slot < len(ins):
            link = ins[slot].get("link")
            return None if link is None else int(link)
        return None

    def resolve(link_id: int | None, seen: frozenset[int] = frozenset()) -> tuple[str, int] | None:
        """Follow a link upstream through Reroutes and bypassed nodes; None when nothing arrives."""
        if link_id is None or link_id not in links:
            return None
        origin, slot, _t, _ts, ltype = links[link_id]
        if origin in seen or origin not in nodes:
            return None
        src = nodes[origin]
        mode = int(src.get("mode", MODE_ALWAYS) or 0)
        if src.get("type") == "Reroute":
            return resolve(input_link(src, 0), seen | {origin})
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
            return resolve(input_link(src, idx), seen | {origin})
        return (str(origin), slot)

    def primitive_value(link_id: int | None, seen: frozenset[int] = frozenset()) -> tuple[bool, Any]:
        if link_id is None or link_id not in links:
            return False, None
        origin = links[link_id][0]
        src = nodes.get(origin)
        if src is None or origin in seen:
            return False, None
        if src.get("type") == "Reroute":
            return primitive_value(input_link(src, 0), seen | {origin})
        if src.get("type") == "PrimitiveNode" and src.get("widgets_values"):
            return True, src["widgets_values"][0]
        return False, None

    prompt: dict[str, dict[str, Any]] = {}
    for nid in sorted(nodes):
        node = nodes[nid]
        ntype = node["type"]
        mode = int(node.get("mode", MODE_ALWAYS) or 0)
        if ntype in VIRTUAL_NODE_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[ntype]
        inputs = _widget_values(node, info)
        for inp in node.get("inputs") or []:
            link = inp.get("link")
            if link is None:
                continue
            name = inp.get("name")
            widget = (inp.get("widget") or {}).get("name")
            found, value = primitive_value(int(link))
            if found:
                inputs[widget or name] = value
                continue
            source = resolve(int(link))
            if source is not None:
                inputs[widget or name] = [source[0], source[1]]
        title = node.get("title") or info.get("display_name") or ntype
        prompt[str(nid)] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}
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
