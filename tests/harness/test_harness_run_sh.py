"""The README's main command, as written: ``bash scripts/run.sh`` brings up ComfyUI with the pack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from harness.paths import PACK_NAME, REPO_ROOT, apply_offline_env
from harness.procs import preexec
from harness.server import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_run_sh_serves_the_pack_and_stops_cleanly() -> None:
    port = free_port()
    env = apply_offline_env({**os.environ, "PORT": str(port)})
    proc = subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "run.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec(),  # a killed pytest stops run.sh, whose trap stops its server
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        url = None
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            found = re.search(r"running: (http://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url == f"http://127.0.0.1:{port}", "".join(lines[-40:])
        info = json.loads(urllib.request.urlopen(f"{url}/object_info/MegaSRColorFix", timeout=30).read())
        assert "MegaSRColorFix" in info
        extensions = json.loads(urllib.request.urlopen(f"{url}/extensions", timeout=30).read())
        assert f"/extensions/{PACK_NAME}/megasr.js" in extensions
        templates = json.loads(urllib.request.urlopen(f"{url}/workflow_templates", timeout=30).read())
        assert "megasr_color_fix" in templates.get(PACK_NAME, [])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # run.sh's trap stops ComfyUI (its own child) and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait(timeout=30)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5)
