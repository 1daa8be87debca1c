"""The repository's layout rules for tests/ (issue 24): tests by layer, no product code under tests/, and no
product module reaching into tests/.

- tests/ holds tests (``test_*.py`` in a layer folder), ``conftest.py``, the harness package (tests/harness/)
  and the shared fixture modules (tests/fixtures/); the benchmark, the learnability proof, the mutation check
  and their helpers are tools in scripts/tools/, which may run on the test fixtures;
- product code (``__init__.py``, nodes/, megasr/, training/, scripts/ apart from scripts/tools/) never imports
  from tests/ (``harness``, ``megasr_fixtures``, ``conftest`` ...) nor puts tests/ on sys.path: the pack, the
  training package and the headless runner work without the test tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

from harness.paths import REPO_ROOT

TESTS = REPO_ROOT / "tests"
#: The layer folders a test module may live in.
LAYERS = ("core", "nodes", "training", "web", "harness", "tools")
#: Folders under tests/ whose modules are helpers, not tests: the harness package and the shared fixtures.
HELPER_FOLDERS = ("harness", "fixtures")


def _test_tree_modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "node_modules" not in p.parts and "__pycache__" not in p.parts)


def test_no_test_module_at_the_top_of_tests_and_each_in_a_layer_folder() -> None:
    """Catches a test added flat in tests/ (or in a folder that is no layer) instead of its layer's folder, and two
    test modules of one name in two folders (pytest's default import mode would refuse the second)."""
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []
    tests = [p for p in _test_tree_modules() if p.name.startswith("test_")]
    outside = [str(p.relative_to(TESTS)) for p in tests if p.parent.parent != TESTS or p.parent.name not in LAYERS]
    assert not outside, f"test modules outside the layer folders {LAYERS}: {outside}"
    names = [p.name for p in tests]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_no_product_module_lives_under_tests() -> None:
    """Every module under tests/ is a test, conftest.py, or a harness/fixture helper: a tool (benchmark, proof,
    mutation check, a measuring helper) dropped back into tests/ fails here."""
    others = []
    for path in _test_tree_modules():
        rel = path.relative_to(TESTS)
        if path.name.startswith("test_") or rel == Path("conftest.py") or rel.parts[0] in HELPER_FOLDERS:
            continue
        others.append(str(rel))
    assert not others, f"modules under tests/ that are neither tests nor harness/fixture helpers: {others}"


def test_no_product_module_imports_tests() -> None:
    """Product code (nodes/, megasr/, training/, scripts/ but its tools/, __init__.py) never imports from tests/
    (``harness``, ``megasr_fixtures``, ``conftest`` ...) nor puts tests/ on sys.path: the headless runner is
    product code."""
    flat = [p for p in _test_tree_modules() if p.name.startswith("test_") or p.parent.name == "fixtures"]
    test_modules = {p.stem for p in flat} | {"harness", "fixtures", "tests", "conftest"}
    offenders = []
    files = [REPO_ROOT / "__init__.py"]
    for folder in ("nodes", "megasr", "training", "scripts"):
        files += sorted((REPO_ROOT / folder).rglob("*.py"))
    files = [f for f in files if (REPO_ROOT / "scripts" / "tools") not in f.parents]
    for path in files:
        text = path.read_text(encoding="utf-8")
        if '"tests"' in text or "'tests'" in text:
            offenders.append(f"{path.relative_to(REPO_ROOT)}: names the tests folder")
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO_ROOT)}: import {n}" for n in names if n.split(".")[0] in test_modules
            ]
    assert not offenders, offenders
