"""The package installs: a wheel built from pyproject.toml gives a working ``megasr-train`` in a fresh venv,
run from another folder (issue 13). Offline: no build isolation, no index; the venv sees the test venv's
packages through a ``.pth`` file so the dependencies resolve without downloading anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "megasr", "training")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_installs_megasr_train_that_runs_from_another_folder(tmp_path: Path) -> None:
    """Catches a pyproject without a build system or package list (no wheel, or a wheel without the package),
    package data left out (the bundled configs and tag vocabulary: every stage's default config would be
    "not found"), a console script pointing at a wrong function, and code that only works from the repo root."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building in the checkout would leave build/ and *.egg-info there
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    built = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)], src)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("training/configs/megasr_sd2.yaml", "training/configs/dage_hed.yaml", "megasr/manifest.json"):
        assert need in names
    assert "megasr/data/tag_vocabulary.txt" in names and "training/cli.py" in names
    assert not any(n.startswith(("nodes/", "tests/", "web/")) or n == "__init__.py" for n in names)

    venv = tmp_path / "venv"
    made = _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    Path(purelib.stdout.strip(), "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = _run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], tmp_path)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = str(venv / "bin" / "megasr-train")
    helped = _run([script, "--help"], elsewhere)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: megasr-train") and "all" in helped.stdout
    where = _run(
        [str(py), "-c", "import training, megasr; print(training.__file__); print(megasr.__file__)"], elsewhere
    )
    assert all(str(venv) in line for line in where.stdout.split()), where.stdout  # the installed copy, not the repo
    # a config check: every stage's bundled config is found inside the installed package; the missing inputs
    # are reported together, one message, exit 2
    checked = _run([script, "all", "--input", "photos", "--out", "run"], elsewhere)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert checked.stderr.startswith("megasr-train all: error:") and "Traceback" not in checked.stderr
    assert "--input: 'photos' does not exist" in checked.stderr and "--base: no SD-2 base given" in checked.stderr
    assert "--config" not in checked.stderr and "not found" not in checked.stderr
    assert not (elsewhere / "run").exists()
