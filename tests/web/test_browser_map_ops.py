"""The map editor's pixel operations (web/lib/map_ops.js) under node's test runner, and the JS class list.

Catches: anti-aliased or shifted seg strokes, gray strokes piling up, wrong fill regions, an undo that does not
restore bit for bit, a bicubic that is not torch's; and web/ade20k_palette.json drifting from megasr/dage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from harness.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))


def test_map_ops_under_node() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    proc = subprocess.run(
        ["node", "--test", str(REPO_ROOT / "tests" / "browser" / "map_ops.test.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout


def test_web_palette_is_the_library_palette() -> None:
    """The editor paints the colours the network reads: the JSON equals megasr/dage's palette and names."""
    import build_web_palette

    shipped = (REPO_ROOT / "web" / "ade20k_palette.json").read_text(encoding="utf-8")
    assert shipped == build_web_palette.palette_json(), "run scripts/build_web_palette.py"
    classes = json.loads(shipped)["classes"]
    assert len(classes) == 150 and classes[2] == {"index": 2, "name": "sky", "color": [6, 230, 230]}
    assert len({c["name"] for c in classes}) == 150
