"""Writes the shipped UI-format workflows in workflows/ from compact graph specs.

Run after changing a node's inputs:  .venv/bin/python scripts/build_workflows.py
(``--web-kinds`` writes only web/extractor_kinds.json and web/lib/extractor_kinds.js from the kind registry.)
Widget values are laid out by position exactly as the frontend stores them (using the live node
definitions of the real ComfyUI), so the tests' UI->API conversion reproduces each graph.

Each workflow gets a Note node (a frontend-only node: the UI->API conversion drops it) listing every model
file its loaders name, with its folder and how to get it, generated from the model manifest
(megasr/manifest.json); the README's "Getting weights" table is rewritten from the same manifest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from megasr import manifest  # noqa: E402 - after the path set-up above
from megasr.dage.kinds import BY_KIND, BY_NODE_CHOICE, MAP_KINDS, registry_json  # noqa: E402

WEB_KINDS_JSON = ROOT / "web" / "extractor_kinds.json"
WEB_KINDS_JS = ROOT / "web" / "lib" / "extractor_kinds.js"

CKPT = "512-base-ema.safetensors"  # Stable Diffusion 2 base (512 px, epsilon)
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
MEGASR = "megasr_sd2_x4.safetensors"
# DAGE Loader kind -> its weight file (megasr_<component>.safetensors, as the manifest names them)
DAGE = {choice: f"megasr_{k.component}.safetensors" for choice, k in BY_NODE_CHOICE.items()}
DAGE["depth_base"] = "depth_anything_v2_small.safetensors"
CLIP_LORA = BY_KIND["clip"].node_choice
NO_BASE = "none"  # nodes/dage.py NO_BASE
POS = "clean, high-resolution, 8k"
NEG = "dotted, noise, blur, lowres, smooth"
SEESR = "seesr_sd2_x4.safetensors"  # megasr.seesr_weights.SEESR_FILE_NAME: what convert-seesr writes
RAM = "ram_swin_large_14m.pth"
DAPE = "DAPE.pth"


def _common(tile_size: int = 1024) -> dict:
    return {
        "ckpt": ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, "Load SD-2 base checkpoint"),
        "cv": ("CLIPVisionLoader", {"clip_name": CLIP_VISION}, "Load CLIP vision (ViT-H/14)"),
        "msr": ("MegaSRModelLoader", {"megasr_name": MEGASR}, None),
        "lr": ("LoadImage", {"image": "megasr_example_lr.png"}, "LR image"),
        # the paper's prompt source: DAPE-equipped RAM tags the LR image (MegaSR Tags, the zero-shot CLIP tagger,
        # is the alternative: wire its prompt output to the positive text instead)
        "ram": ("MegaSRRamLoader", {"ram_name": RAM, "dape_name": DAPE}, "RAM + DAPE"),
        "tags": (
            "MegaSRRamTags",
            {"image": "lr:0", "ram_model": "ram:0", "user_prompt": "", "suffix": POS, "exclude": ""},
            "RAM tags (the prompt)",
        ),
        CLIP_LORA: (
            "MegaSRDageLoader",
            {"kind": CLIP_LORA, "dage_name": DAGE[CLIP_LORA], "base_name": NO_BASE, "download_missing": False},
            "DAGE CLIP LoRA",
        ),
        "sem": (
            "MegaSRClipSemantics",
            {"image": "lr:0", "clip_vision": "cv:0", "crop": "none", "dage_lora": f"{CLIP_LORA}:0"},
            None,
        ),
        "cism": (
            "MegaSRCismInjection",
            {
                "model": "ckpt:0",
                "megasr_model": "msr:0",
                "semantics": "sem:0",
                "strength": 1.0,
                "strength_full_res": 1.0,
                "strength_half_res": 1.0,
                "strength_quarter_res": 1.0,
                "strength_eighth_res": 1.0,
                # read only by a model with SeeSR's representation branch (MegaSR trained with --ram, or from
                # SeeSR); CISM² ignores the tokens for a model without it, so the graph runs with either
                "ram_semantics": "tags:2",
            },
            None,
        ),
        "pos": ("CLIPTextEncode", {"text": "tags:0", "clip": "ckpt:1"}, "Positive (RAM tags)"),
        "neg": ("CLIPTextEncode", {"text": NEG, "clip": "ckpt:1"}, "Negative"),
        "sample": (
            "MegaSRSampler",
            {
                "model": "cism:0",
                "positive": "gam:0",
                "negative": "gam:1",
                "vae": "ckpt:2",
                "lr_image": "lr:0",
                "scale": 4.0,
                "seed": 42,
                "steps": 50,
                "cfg": 5.5,
                "sampler_name": "ddpm",
                "scheduler": "normal",
                "denoise": 1.0,
                "tile_size": tile_size,
                "tile_overlap": 128,
                "color_fix": "adain",
                "tile_batch": 4,
            },
            None,
        ),
        "save": ("SaveImage", {"images": "sample:0", "filename_prefix": "MegaSR"}, None),
    }


def _gam(maps: dict) -> tuple:
    inputs = {
        "positive": "pos:0",
        "negative": "neg:0",
        "megasr_model": "msr:0",
        "lr_image": "lr:0",
        "strength": 1.0,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "hed_strength": 1.0,
        "depth_strength": 1.0,
        "seg_strength": 1.0,
        "msgam_strength": 1.0,
        "negative_guidance": "same as positive",
    }
    inputs.update(maps)
    return ("MegaSRGuidanceFusion", inputs, None)


def _dage(kinds: tuple[str, ...] = MAP_KINDS) -> dict:
    """DAGE loaders and map extractors for the LR image (key ``<kind>_map``)."""
    titles = {"hed": "DAGE HED weights", "depth": "DAGE depth weights", "seg": "DAGE seg weights"}
    node_ids = {k: BY_KIND[k].map_node for k in kinds}
    out = {}
    for kind in kinds:
        base = DAGE["depth_base"] if kind == "depth" else NO_BASE
        out[f"{kind}_dage"] = (
            "MegaSRDageLoader",
            {"kind": kind, "dage_name": DAGE[kind], "base_name": base, "download_missing": False},
            titles[kind],
        )
        out[f"{kind}_map"] = (
            node_ids[kind],
            {"image": "lr:0", "dage_model": f"{kind}_dage:0", "resolution": 512},
            None,
        )
    return out


def _seesr() -> dict:
    """SeeSR through the pack's nodes, public files only: RAM/DAPE tags are the prompt, RAM's tokens feed SeeSR's
    representation branch; no CLIP semantics and no maps (a converted SeeSR file has CISM² and MS-GAM at zero init).
    SeeSR's test-script defaults: 50 steps, cfg 5.5, its positive suffix and negative prompt, start from the LR."""
    common = _common()
    g = {k: common[k] for k in ("ckpt",)}
    g["msr"] = ("MegaSRModelLoader", {"megasr_name": SEESR}, "SeeSR (converted: convert-seesr)")
    g["lr"] = common["lr"]
    g["ram"], g["tags"] = common["ram"], common["tags"]
    cism = dict(common["cism"][1])
    del cism["semantics"]
    g["cism"] = ("MegaSRCismInjection", cism, None)
    g["pos"] = common["pos"]
    g["neg"] = common["neg"]
    g["gam"] = _gam({})
    g["sample"] = (common["sample"][0], {**common["sample"][1], "color_fix": "adain"}, None)
    g["save"] = ("SaveImage", {"images": "sample:0", "filename_prefix": "SeeSR"}, None)
    return g


def graphs() -> dict[str, dict]:
    x4 = {**_common(), **_dage()}
    x4["gam"] = _gam({"hed": "hed_map:0", "depth": "depth_map:0", "seg": "seg_map:0"})
    swap = {**_common(), **_dage(("hed",))}
    swap["depth_in"] = ("LoadImage", {"image": "megasr_example_depth.png"}, "Hand-made depth map")
    swap["seg_in"] = ("LoadImage", {"image": "megasr_example_seg.png"}, "Hand-painted segmentation (ADE20K colours)")
    swap["gam"] = _gam({"hed": "hed_map:0", "depth": "depth_in:0", "seg": "seg_in:0"})
    tiled = {**_common(tile_size=512), **_dage()}  # 1024 x 768 output: 3 x 2 tiles of 512 px
    tiled["lr"] = ("LoadImage", {"image": "megasr_example_large_lr.png"}, "LR image")
    tiled["gam"] = _gam({"hed": "hed_map:0", "depth": "depth_map:0", "seg": "seg_map:0"})
    maps = {"lr": _common()["lr"], **_dage()}
    for kind in MAP_KINDS:
        maps[f"save_{kind}"] = ("SaveImage", {"images": f"{kind}_map:0", "filename_prefix": f"MegaSR_{kind}"}, None)
    return {
        "seesr_x4": _seesr(),
        "megasr_x4": x4,
        "megasr_swap_guidance": swap,
        "megasr_large_tiled": tiled,
        "megasr_guidance_maps": maps,
        "megasr_compare": _compare(),
    }


def _quality(image: str, title: str) -> tuple:
    inputs = {"image": image, "reference": "hr:0", "psnr": True, "ssim": True, "lpips": True, "crop_border": 0}
    return (
        "MegaSRImageQuality",
        {**inputs, "size_rule": "error", "dists": False, "niqe": True, "clipiqa": True},
        title,
    )


def _compare() -> dict:
    """Bicubic x4 (core ImageScaleBy) beside MegaSR x4 of the same LR, each scored by MegaSR Image Quality against
    an optional HR (a muted Load Image: un-mute it to score against your ground truth)."""
    spec = {**_common(), **_dage()}
    spec["gam"] = _gam({"hed": "hed_map:0", "depth": "depth_map:0", "seg": "seg_map:0"})
    spec["bicubic"] = (
        "ImageScaleBy",
        {"image": "lr:0", "upscale_method": "bicubic", "scale_by": 4.0},
        "Bicubic x4 (baseline)",
    )
    spec["hr"] = ("LoadImage", {"image": "megasr_example_lr.png"}, HR_TITLE)
    spec["q_bicubic"] = _quality("bicubic:0", "Quality: bicubic")
    spec["q_megasr"] = _quality("sample:0", "Quality: MegaSR")
    spec["side"] = (
        "ImageStitch",
        {
            "image1": "bicubic:0",
            "image2": "sample:0",
            "direction": "right",
            "match_image_size": True,
            "spacing_width": 8,
            "spacing_color": "white",
        },
        "Bicubic | MegaSR",
    )
    spec["preview"] = ("PreviewImage", {"images": "side:0"}, "Side by side: bicubic (left), MegaSR (right)")
    return spec


HR_TITLE = "HR reference (optional: un-mute with Ctrl+M and load your HR)"
#: graph -> spec keys of nodes shipped muted (mode 2): the frontend leaves them, and their links, out of a run
MUTED = {"megasr_compare": ("hr",)}


INTROS = {
    "seesr_x4": "SeeSR x4 with public weights only (MegaSR's parent; SeeSR's defaults: 50 steps, cfg 5.5, "
    "DDPM-like sampler, its prompt suffix and negative prompt). RAM + DAPE tag the LR image: the tags are the "
    "prompt (edit them on the RAM tags node: exclude / user_prompt) and RAM's tokens feed SeeSR's representation "
    "branch. Get the files once: python -m megasr fetch --only seesr ram_swin_large_14m seesr_dape, then make "
    "the SeeSR file with python -m megasr convert-seesr (below), or put SeeSR's folder (unet/ + controlnet/) into "
    "models/megasr and pick it ('seesr/') in the MegaSR Model Loader: it is converted in memory the same way.",
    "megasr_x4": "MegaSR x4: the paper's full graph. RAM + DAPE tag the LR image (the tags are the positive prompt: "
    "edit them on the RAM tags node; the zero-shot MegaSR Tags node can replace it), DAGE extracts HED, depth and "
    "segmentation maps, CISM² injects its CLIP image semantics, MS-GAM fuses the maps into the guidance, and the "
    "MegaSR Sampler upscales x4 (an LR image of W x H gives 4W x 4H). RAM's tokens reach CISM² for a model with "
    "SeeSR's representation branch (trained with --ram); other models ignore them.",
    "megasr_swap_guidance": "MegaSR x4 with hand-made guidance: the depth and segmentation maps come from Load Image "
    "nodes (paint them, or edit the extracted ones: right-click a map node > Edit map (MegaSR)); HED is extracted.",
    "megasr_large_tiled": "MegaSR x4 on a larger image, sampled in 512 px tiles (one sampling run; every model call "
    "is tiled and blended, so there are no seams).",
    "megasr_guidance_maps": "Extracts and saves the three DAGE guidance maps (HED edges, depth, ADE20K segmentation) "
    "of the LR image, to inspect them or to edit them for megasr_swap_guidance.",
    "megasr_compare": "Bicubic x4 beside MegaSR x4 of the same LR image, each scored by MegaSR Image Quality. "
    "With no HR only NIQE and CLIP-IQA (no reference) are scored; PSNR, SSIM and LPIPS say 'skipped (needs a "
    "reference image)': un-mute the HR node (Ctrl+M), load the ground truth (4x the LR's size) and run again. "
    "LPIPS, DISTS, NIQE and CLIP-IQA need their files in models/megasr/metrics (python -m megasr fetch --eval); "
    "without them they are skipped with one line. For a second model, copy the MegaSR branch and score it the "
    "same way.",
}
#: loader node -> (input, ComfyUI model folder) of every model file it names
LOADER_FILES = {
    "CheckpointLoaderSimple": (("ckpt_name", "checkpoints"),),
    "CLIPVisionLoader": (("clip_name", "clip_vision"),),
    "MegaSRModelLoader": (("megasr_name", "megasr"),),
    "MegaSRDageLoader": (("dage_name", "megasr"), ("base_name", "megasr")),
    "MegaSRRamLoader": (("ram_name", "megasr"), ("dape_name", "megasr")),
}
NOTE_WIDTH = 700


def needed_entries(spec: dict) -> list[str]:
    """Manifest ids of every model file the graph's loaders name, in graph order (each once)."""
    ids: list[str] = []
    for ctype, inputs, _ in spec.values():
        for name, folder in LOADER_FILES.get(ctype, ()):
            value = inputs.get(name)
            if not value or value == NO_BASE:
                continue
            if (folder, value) in manifest.CONVERTED_FILES:  # made by a command from public files: list those
                source = manifest.CONVERTED_FILES[(folder, value)][0]
                if source not in ids:
                    ids.append(source)
                continue
            found = manifest.find_file(folder, value)
            if found is None:
                raise SystemExit(f"{ctype}.{name} = {value!r} is not in megasr/manifest.json (folder {folder})")
            if found[0].id not in ids:
                ids.append(found[0].id)
    return ids


def converted_files(spec: dict) -> list[tuple[str, str]]:
    """(folder, file) of every file the graph's loaders name that a command makes from public files."""
    out = []
    for ctype, inputs, _ in spec.values():
        for name, folder in LOADER_FILES.get(ctype, ()):
            if (folder, inputs.get(name)) in manifest.CONVERTED_FILES and (folder, inputs[name]) not in out:
                out.append((folder, inputs[name]))
    return out


def add_note(workflow: dict, text: str) -> None:
    """Append a Note node (the frontend's own text node) above the graph; the other nodes keep their ids."""
    node_id = workflow["last_node_id"] + 1
    height = 30 + 17 * sum(1 + len(line) // 95 for line in text.splitlines())
    workflow["nodes"].append(
        {
            "id": node_id,
            "type": "Note",
            "pos": [40, -height - 40],
            "size": [NOTE_WIDTH, height],
            "flags": {},
            "order": len(workflow["nodes"]),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "title": "Read me: model files",
            "properties": {},
            "widgets_values": [text],
            "color": "#432",
            "bgcolor": "#653",
        }
    )
    workflow["last_node_id"] = node_id


def build(name: str, spec: dict, info: dict) -> dict:
    """The UI-format workflow of one graph spec, with its Note node."""
    workflow = to_ui(spec, info)
    keys = list(spec)
    for node in workflow["nodes"]:
        if keys[node["id"] - 1] in MUTED.get(name, ()):
            node["mode"] = 2  # muted: as Ctrl+M in the frontend
    add_note(workflow, manifest.note_text(needed_entries(spec), INTROS[name], converted_files(spec)))
    return workflow


README_BEGIN = "<!-- manifest table: generated by scripts/build_workflows.py from megasr/manifest.json -->\n"
README_END = "<!-- end of manifest table -->"


def readme_with_manifest_table(readme: str) -> str:
    """README text with the "Getting weights" table between its markers replaced by the manifest's."""
    head, sep, rest = readme.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise SystemExit("README.md lacks the manifest table markers")
    return head + README_BEGIN + manifest.markdown_table() + "\n" + README_END + tail


def _is_link(value, ids: dict) -> bool:
    """``"node:slot"`` naming a node of the graph (a widget value never has that form here)."""
    if not isinstance(value, str) or value.count(":") != 1:
        return False
    src, slot = value.split(":")
    return src in ids and slot.isdigit()


def to_ui(spec: dict, info: dict) -> dict:
    from comfyrun.workflow import widget_layout

    ids = {key: i + 1 for i, key in enumerate(spec)}
    # Column = longest path from a source, for a readable left-to-right layout.
    depth: dict[str, int] = {}

    def col(key: str) -> int:
        if key not in depth:
            refs = [v.split(":")[0] for v in spec[key][1].values() if isinstance(v, str) and ":" in v]
            refs = [r for r in refs if r in spec]
            depth[key] = 1 + max((col(r) for r in refs), default=-1)
        return depth[key]

    rows: dict[int, int] = {}
    nodes, links = [], []
    link_id = 0
    out_links: dict[tuple[str, int], list[int]] = {}
    pending_inputs: dict[str, list] = {}
    for key, (ctype, inputs, title) in spec.items():
        ni = info[ctype]
        node_inputs = []
        sections = {**ni["input"].get("required", {}), **ni["input"].get("optional", {})}
        order = ni.get("input_order", {})
        names = order.get("required", []) + order.get("optional", [])
        for name in names:
            s = sections[name]
            kind = s[0] if isinstance(s[0], str) else "COMBO"
            v = inputs.get(name)
            widget = kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if widget and not _is_link(v, ids):
                continue
            entry = {"name": name, "type": kind, "link": None}
            if widget:  # a widget fed by a link (the frontend's converted widget)
                entry["widget"] = {"name": name}
            if isinstance(v, str) and ":" in v:
                src, slot = v.split(":")
                link_id += 1
                links.append([link_id, ids[src], int(slot), ids[key], len(node_inputs), kind])
                out_links.setdefault((src, int(slot)), []).append(link_id)
                entry["link"] = link_id
            node_inputs.append(entry)
        values = []
        for name in widget_layout(ni):
            if name is None:
                values.append("fixed" if values and isinstance(values[-1], int) else "image")
                continue
            values.append("" if _is_link(inputs[name], ids) else inputs[name])
        # Height from what the node shows (LiteGraph rows of ~24 px; text boxes and image previews more),
        # stacked per column so nothing overlaps when the workflow is opened.
        rows_shown = max(len(node_inputs), len(ni["output"])) + sum(1 for n in widget_layout(ni) if n is not None)
        height = 40 + 24 * rows_shown + (120 if ctype == "CLIPTextEncode" else 0) + (260 if ctype == "LoadImage" else 0)
        c = col(key)
        y = rows.get(c, 40)
        rows[c] = y + height + 50
        node = {
            "id": ids[key],
            "type": ctype,
            "pos": [40 + 400 * c, y],
            "size": [340, height],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": node_inputs,
            "outputs": [],
            "properties": {"Node name for S&R": ctype},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        pending_inputs[key] = node
        nodes.append(node)
    for key, node in pending_inputs.items():
        ni = info[spec[key][0]]
        for slot, (otype, oname) in enumerate(zip(ni["output"], ni["output_name"], strict=True)):
            node["outputs"].append(
                {"name": oname, "type": otype, "links": out_links.get((key, slot), []), "slot_index": slot}
            )
    for i, key in enumerate(sorted(spec, key=col)):
        pending_inputs[key]["order"] = i
    return {
        "last_node_id": len(nodes),
        "last_link_id": link_id,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def web_kinds_files() -> dict[Path, str]:
    """The extractor-kind registry for the web code: ``web/extractor_kinds.json`` (the data) and
    ``web/lib/extractor_kinds.js`` (the same JSON as an ES module, so the frontend needs no fetch)."""
    text = json.dumps(registry_json(), indent=2) + "\n"
    js = (
        "// Generated by scripts/build_workflows.py from megasr/dage/kinds.py (registry_json()); do not edit.\n"
        f"export const EXTRACTOR_KINDS = {text.rstrip()};\n"
    )
    return {WEB_KINDS_JSON: text, WEB_KINDS_JS: js}


def write_web_kinds() -> None:
    for path, text in web_kinds_files().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    if sys.argv[1:] == ["--web-kinds"]:  # no ComfyUI needed
        write_web_kinds()
        return
    write_web_kinds()
    from comfyrun.runner import get_runner, object_info

    get_runner()
    info = object_info()
    for name, spec in graphs().items():
        path = ROOT / "workflows" / f"{name}.json"
        path.write_text(json.dumps(build(name, spec, info), indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    readme = ROOT / "README.md"
    readme.write_text(readme_with_manifest_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
    print("wrote the manifest table of README.md")


if __name__ == "__main__":
    main()
