"""Every bit depth read right, or warned about, through the real ComfyUI executor (issue 29).

Catches: a 16-bit PNG through core Load Image that arrives clipped to white with no word (now a warning naming
node, input and the fix); an int32 tensor of 16-bit values divided by 2^31 (black output); a relative-depth map
(0..6.96, MiDaS style) read as 0..255 (nearly black); a decompression-bomb PNG in the Edited Map node that
surfaced as a raw PIL traceback.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import comfy as hcomfy
from PIL import Image

from megasr.images import normalise_depth_map

W, H = 40, 24


class _Int32Gradient:
    """A test-only node producing an int32 IMAGE holding 16-bit values (what some loaders and scripts hand on)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's V1 node API
        return {"required": {"top": ("INT", {"default": 65535, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, top: int):
        ramp = torch.linspace(0, top, W).round().to(torch.int32)
        return (ramp.view(1, 1, W, 1).expand(1, H, W, 3).contiguous(),)


@pytest.fixture()
def int_node(comfy_runner: hcomfy.ComfyRunner):
    import nodes

    nodes.NODE_CLASS_MAPPINGS["MegaSRTestInt32Gradient"] = _Int32Gradient
    yield "MegaSRTestInt32Gradient"
    nodes.NODE_CLASS_MAPPINGS.pop("MegaSRTestInt32Gradient", None)


def _colorfix_prompt(source: dict, prefix: str) -> dict:
    return {
        "1": source,
        "2": {"class_type": "MegaSRColorFix", "inputs": {"image": ["1", 0], "reference": ["1", 0], "mode": "none"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def _run_logged(runner: hcomfy.ComfyRunner, prompt: dict) -> tuple[np.ndarray, str]:
    from comfyrun.runner import capture_logs

    with capture_logs(logging.INFO) as records:
        result = runner.run(prompt)
    out = np.asarray(Image.open(result.images("3")[0]).convert("RGB")).astype(np.int32)
    return out, "\n".join(r.getMessage() for r in records)


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_int32_tensor_of_16_bit_values_is_scaled_by_its_range(comfy_runner, int_node) -> None:
    out, logs = _run_logged(comfy_runner, _colorfix_prompt({"class_type": int_node, "inputs": {"top": 65535}}, "i32"))
    want = np.round(np.linspace(0, 65535, W).round() / 65535 * 255)
    assert np.abs(out[0, :, 0] - want).max() <= 1, out[0, :, 0]  # a gradient, not black (÷ 2^31)
    assert "integer image (int32) with values up to 65535: read as 0..65535 (16-bit)" in logs, logs
    assert "MegaSR" in logs.split("integer image")[0].splitlines()[-1]  # the line names the node


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_int32_tensor_of_8_bit_values_stays_8_bit(comfy_runner, int_node) -> None:
    out, logs = _run_logged(comfy_runner, _colorfix_prompt({"class_type": int_node, "inputs": {"top": 255}}, "i8"))
    assert np.abs(out[0, :, 0] - np.linspace(0, 255, W).round()).max() <= 1
    assert "read as 0..255 (8-bit)" in logs, logs


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_16_bit_png_through_core_load_image_is_warned_about(comfy_runner) -> None:
    import folder_paths

    name = "bitdepth_16.png"
    ramp = np.linspace(0, 65535, W * H).reshape(H, W).astype(np.uint16)  # a few dark pixels, the rest clips
    Image.fromarray(ramp).save(Path(folder_paths.get_input_directory()) / name)
    out, logs = _run_logged(
        comfy_runner, _colorfix_prompt({"class_type": "LoadImage", "inputs": {"image": name}}, "p16")
    )
    assert 0.95 < (out == 255).mean() < 1  # what core Load Image makes of it (ComfyUI 0.3.75): not all white
    line = next((x for x in logs.splitlines() if "pure white" in x), "")
    assert "MegaSR Colour Fix" in line and "'image'" in line and "16-bit PNG" in line and "8-bit PNG" in line, logs


def test_relative_depth_map_is_min_max_normalised(comfy_runner) -> None:
    """MS-GAM's depth rule (nodes/msgam.map_to_network, as ComfyUI loaded it): 0..6.96 becomes 0..1 by min-max,
    not 0..0.03 by ÷255; other maps keep the 0..255 rule."""
    import sys

    msgam = next(m for k, m in list(sys.modules.items()) if k.endswith(".nodes.msgam"))
    msgam_map_to_network = msgam.map_to_network

    depth = torch.linspace(0, 6.96, W).view(1, 1, W, 1).expand(1, H, W, 1).contiguous()
    got = msgam_map_to_network("depth", depth, "MegaSR MS-GAM", (H, W), 1)
    assert got.shape == (1, 1, H, W)
    torch.testing.assert_close(got[0, 0, 0], torch.linspace(0, 1, W), atol=1e-5, rtol=0)
    seg_like = torch.full((1, H, W, 3), 200.0)  # other maps keep the 0..255 rule
    torch.testing.assert_close(normalise_depth_map(depth[..., :1] / 6.96, "x", "depth"), depth / 6.96)
    assert float(msgam_map_to_network("hed", seg_like, "MegaSR MS-GAM", (H, W), 1).max()) == pytest.approx(200 / 255)


def _bomb_png(path: Path, w: int = 20000, h: int = 10000) -> None:
    """A PNG whose header claims 200 M pixels (over PIL's bomb limit); the file itself is tiny."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.usefixtures("restore_comfy_dirs")
def test_decompression_bomb_in_edited_map_names_node_and_input(comfy_runner) -> None:
    import folder_paths

    name = "megasr_edits/bomb.png"
    path = Path(folder_paths.get_input_directory()) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _bomb_png(path)
    prompt = {
        "1": {"class_type": "MegaSREditedMap", "inputs": {"kind": "depth", "image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bomb"}},
    }
    with pytest.raises(hcomfy.ExecutionFailed) as err:
        comfy_runner.run(prompt)
    e = err.value
    assert e.exception_type.endswith("MegaSRInputError"), e.exception_type
    assert "MegaSR Edited Map" in e.exception_message and "'image'" in e.exception_message
    assert "too large to decode safely" in e.exception_message, e.exception_message
