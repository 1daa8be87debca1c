"""Comfy Registry readiness (issue 15): metadata as comfy-cli's parser reads it, exactly the files
`comfy node publish` would ship (git-tracked minus .comfyignore), the registry's ruff security rules and a
pattern scan over those files, and an install into this ComfyUI 0.3.75 environment that changes nothing."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# comfy-cli `comfy node validate` (comfy_cli/command/custom_nodes/command.py, commit e805d26b) runs
# `ruff check . --select S102,S307,E702`: exec, eval, several statements on one line.
REGISTRY_RUFF_RULES = "S102,S307,E702"

# Patterns the registry's scanner flags in shipped code (docs.comfy.org/registry/standards: no eval/exec, no
# subprocess pip installs, no obfuscation; issue 15: subprocess, os.environ reads, undeclared network I/O).
FLAGGED = {
    "subprocess": re.compile(r"\bsubprocess\b"),
    "os.system/popen": re.compile(r"\bos\.(system|popen|exec\w*|spawn\w*)\b"),
    "environment read": re.compile(r"\bos\.(environ|getenv)\b|\bgetenv\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "dynamic JS code": re.compile(r"\bnew\s+Function\s*\("),
    "socket": re.compile(r"\bimport\s+socket\b|\bsocket\.socket\b"),
    "raw HTTP": re.compile(r"\burlopen\b|\bimport\s+requests\b|\bhttp\.client\b|\baiohttp\.ClientSession\b"),
    "pip": re.compile(r"\bpip\s+install\b|\bensurepip\b"),
}
# (file, flag) pairs that are known and accepted; each says why. Nothing else may match.
ACCEPTED: dict[tuple[str, str], str] = {}
# Network access is allowed only in the documented opt-in download path.
NETWORK_MODULES = re.compile(r"^\s*(?:from|import)\s+(huggingface_hub)\b", re.M)
DOWNLOAD_PATH = {"megasr/download.py"}


def shipped_files() -> list[str]:
    """What comfy-cli's zip_files packs: `git ls-files`, minus paths matching .comfyignore (gitwildmatch)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    ignored = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    drop = set(ignored.stdout.split())
    return sorted(f for f in tracked.stdout.split() if f not in drop and (REPO / f).is_file())


@pytest.fixture(scope="module")
def shipped() -> list[str]:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the ship list is defined by git-tracked files")
    return shipped_files()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_metadata_is_complete_as_comfy_cli_reads_it(pyproject):
    """Catches the gaps issue 15 lists (no licence, no Repository URL, empty Icon, no classifiers) and values
    comfy-cli's parser rejects or silently drops (bad version spec, invalid OS/accelerator classifier)."""
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == "Apache-2.0" and (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert project["urls"]["Repository"].startswith("https://")
    classifiers = project["classifiers"]
    os_values = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System ::")]
    assert os_values and all(v.split(" :: ")[0] in {"Microsoft", "POSIX", "MacOS", "OS Independent"} for v in os_values)
    env = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert all(e in {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                     "GPU :: Apple Metal"} for e in env)  # fmt: skip
    assert re.fullmatch(r">=\s*\d+\.\d+\.\d+", comfy["requires-comfyui"]) and comfy["requires-comfyui"] == ">=0.3.75"
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy.get("Icon", "https://").startswith("https://")  # absent, or a real URL (never "")


def _requirement_lines(path: Path) -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("-r")]


def test_requirements_match_pyproject_and_training_is_an_extra(pyproject):
    """requirements.txt (what ComfyUI-Manager installs) and [project].dependencies say the same; training-only
    libraries sit behind the `train` extra; libraries the pack never imports are gone."""
    deps = pyproject["project"]["dependencies"]
    assert _requirement_lines(REPO / "requirements.txt") == deps
    train = pyproject["project"]["optional-dependencies"]["train"]
    assert _requirement_lines(REPO / "requirements-train.txt") == train
    names = {re.split(r"[<>=!~ ]", d)[0].lower() for d in deps}
    assert {"accelerate", "kornia"}.isdisjoint(names) and {"accelerate", "kornia"} <= {
        re.split(r"[<>=!~ ]", d)[0].lower() for d in train
    }
    assert {"timm", "opencv-python-headless", "scikit-image", "einops"}.isdisjoint(names)


def test_every_third_party_import_of_shipped_code_is_declared(shipped, pyproject):
    """Catches a node-side import of a training-only or undeclared library (it would fail for registry users)."""
    declared = {re.split(r"[<>=!~ ]", d)[0].lower().replace("-", "_") for d in pyproject["project"]["dependencies"]}
    from_comfyui = {"torch", "torchvision", "numpy", "PIL", "comfy", "comfy_api", "folder_paths", "latent_preview",
                    "nodes", "server", "einops", "kornia", "yaml", "tqdm", "safetensors"}  # fmt: skip
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, str] = {}
    for f in shipped:
        if f.endswith(".py"):
            for node in ast.walk(ast.parse((REPO / f).read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], f)
    undeclared = {
        mod: f
        for mod, f in found.items()
        if mod not in stdlib and mod not in from_comfyui and mod.lower() not in declared and mod != "__future__"
    }
    assert not undeclared, undeclared


def test_ship_list_holds_what_node_users_need_and_nothing_else(shipped):
    """Catches a .comfyignore that drops a node file or the example input, or ships tests/training/CI."""
    for need in ("__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt", "web/megasr.js"):
        assert need in shipped, need
    assert any(f.startswith("nodes/") for f in shipped) and any(f.startswith("megasr/") for f in shipped)
    assert any(f.startswith("workflows/input/") for f in shipped)
    tracked_workflows = {f for f in shipped_files() if f.startswith("workflows/") and f.endswith(".json")}
    assert tracked_workflows and tracked_workflows <= set(shipped)
    for gone in ("tests/", "training/", "scripts/", ".ci/"):
        assert not any(f.startswith(gone) for f in shipped), gone
    for f in shipped:  # shipped code must not reach into what does not ship
        if f.endswith(".py"):
            text = (REPO / f).read_text(encoding="utf-8")
            assert not re.search(r"^\s*(from|import)\s+(training|tests|scripts)\b", text, re.M), f


def test_registry_ruff_rules_pass_on_the_shipped_files(shipped):
    """The registry's own check (S102 exec, S307 eval, E702 multiple statements), as an error instead of a
    warning, over exactly the shipped Python files."""
    py = [f for f in shipped if f.endswith(".py")]
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", REGISTRY_RUFF_RULES, *py],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_shipped_code_has_no_flagged_pattern_outside_the_accepted_list(shipped):
    """Catches subprocess, environment reads, eval/exec, raw sockets/HTTP, pip in any shipped .py/.js file;
    network libraries only in the documented download path. Accepted entries must still be needed."""
    hits: dict[tuple[str, str], str] = {}
    for f in shipped:
        if not f.endswith((".py", ".js")):
            continue
        text = (REPO / f).read_text(encoding="utf-8")
        code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith(("#", "//")))
        for flag, pattern in FLAGGED.items():
            m = pattern.search(code)
            if m:
                hits[(f, flag)] = m.group(0)
        if NETWORK_MODULES.search(code) and f not in DOWNLOAD_PATH:
            hits[(f, "network library")] = NETWORK_MODULES.search(code).group(0).strip()
    unexpected = {k: v for k, v in hits.items() if k not in ACCEPTED}
    assert not unexpected, unexpected
    stale = [k for k in ACCEPTED if k not in hits]
    assert not stale, f"accepted entries no longer needed (remove them): {stale}"


@pytest.mark.slow
def test_installing_the_requirements_into_this_comfyui_env_changes_no_package(tmp_path):
    """`pip install --dry-run --report` of requirements.txt into this ComfyUI 0.3.75 environment (no index:
    only what is installed may satisfy it). Catches a bound that would up- or downgrade a package ComfyUI (or
    its torch) pins; pip fails outright when a bound is not met by what is installed."""
    report = tmp_path / "report.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(REPO / "requirements.txt"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    changes = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert not changes, f"installing the pack would change: {changes}"
