"""The extractor-kind registry (megasr/dage/kinds.py, issue 24) is the one definition of every kind name.

Checks anyone can repeat: each distinctive kind string (weight component, training stage, config section, the DAGE
Loader's choice) is a string literal of the product code exactly once, in the registry; no product module spells
the map kinds out as a list of its own; the web code's generated copies equal the registry; one version
everywhere.
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
import tokenize
import tomllib
from pathlib import Path

import pytest

from megasr.dage import kinds as K

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "megasr/dage/kinds.py"
GENERATED = {"web/extractor_kinds.json", "web/lib/extractor_kinds.js"}


def product_files() -> list[str]:
    files = [REPO / "__init__.py"]
    for folder in ("megasr", "nodes", "scripts", "training"):
        files += sorted((REPO / folder).rglob("*.py"))
    files += sorted((REPO / "web").rglob("*.js"))
    rel = [str(p.relative_to(REPO)) for p in files]
    # scripts/tools/ holds dev tools (benchmark, proof), not product code: they may name what they measure
    return [f for f in rel if f not in GENERATED and not f.startswith("scripts/tools/")]


def distinctive_names() -> set[str]:
    """The names that only the registry may spell (the short kinds double as input and map names)."""
    names = set()
    for k in K.KINDS:
        names |= {n for n in (k.component, k.stage, k.config_section, k.node_choice) if n is not None}
    return names - {k.kind for k in K.KINDS}


def python_literals(path: Path) -> list[tuple[int, str]]:
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):  # f-strings
                continue
            if isinstance(value, str):
                out.append((tok.start[0], value))
    return out


JS_STRING = re.compile(r"""(["'`])((?:\\.|(?!\1).)*)\1""")
JS_COMMENT = re.compile(r"^\s*//.*$|\s//.*$", re.M)


def js_literals(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(JS_COMMENT.sub("", path.read_text(encoding="utf-8")).splitlines(), 1):
        out += [(n, m.group(2)) for m in JS_STRING.finditer(line)]
    return out


def literals(rel: str) -> list[tuple[int, str]]:
    path = REPO / rel
    return python_literals(path) if rel.endswith(".py") else js_literals(path)


def test_each_kind_string_is_defined_once_in_the_registry():
    """Catches a module that spells a component, stage, config section or loader choice itself (``"dage_hed"``,
    ``"clip_lora"``, ``"dage-depth"`` ...) instead of reading the registry."""
    names = distinctive_names()
    assert {"dage_hed", "dage_depth_lora", "dage_clip_lora", "clip_lora", "dage-seg", "dage_depth"} <= names
    found: dict[str, list[str]] = {name: [] for name in names}
    for rel in product_files():
        for line, value in literals(rel):
            if value in found:
                found[value].append(f"{rel}:{line}")
    for name, where in found.items():
        # one row may spell a name twice (dage_seg is both the component and the config section)
        assert where and all(w.startswith(REGISTRY + ":") for w in where), f"'{name}' is spelled at {where}"


def _kind_lists_py(rel: str) -> list[int]:
    tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
    maps = set(K.MAP_KINDS)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            values = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if maps <= values:
                hits.append(node.lineno)
    return hits


def test_no_product_module_lists_the_map_kinds_itself():
    """Catches ``("hed", "depth", "seg")`` written out again (a new map kind would be missed there)."""
    hits = []
    for rel in product_files():
        if rel == REGISTRY:
            continue
        if rel.endswith(".py"):
            hits += [f"{rel}:{n}" for n in _kind_lists_py(rel)]
        else:
            text = JS_COMMENT.sub("", (REPO / rel).read_text(encoding="utf-8"))
            for m in re.finditer(r"\[([^\[\]]*)\]", text):
                if set(K.MAP_KINDS) <= {s.group(2) for s in JS_STRING.finditer(m.group(1))}:
                    hits.append(f"{rel}:{text[: m.start()].count(chr(10)) + 1}")
    assert not hits, f"these list the map kinds themselves; read MAP_KINDS instead: {hits}"


def test_the_scan_sees_a_respelled_kind(tmp_path):
    """The scanners themselves find a literal, in Python and in JS (a scan that reads nothing passes anything)."""
    py = tmp_path / "x.py"
    py.write_text('"""docstring naming dage_hed"""\nCOMPONENT = "dage_hed"\nKINDS = ("seg", "hed", "depth")\n')
    assert [v for _, v in python_literals(py) if v == "dage_hed"] == ["dage_hed"]
    js = tmp_path / "x.js"
    js.write_text('// "clip_lora" in a comment\nconst k = ["hed", "depth", "seg"]; const c = "clip_lora";\n')
    assert [v for _, v in js_literals(js) if v == "clip_lora"] == ["clip_lora"]


def test_registry_rows_match_their_extractor_classes():
    for k in K.KINDS:
        cls = k.extractor_class()
        module = sys.modules[cls.__module__]
        assert cls.kind == k.kind and module.COMPONENT == k.component
        for name in (k.kind, k.component, k.stage, k.node_choice):
            assert name is None or K.lookup(name) is k
    with pytest.raises(ValueError, match="not a guidance-extractor kind"):
        K.lookup("normal")


def test_weight_components_come_from_the_registry():
    from megasr import weights

    assert weights.COMPONENTS == ("controlnet", *K.DAGE_COMPONENTS)
    assert all(weights.COMPONENT_DESCRIPTIONS[k.component] == k.description for k in K.KINDS)


def test_the_web_copies_equal_the_registry():
    """web/extractor_kinds.json and the ES module web/lib/extractor_kinds.js are regenerated from the registry
    (``python scripts/build_workflows.py --web-kinds``) whenever it changes."""
    data = json.loads((REPO / "web" / "extractor_kinds.json").read_text(encoding="utf-8"))
    assert data == K.registry_json()
    js = (REPO / "web" / "lib" / "extractor_kinds.js").read_text(encoding="utf-8")
    body = js.split("export const EXTRACTOR_KINDS = ", 1)[1].rstrip().removesuffix(";")
    assert json.loads(body) == K.registry_json()
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_workflows
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for path, text in build_workflows.web_kinds_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run scripts/build_workflows.py --web-kinds"


def test_one_version_everywhere():
    """pyproject.toml (what the Comfy Registry publishes), megasr.__version__ and the web extension agree."""
    import megasr

    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    web = re.findall(r'^const VERSION = "([^"]+)";', (REPO / "web" / "megasr.js").read_text(encoding="utf-8"), re.M)
    assert web == [version] and megasr.__version__ == version
    others = [p for p in (REPO / "web").rglob("*.js") if p.name != "megasr.js" and "VERSION =" in p.read_text()]
    assert not others, f"the web version is defined once, in web/megasr.js: {others}"


def test_extractor_classes_import_when_the_core_is_not_a_top_level_package(tmp_path):
    """Inside ComfyUI the core is ``<pack folder>.megasr`` and no top-level ``megasr`` exists: the registry must
    import each extractor relative to itself (an absolute ``megasr.dage.hed`` import fails only in a real server)."""
    import subprocess
    import sys

    pack = tmp_path / "SomePackFolder"
    pack.mkdir()
    (pack / "__init__.py").write_text("")
    (pack / "megasr").symlink_to(REPO / "megasr", target_is_directory=True)
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('megasr') is None, 'a top-level megasr is importable'\n"
        "from SomePackFolder.megasr.dage import kinds\n"
        "for k in kinds.KINDS:\n"
        "    cls = k.extractor_class()\n"
        "    assert cls.__module__.startswith('SomePackFolder.megasr.'), cls.__module__\n"
        "    assert cls.__name__ == k.class_name\n"
        "print(len(kinds.KINDS))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(len(K.KINDS))
