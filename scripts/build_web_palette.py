"""Writes web/ade20k_palette.json (the map editor's class list) from megasr/dage: names and palette colours.

Run after changing either:  .venv/bin/python scripts/build_web_palette.py
tests/web/test_browser_map_ops.py fails when the file and the library disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "web" / "ade20k_palette.json"


def palette_json() -> str:
    sys.path.insert(0, str(ROOT))
    from megasr.dage.ade20k_names import ADE20K_CLASS_NAMES
    from megasr.dage.encodings import ADE20K_PALETTE

    classes = [
        {"index": i, "name": name, "color": list(color)}
        for i, (name, color) in enumerate(zip(ADE20K_CLASS_NAMES, ADE20K_PALETTE, strict=True))
    ]
    rows = ",\n".join("  " + json.dumps(c) for c in classes)
    source = json.dumps("megasr/dage/ade20k_names.py + megasr/dage/encodings.py ADE20K_PALETTE")
    return f'{{"source": {source},\n "classes": [\n{rows}\n]}}\n'


if __name__ == "__main__":
    OUT.write_text(palette_json(), encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
