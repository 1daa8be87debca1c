"""A pytest process killed outright (SIGKILL: no teardown runs) leaves no ComfyUI server behind.

Catches: test servers started without a parent-death signal, which kept running with parent 1 after a killed or
timed-out test run (issue 29).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

pytestmark = [pytest.mark.server, pytest.mark.slow]

INNER = """
import sys, time
sys.path.insert(0, {tests!r})
from harness.server import ComfyServer

def test_hold_a_server(tmp_path):
    srv = ComfyServer(tmp_path / "srv")
    srv.start()
    open({pid_file!r}, "w").write(str(srv.proc.pid))
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent (now init) has not reaped it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_killed_pytest_leaves_no_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER.format(tests=str(REPO_ROOT / "tests"), pid_file=str(pid_file)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(inner)]
    outer = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server_pid = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (pid_file.is_file() and pid_file.read_text()):
            assert outer.poll() is None, "the inner pytest ended before its server started"
            time.sleep(0.5)
        server_pid = int(pid_file.read_text())
        assert _alive(server_pid)
        outer.send_signal(signal.SIGKILL)  # no fixture teardown, no atexit: only the kernel can stop the server
        outer.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(server_pid):
            time.sleep(0.5)
        assert not _alive(server_pid), f"server {server_pid} outlived its killed pytest"
    finally:
        outer.kill()
        if server_pid is not None and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
