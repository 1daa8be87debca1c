"""The pack's keyboard shortcuts do not take a combo the ComfyUI frontend already binds.

Catches: a pack keybinding that the frontend refuses with an error toast on every page load and that runs a core
command instead (Alt+G was the pinned 1.32's "convert to group node"; Alt+M the pinned frontend's "toggle minimap"
and the newest frontend's "toggle linear mode"). Read statically from the frontend bundles that the tests run (the
pinned package in the venv and the newest one setup.sh unpacks), so nothing is mocked or guessed.

The bundles are minified, with keys in either order (``{combo:{..},commandId:..}`` in the core table,
``{commandId:..,combo:{..}}`` in core extensions such as the group-node one) and quotes that differ between
releases: every ``combo:{`` is read together with the object that encloses it, whatever its key order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness.paths import REPO_ROOT

NEWEST_STATIC = REPO_ROOT / ".cache" / "frontend-newest" / "unpacked" / "comfyui_frontend_package" / "static"
COMBO_START = re.compile(r"\bcombo:\s*\{")
COMMAND_ID = re.compile(r"\bcommandId:\s*([\"'`])([^\"'`]+)\1")
Combo = tuple[str, bool, bool, bool]  # key (upper case), ctrl (or meta), alt, shift: the frontend's serialize()


def _enclosing_object(text: str, inside: int) -> str | None:
    """The smallest ``{...}`` around position ``inside`` (braces balanced; minified tables hold none in strings)."""
    depth, i = 0, inside
    while i >= 0:
        if text[i] == "}":
            depth += 1
        elif text[i] == "{":
            if depth == 0:
                break
            depth -= 1
        i -= 1
    if i < 0:
        return None
    depth = 0
    for j in range(i, min(len(text), i + 2000)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i : j + 1]
    return None


def _combo(body: str) -> Combo:
    key = re.search(r"\bkey:\s*([\"'`])(.+?)\1", body)
    assert key, body

    def flag(name: str) -> bool:
        return re.search(rf"\b{name}:\s*(!0|true)", body) is not None

    # KeyComboImpl: serialize() upper-cases the key; fromEvent() folds meta into ctrl
    return key.group(2).upper(), flag("ctrl") or flag("meta"), flag("alt"), flag("shift")


def bindings_in(text: str) -> dict[Combo, str]:
    """Every ``{combo, commandId}`` object in a script, in either key order, as combo -> command id."""
    found: dict[Combo, str] = {}
    for m in COMBO_START.finditer(text):
        obj = _enclosing_object(text, m.start() - 1)
        if obj is None:
            continue
        combo_body = obj[obj.index("combo:") :]
        combo_body = combo_body[: combo_body.index("}") + 1]
        command = COMMAND_ID.search(obj)
        if command and "key" in combo_body:
            found.setdefault(_combo(combo_body), command.group(2))
    return found


def _core_bindings(static: Path) -> dict[Combo, str]:
    found: dict[Combo, str] = {}
    for js in (static / "assets").glob("*.js"):
        for combo, command in bindings_in(js.read_text(encoding="utf-8", errors="replace")).items():
            found.setdefault(combo, command)
    return found


def _frontends() -> list[Path]:
    import comfyui_frontend_package

    pinned = Path(comfyui_frontend_package.__file__).parent / "static"
    return [p for p in (pinned, NEWEST_STATIC) if p.is_dir()]


def test_the_reader_sees_both_key_orders() -> None:
    """The reader itself: the pattern that missed Alt+G read only ``combo`` before ``commandId``."""
    text = (
        'a=[{combo:{key:"m",alt:!0},commandId:"Core.Minimap"}],'
        'keybindings:[{commandId:"Ext.Group",combo:{alt:!0,key:"g"}},{commandId:`X`,combo:{meta:!0,key:`K`}}]'
    )
    assert bindings_in(text) == {
        ("M", False, True, False): "Core.Minimap",
        ("G", False, True, False): "Ext.Group",
        ("K", True, False, False): "X",
    }


def test_pack_keybindings_are_free_in_every_frontend_we_run() -> None:
    pack = bindings_in((REPO_ROOT / "web" / "megasr.js").read_text(encoding="utf-8"))
    assert pack, "web/megasr.js declares no keybinding: update this test's reader"
    frontends = _frontends()
    if len(frontends) < 2:
        pytest.fail(f"expected the pinned and the newest frontend (setup.sh --browser); found {frontends}")
    for static in frontends:
        core = _core_bindings(static)
        # the table was read at all: Ctrl+Enter queues the prompt in every frontend
        assert core.get(("ENTER", True, False, False)) == "Comfy.QueuePrompt", f"{static}: core table not read"
        for combo, command in pack.items():
            assert combo not in core, f"{command} {combo} is already {core[combo]} in {static}"
