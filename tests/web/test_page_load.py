"""A new user's first page load, on the pinned and the newest frontend: no error and no toast from the pack, and the
gallery shortcut (pressed on the canvas) opens the pack's gallery rather than a core command.

Catches: a pack keybinding that a frontend already binds (the frontend throws "Keybinding on Alt + g already exists
on Comfy.GroupNode.ConvertSelectedNodesToGroupNode" as a red toast on every load, and the key runs the core command);
any exception the extension raises while it registers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness.paths import PACK_NAME, REPO_ROOT, cache_dir

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

DRIVER = REPO_ROOT / "tests" / "browser" / "page_load.mjs"
NEWEST_FRONTEND = REPO_ROOT / ".cache" / "frontend-newest" / "unpacked" / "comfyui_frontend_package" / "static"
HOST = re.compile(r"https?://127\.0\.0\.1:\d+")


def _load(server: Any, out: Path, *extra: str) -> dict:
    cmd = ["node", str(DRIVER), "--url", server.url, "--out", str(out), "--key", "j", "--alt", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report_path = out / "report.json"
    assert report_path.is_file(), f"driver wrote no report (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert report["ok"], report.get("error")
    return report


def _messages(report: dict) -> set[str]:
    return {HOST.sub("SERVER", e)[:160] for e in report["console_errors"] + report["page_errors"]}


def _check(with_pack: dict, bare: dict) -> None:
    """Zero errors the pack adds: what the page logs with the pack, less what the same frontend logs on a server
    without custom nodes (an offline server makes the frontend itself log 404s and blocked hub requests)."""
    added = sorted(_messages(with_pack) - _messages(bare))
    ours = [e for e in _messages(with_pack) if "megasr" in e.lower() or "keybinding" in e.lower()]
    assert added == [] and ours == [], json.dumps({"added": added, "ours": ours}, indent=1)
    pack_requests = [r for r in with_pack["failed_requests"] if PACK_NAME in r]
    assert pack_requests == [], pack_requests
    assert with_pack["toasts"] == [], with_pack["toasts"]
    assert with_pack["gallery_opened"], json.dumps(with_pack, indent=1)[:4000]
    assert with_pack["toasts_after_shortcut"] == [], with_pack["toasts_after_shortcut"]


def _bare_report(work: Path, extra_args: list[str]) -> dict:
    from harness.server import ComfyServer

    srv = ComfyServer(work / "bare_server", extra_args=["--disable-all-custom-nodes", *extra_args])
    srv.start()
    try:
        return _load(srv, work / "bare", "--bare", "1")
    finally:
        srv.stop()


@pytest.fixture()
def browser_ready() -> None:
    from conftest import _browser_missing

    why = _browser_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def test_pinned_frontend_page_load_is_clean(browser_ready: None, comfy_server: Any, tmp_path: Path) -> None:
    report = _load(comfy_server, tmp_path / "pinned")
    assert report["frontend_version"] and report["frontend_version"].startswith("1.32"), report["frontend_version"]
    _check(report, _bare_report(tmp_path, []))


def test_newest_frontend_page_load_is_clean(browser_ready: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    if not (NEWEST_FRONTEND / "index.html").is_file():
        if os.environ.get("CI"):
            pytest.fail("the newest frontend is not installed (bash scripts/setup.sh --browser)")
        pytest.skip("the newest frontend is not installed (bash scripts/setup.sh --browser)")
    from harness.server import ComfyServer, fixture_model_paths

    work = tmp_path_factory.mktemp("comfy_server_newest_page_load")
    srv = ComfyServer(
        work, model_paths=fixture_model_paths(cache_dir()), extra_args=["--front-end-root", str(NEWEST_FRONTEND)]
    )
    srv.start()
    try:
        report = _load(srv, work / "report")
    finally:
        srv.stop()
    assert report["frontend_version"] and report["frontend_version"].startswith("1.58"), report["frontend_version"]
    _check(report, _bare_report(work, ["--front-end-root", str(NEWEST_FRONTEND)]))
