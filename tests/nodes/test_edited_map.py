"""MegaSR Edited Map (nodes/edited_map.py) in the real ComfyUI 0.3.75: the file the map editor saved goes on exactly.

Catches: a map that is resampled or colour-converted on load (palette colours must survive bit for bit), a
cache keyed on the file name only (an edit saved under the same name would not re-run), a silent size mismatch
with the map it replaces, and unclear errors for a missing file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import comfy as hcomfy
from PIL import Image

SKY = (6, 230, 230)
WALL = (120, 120, 120)


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _seg(w: int, h: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = WALL
    if box:
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = SKY
    return arr


def _prompt(image: str, kind: str = "seg", prefix: str = "edited", original: str | None = None) -> dict:
    p = {
        "1": {"class_type": "MegaSREditedMap", "inputs": {"kind": kind, "image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }
    if original:
        p["3"] = {"class_type": "LoadImage", "inputs": {"image": original}}
        p["1"]["inputs"]["original"] = ["3", 0]
    return p


@pytest.fixture()
def input_dir(comfy_runner: hcomfy.ComfyRunner) -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def test_saved_edit_goes_on_bit_exact_and_a_changed_file_reruns(
    comfy_runner: hcomfy.ComfyRunner, input_dir: Path
) -> None:
    name = "megasr_edits/t_edit_seg.png"
    first = _seg(23, 17, (3, 2, 9, 6))
    _write(input_dir / name, first)
    r1 = comfy_runner.run(_prompt(name, prefix="edited_a"))
    out1 = np.asarray(Image.open(r1.images("2")[0]).convert("RGB"))
    assert np.array_equal(out1, first)  # exact palette colours, exact size

    # same name, new content (the editor never does this itself, a user may): the cache must see it
    second = _seg(23, 17, (10, 8, 20, 15))
    _write(input_dir / name, second)
    r2 = comfy_runner.run(_prompt(name, prefix="edited_a"))
    out2 = np.asarray(Image.open(r2.images("2")[0]).convert("RGB"))
    assert np.array_equal(out2, second)
    cached = [set(e.get("nodes", [])) for e in r2.events("execution_cached")]
    assert not any("1" in c for c in cached)

    # unchanged file: answered from the cache, the node does not run again
    r3 = comfy_runner.run(_prompt(name, prefix="edited_a"))
    assert any("1" in set(e.get("nodes", [])) for e in r3.events("execution_cached"))


def test_depth_edit_with_its_original_and_a_size_mismatch(comfy_runner: hcomfy.ComfyRunner, input_dir: Path) -> None:
    gray = np.repeat(np.linspace(0, 255, 19 * 13).reshape(13, 19, 1), 3, axis=2).round()
    _write(input_dir / "megasr_edits/t_edit_depth.png", gray)
    _write(input_dir / "t_orig_depth.png", np.zeros((13, 19, 3)))
    _write(input_dir / "t_orig_small.png", np.zeros((12, 19, 3)))
    r = comfy_runner.run(_prompt("megasr_edits/t_edit_depth.png", "depth", "edited_d", original="t_orig_depth.png"))
    out = np.asarray(Image.open(r.images("2")[0]).convert("RGB"))
    assert np.array_equal(out, gray.astype(np.uint8))

    with pytest.raises(hcomfy.ExecutionFailed) as e:
        comfy_runner.run(_prompt("megasr_edits/t_edit_depth.png", "depth", "edited_e", original="t_orig_small.png"))
    msg = str(e.value)
    assert "MegaSR Edited Map" in msg and "'image'" in msg and "19x13" in msg and "19x12" in msg


def test_missing_file_and_bad_kind_are_named(comfy_runner: hcomfy.ComfyRunner) -> None:
    with pytest.raises(hcomfy.PromptInvalid) as e:
        comfy_runner.validate(_prompt("megasr_edits/not_there.png"))
    assert "MegaSR Edited Map: input 'image'" in str(e.value) and "not_there.png" in str(e.value)
    with pytest.raises(hcomfy.PromptInvalid) as e:
        comfy_runner.validate(_prompt("megasr_edits/not_there.png", kind="normals"))
    assert "input 'kind'" in str(e.value)
