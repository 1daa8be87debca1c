"""The product code's import structure, read with ``ast`` (nothing is imported): no circle, no import from
tests/, no ComfyUI in the core, and no import running back up the layers (megasr <- nodes, megasr <- training).

Product code: ``megasr/``, ``nodes/``, ``training/``, ``scripts/comfyrun/`` and the pack's ``__init__.py``.
The circle check follows module-level imports only (an import inside a function runs when it is called, after
every module has loaded); the layer, tests/ and ComfyUI checks follow every import, wherever it stands.
Relative imports are resolved against the pack root (``from ..megasr.x import y`` in ``nodes/`` is ``megasr.x``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("megasr", "nodes", "training", "scripts/comfyrun")
ROOT_MODULE = ""  # the pack's own __init__.py (its package name is the folder ComfyUI gives it)

#: ComfyUI's top-level modules: the core (megasr/) imports none of them (nodes/api.py is the one seam)
COMFY_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "comfy_config",
    "folder_paths",
    "nodes",  # ComfyUI's nodes.py when imported absolutely (ours is only ever imported relatively)
    "server",
    "execution",
    "latent_preview",
    "node_helpers",
    "app",
}
#: layer -> the layers it must not import (imports run down: training -> megasr, nodes -> megasr)
FORBIDDEN_LAYERS = {"megasr": ("nodes", "training", "scripts"), "nodes": ("training", "scripts")}


@dataclass(frozen=True)
class Import:
    target: str  # resolved dotted name (a product module, or an absolute name of another package)
    top_level: bool  # at module level (not inside a function or class body; not under TYPE_CHECKING)
    absolute: bool
    line: int


def module_name(path: Path, root: Path = REPO) -> tuple[str, bool]:
    """(dotted module name, is a package) of a product file; the pack's __init__.py is ``ROOT_MODULE``."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def product_files(root: Path = REPO) -> list[Path]:
    files = [root / "__init__.py"] if (root / "__init__.py").is_file() else []
    for d in PRODUCT_DIRS:
        files.extend(sorted(p for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts))
    return files


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk(body: list[ast.stmt], top: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement with whether it runs at import time of the module."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(node.body, False)
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, top)  # a class body runs at import time
        elif isinstance(node, ast.If):
            runs = top and not _is_type_checking(node)
            yield from _walk(node.body, runs)
            yield from _walk(node.orelse, top)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(node, field, None)
                if isinstance(sub, list):
                    stmts = [s for s in sub if isinstance(s, ast.stmt)]
                    handlers = [h for h in sub if isinstance(h, ast.ExceptHandler)]
                    yield from _walk(stmts, top)
                    for h in handlers:
                        yield from _walk(h.body, top)
            if isinstance(node, ast.Match):
                for case in node.cases:
                    yield from _walk(case.body, top)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[Import]:
    """The imports of one module, each resolved to the product module it loads (or an outside name)."""
    package = module if is_package else module.rpartition(".")[0]

    def resolve(name: str) -> str:
        # the longest known product module the dotted name starts with; else the name itself (outside)
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            cand = ".".join(parts[:n])
            if cand in known:
                return cand
        return name

    out: list[Import] = []
    for node, top in _walk(ast.parse(source).body, True):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(resolve(alias.name), top, True, node.lineno))
            continue
        if node.level:
            base_parts = package.split(".") if package else []
            up = node.level - 1
            if up > len(base_parts):
                raise AssertionError(f"{module}: relative import above the pack root (line {node.lineno})")
            base_parts = base_parts[: len(base_parts) - up]
            base = ".".join([*base_parts, *(node.module.split(".") if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            target = sub if sub in known else resolve(base) if base else ROOT_MODULE
            out.append(Import(target, top, node.level == 0, node.lineno))
    return out


def build_graph(root: Path = REPO) -> tuple[dict[str, list[Import]], dict[str, Path]]:
    """module -> its imports, for every product module under ``root``."""
    files = product_files(root)
    names = {f: module_name(f, root) for f in files}
    known = {n for n, _ in names.values()}
    graph = {}
    paths = {}
    for f, (name, is_package) in names.items():
        graph[name] = imports_of(f.read_text(encoding="utf-8"), name, is_package, known)
        paths[name] = f
    return graph, paths


def find_cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components (Tarjan) of more than one module, or a module importing itself."""
    edges = {m: sorted({i.target for i in imps if i.top_level and i.target in graph}) for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _test_module_names(root: Path = REPO) -> set[str]:
    """What a product module would import to reach tests/: ``tests`` and the modules tests/ puts on sys.path."""
    tests = root / "tests"
    names = {"tests"}
    for p in tests.iterdir() if tests.is_dir() else []:
        if p.suffix == ".py" and p.stem != "conftest":
            names.add(p.stem)
        elif p.is_dir() and (p / "__init__.py").is_file():
            names.add(p.name)
    return names


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    g, _ = build_graph()
    assert {"megasr", "nodes", "training", "training.cli", "megasr.dage.kinds", ROOT_MODULE} <= set(g)
    return g


def test_product_code_has_no_import_circle(graph: dict[str, list[Import]]) -> None:
    """Catches two modules importing each other at module level (directly or round a longer loop)."""
    cycles = find_cycles(graph)
    assert not cycles, "import circles (module-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_training_has_no_circle_even_through_imports_inside_functions(graph: dict[str, list[Import]]) -> None:
    """The two circles of issue 24 were lazy imports (config <-> config_nested, stage_megasr <-> tagging):
    inside training/ every import counts, wherever it stands."""
    training = {
        m: [Import(i.target, True, i.absolute, i.line) for i in imps if i.target.startswith("training")]
        for m, imps in graph.items()
        if m.startswith("training")
    }
    cycles = find_cycles(training)
    assert not cycles, "import circles in training/ (any import): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_product_module_imports_from_tests(graph: dict[str, list[Import]]) -> None:
    names = _test_module_names() - set(graph)
    bad = [
        f"{m} line {i.line}: {i.target}"
        for m, imps in graph.items()
        for i in imps
        if i.absolute and i.target.split(".")[0] in names
    ]
    assert not bad, "product code importing from tests/: " + ", ".join(bad)


def test_core_imports_no_comfyui_and_layers_import_downwards(graph: dict[str, list[Import]]) -> None:
    """megasr/ imports nothing of ComfyUI (absolute ``comfy``, ``folder_paths``, ``nodes``, ...) nor of the
    layers above it; nodes/ imports nothing of training/ -- wherever the import stands, lazy ones too."""
    bad = []
    for m, imps in graph.items():
        layer = m.split(".")[0]
        for i in imps:
            top = i.target.split(".")[0]
            if layer == "megasr" and i.absolute and top in COMFY_MODULES:
                bad.append(f"{m} line {i.line}: ComfyUI module {i.target}")
            elif not i.absolute and top in FORBIDDEN_LAYERS.get(layer, ()):
                bad.append(f"{m} line {i.line}: {i.target} (a layer above {layer})")
            elif i.absolute and layer in FORBIDDEN_LAYERS and top in ("training", "scripts"):
                bad.append(f"{m} line {i.line}: {i.target} (a layer above {layer})")
    assert not bad, "imports against the layering: " + ", ".join(bad)


def test_the_checks_see_a_circle_a_tests_import_and_comfyui_in_the_core(tmp_path: Path) -> None:
    """The graph and the checks on a tiny pack: catches a resolver that drops relative imports (the circle
    would vanish), one that counts lazy imports as module-level (a false circle) or a check that never fires."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helpers_for_tests.py").write_text("X = 1\n")
    files = {
        "__init__.py": "from .nodes import comfy_entrypoint\n",
        "nodes/__init__.py": "from .entry import run as comfy_entrypoint\n",
        "nodes/entry.py": "from ..megasr import core\n\ndef run():\n    from ..training import stage\n",
        "megasr/__init__.py": "",
        "megasr/core.py": "from . import util\nimport comfy.model_management\n",
        "megasr/util.py": "from .core import thing\n",
        "megasr/lazy.py": "def f():\n    from .core import thing\n",
        "megasr/later.py": "from .lazy import f\n",
        "training/__init__.py": "",
        "training/stage.py": "from helpers_for_tests import X\nfrom megasr.util import thing\n",
        "scripts/comfyrun/__init__.py": "",
    }
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    g, _ = build_graph(tmp_path)
    assert find_cycles(g) == [["megasr.core", "megasr.util"]]
    assert [i.target for i in g["nodes.entry"]] == ["megasr.core", "training.stage"]
    assert [i.top_level for i in g["nodes.entry"]] == [True, False]
    assert g[ROOT_MODULE][0].target == "nodes"
    comfy = [i.target for m, imps in g.items() if m.startswith("megasr") for i in imps if i.absolute]
    assert comfy == ["comfy.model_management"]
    tests_names = _test_module_names(tmp_path)
    assert any(i.target.split(".")[0] in tests_names for i in g["training.stage"])
