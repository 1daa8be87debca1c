"""The pack's keyboard shortcuts do not take a combo the ComfyUI frontend already binds.

Catches: a pack keybinding that silently replaces a core one (Alt+M was the pinned frontend's "toggle minimap"
and the newest frontend's "toggle linear mode"). Read statically from the frontend bundles that the tests run
(the pinned package in the venv and the newest one setup.sh unpacks), so nothing is mocked or guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness.paths import REPO_ROOT

NEWEST_STATIC = REPO_ROOT / ".cache" / "frontend-newest" / "unpacked" / "comfyui_frontend_package" / "static"
# combo:{alt:!0,key:"m"},commandId:"X"  (minified; quote style differs between releases)
CORE_BINDING = re.compile(r"combo:\{([^{}]*)\},commandId:[\"'`]([^\"'`]+)[\"'`]")
PACK_BINDING = re.compile(r"commandId:\s*\"([^\"]+)\",\s*combo:\s*\{([^{}]*)\}")


def _combo(body: str) -> tuple[str, bool, bool, bool, bool]:
    key = re.search(r"key:\s*([\"'`])(.+?)\1", body)
    assert key, body

    def flag(name: str) -> bool:
        return re.search(rf"\b{name}:\s*(!0|true)", body) is not None

    return key.group(2).lower(), flag("ctrl"), flag("alt"), flag("shift"), flag("meta")


def _core_bindings(static: Path) -> dict[tuple, str]:
    found: dict[tuple, str] = {}
    for js in (static / "assets").glob("*.js"):
        for body, command in CORE_BINDING.findall(js.read_text(encoding="utf-8", errors="replace")):
            if "key" in body:
                found.setdefault(_combo(body), command)
    return found


def _frontends() -> list[Path]:
    import comfyui_frontend_package

    pinned = Path(comfyui_frontend_package.__file__).parent / "static"
    return [p for p in (pinned, NEWEST_STATIC) if p.is_dir()]


def test_pack_keybindings_are_free_in_every_frontend_we_run() -> None:
    pack = PACK_BINDING.findall((REPO_ROOT / "web" / "megasr.js").read_text(encoding="utf-8"))
    assert pack, "web/megasr.js declares no keybinding: update this test's pattern"
    frontends = _frontends()
    if len(frontends) < 2:
        pytest.fail(f"expected the pinned and the newest frontend (setup.sh --browser); found {frontends}")
    for static in frontends:
        core = _core_bindings(static)
        assert ("m", False, True, False, False) in core or ("m", False, True, True, False) in core, (
            f"{static}: the core keybinding table was not read (pattern out of date?)"
        )
        for command, body in pack:
            combo = _combo(body)
            assert combo not in core, f"{command} {combo} is already {core[combo]} in {static}"
