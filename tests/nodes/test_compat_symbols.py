"""The ComfyUI compatibility record (docs/COMPATIBILITY.md, issue 15): every comfy.*, comfy_api.*, folder_paths and
latent_preview symbol the shipped code uses is in the record, and every recorded symbol is what 0.3.75 has."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from megasr_testing import import_comfy

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "docs" / "COMPATIBILITY.md"
ROOTS = ("comfy", "comfy_api", "folder_paths", "latent_preview")
CODE = ["__init__.py", *sorted(str(p.relative_to(REPO)) for p in (REPO / "nodes").rglob("*.py"))]
DICT_METHODS = {"get", "items", "keys", "values"}
DEPTH = 2  # names recorded past the imported module: io.Float.Input, comfy.model_management.args.fp16_unet


def _api_module() -> str:
    """The comfy_api version nodes/api.py re-exports (``from .api import io`` means that module's ``io``)."""
    tree = ast.parse((REPO / "nodes" / "api.py").read_text(encoding="utf-8"))
    return next(n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("comfy_api"))


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def used_symbols(files: list[str] = CODE) -> dict[str, str]:
    """symbol -> first file using it; ``getattr(x, "name", ...)`` counts as ``x.name``."""
    api = _api_module()
    found: dict[str, str] = {}
    for f in files:
        tree = ast.parse((REPO / f).read_text(encoding="utf-8"))
        alias: dict[str, str] = {}  # local name -> dotted ComfyUI name
        modules: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ROOTS:
                        modules.add(a.name)
                        alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0 and mod.split(".")[0] in ROOTS:
                    base = mod
                elif node.level == 1 and mod == "api" and f.startswith("nodes/"):
                    base = api
                else:
                    continue
                for a in node.names:
                    alias[a.asname or a.name] = f"{base}.{a.name}"
                    modules.add(f"{base}.{a.name}")
                    found.setdefault(f"{base}.{a.name}", f)
        for node in ast.walk(tree):
            chain = None
            if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "_parent", None), ast.Attribute):
                chain = _chain(node)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                chain = _chain(node.args[0])
                chain = chain + [node.args[1].value] if chain else None
            for child in ast.iter_child_nodes(node):
                child._parent = node
            if not chain or chain[0] not in alias:
                continue
            dotted = alias[chain[0]].split(".") + chain[1:]
            while dotted[-1] in DICT_METHODS:  # folder_paths.folder_names_and_paths.get -> the dict itself
                dotted = dotted[:-1]
            prefix = max((m for m in modules if ".".join(dotted).startswith(m)), key=len, default=dotted[0])
            keep = len(prefix.split(".")) + DEPTH
            found.setdefault(".".join(dotted[:keep]), f)
    # a name that is only the prefix of a longer recorded chain says nothing more
    return {s: f for s, f in found.items() if not any(o.startswith(s + ".") for o in found)}


def recorded() -> dict[str, str]:
    """symbol -> its 0.3.75 column ('yes' or 'no ...') from the record's table."""
    rows = {}
    for line in RECORD.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`([\w.]+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m and m.group(1).split(".")[0] in ROOTS:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_comfyui_symbol_the_code_uses_is_in_the_record():
    """Catches code that starts using a ComfyUI symbol nobody checked against 0.3.75 and the newest source."""
    missing = {s: f for s, f in used_symbols().items() if s not in recorded()}
    assert not missing, f"add these to docs/COMPATIBILITY.md (checked in 0.3.75 and the newest source): {missing}"


def test_the_record_lists_no_symbol_the_code_no_longer_uses():
    stale = set(recorded()) - set(used_symbols())
    assert not stale, f"remove from docs/COMPATIBILITY.md: {sorted(stale)}"


def _resolve(symbol: str):
    parts = symbol.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(symbol)


def test_every_recorded_symbol_is_what_comfyui_0_3_75_has():
    """'yes' rows resolve in the installed ComfyUI 0.3.75; 'no' rows (newest-only, used through getattr with a
    fallback) really are absent, so the fallback is what runs here."""
    import_comfy()
    import utils.extra_config  # noqa: F401  (ComfyUI's own import order: `utils` is the tree's package)

    wrong = []
    for symbol, v0375 in recorded().items():
        try:
            _resolve(symbol)
            present = True
        except (ImportError, AttributeError):
            present = False
        if present != v0375.startswith("yes"):
            wrong.append((symbol, v0375, "present" if present else "absent"))
    assert not wrong, wrong


@pytest.mark.parametrize(
    ("cls", "members"),
    [
        ("comfy.model_patcher.ModelPatcher", ("clone", "set_model_attn2_patch", "set_model_attn2_output_patch",
                                             "set_additional_models", "get_model_object", "load", "model_options")),
        ("comfy.controlnet.ControlBase", ("copy_to", "control_merge", "set_cond_hint", "set_previous_controlnet",
                                          "pre_run", "cleanup", "get_models")),
    ],
)  # fmt: skip
def test_object_api_the_pack_relies_on_exists_in_0_3_75(cls, members):
    """The methods called on ComfyUI objects (recorded under 'Object API' in the record)."""
    import_comfy()
    target = _resolve(cls)
    text = RECORD.read_text(encoding="utf-8")
    for m in members:
        if m != "model_options":  # an instance attribute, set in ModelPatcher.__init__
            assert hasattr(target, m), (cls, m)
        assert f"`{m}`" in text, f"{cls}.{m} is not in docs/COMPATIBILITY.md"
