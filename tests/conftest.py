"""Shared pytest fixtures: a real ComfyUI 0.3.75 (in-process and as a server), tiny checkpoints, the browser.

Fixtures (all session-scoped unless noted):

- ``comfy_runner``: ComfyUI booted in this process with the pack loaded; ``comfy_runner.run(api_prompt)``
  goes through ``execution.validate_prompt`` + ``execution.PromptExecutor``. Input/output/temp folders are
  temporary; the fixture cache's ``models/<folder>`` is registered for checkpoints, megasr, clip_vision,
  controlnet, vae and loras. The example input image of the shipped workflows is in the input folder.
- ``tiny_sd2_ckpt``: file name (for ``CheckpointLoaderSimple``) of the seeded tiny SD-2 checkpoint (TAESD);
  ``tiny_sd2_kl_ckpt``: the same with the full-size KL VAE.
- ``object_info``: ``/object_info`` computed in-process (what the converter needs).
- ``comfy_server``: the real server on a free loopback port (marker ``server``), stopped by PID.
- ``run_browser`` (function): runs tests/browser/run_workflow.mjs against ``comfy_server``.
- ``no_key_problems`` (function scope): fails the test on any missing/unexpected state-dict key log line.
- ``restore_comfy_dirs`` (function scope): restores the runner's input/output/temp folders afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import checkpoints, comfy
from harness.paths import REPO_ROOT, apply_offline_env, cache_dir

apply_offline_env()

MODEL_FOLDERS = ("checkpoints", "megasr", "clip_vision", "controlnet", "vae", "loras")
EXAMPLE_INPUTS = REPO_ROOT / "workflows" / "input"
BROWSER_DIR = REPO_ROOT / "tests" / "browser"


class _RepoRootIsNotATestPackage:
    """The repository root has an ``__init__.py`` (it is the ComfyUI entry point), so pytest would collect it
    as a package and import it, which needs ComfyUI's ``comfy_api``. Collect it as a plain directory."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        if path == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_RepoRootIsNotATestPackage(), "megasr-repo-root-dir")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``proof`` (the learnability proof, minutes of training) run only when a ``-m`` expression
    names the marker (``bash scripts/test.sh -m proof tests/tools/test_learnability_proof.py``); otherwise skipped."""
    if "proof" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="learnability proof: run it with bash scripts/test.sh -m proof")
    for item in items:
        if item.get_closest_marker("proof") is not None:
            item.add_marker(skip)


def model_root() -> Path:
    return cache_dir() / "models"


def _copy_example_inputs(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in EXAMPLE_INPUTS.glob("*"):
        if f.is_file():
            shutil.copyfile(f, dest / f.name)


@pytest.fixture(scope="session")
def comfy_runner(tmp_path_factory: pytest.TempPathFactory) -> comfy.ComfyRunner:
    base = tmp_path_factory.mktemp("comfy_inprocess")
    _copy_example_inputs(base / "input")
    runner = comfy.get_runner(input_dir=base / "input", output_dir=base / "output", temp_dir=base / "temp")
    for folder in MODEL_FOLDERS:
        runner.register_model_dir(folder, model_root() / folder)
    return runner


@pytest.fixture(scope="session")
def tiny_sd2_ckpt(comfy_runner: comfy.ComfyRunner) -> str:
    path = checkpoints.ensure_tiny_sd2_checkpoint(root=cache_dir())
    assert path.parent == model_root() / "checkpoints"
    return path.name


@pytest.fixture(scope="session")
def tiny_sd2_kl_ckpt(comfy_runner: comfy.ComfyRunner) -> str:
    """Like ``tiny_sd2_ckpt`` but with the full-size SD KL VAE instead of TAESD (slower)."""
    return checkpoints.ensure_tiny_sd2_checkpoint(root=cache_dir(), vae="kl").name


@pytest.fixture(scope="session")
def object_info(comfy_runner: comfy.ComfyRunner) -> dict[str, Any]:
    return comfy_runner.object_info()


@pytest.fixture()
def restore_comfy_dirs(comfy_runner: comfy.ComfyRunner) -> Iterator[None]:
    """Give the process-wide runner its input/output/temp folders back after a test that changes them."""
    import folder_paths

    saved = (folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.get_temp_directory())
    yield
    comfy_runner.set_dirs(*saved)


@pytest.fixture()
def no_key_problems() -> Iterator[None]:
    with comfy.capture_logs() as records:
        yield
    comfy.assert_no_key_problems(records)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from harness.server import ComfyServer, fixture_model_paths

    work = tmp_path_factory.mktemp("comfy_server")
    srv = ComfyServer(work, model_paths=fixture_model_paths(cache_dir()))
    _copy_example_inputs(srv.input_dir)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _browser_missing() -> str | None:
    if shutil.which("chromium") is None and not os.environ.get("CHROMIUM_PATH"):
        return "Debian chromium is not installed (bash scripts/setup.sh --browser)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (bash scripts/setup.sh --browser)"
    if shutil.which("node") is None:
        return "node is not installed"
    return None


@pytest.fixture()
def run_browser(comfy_server: Any, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    why = _browser_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)

    def _run(workflow: Path | None, *extra: str, timeout_s: float = 240) -> dict[str, Any]:
        """Run the driver; ``workflow`` None when ``extra`` says what to open (``--template NAME``)."""
        out = tmp_path / "browser"
        cmd = ["node", str(BROWSER_DIR / "run_workflow.mjs"), "--url", comfy_server.url, "--out", str(out)]
        if workflow is not None:
            cmd += ["--workflow", str(workflow)]
        cmd += ["--timeout", str(int(timeout_s * 1000)), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 60)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise AssertionError(f"browser driver printed no report (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        report = json.loads(lines[-1])
        report["returncode"] = proc.returncode
        report["stderr"] = proc.stderr[-3000:]
        return report

    return _run
