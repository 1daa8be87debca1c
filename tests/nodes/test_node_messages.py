"""Smaller messages of issue 29 that used to point the wrong way (checked on the modules as ComfyUI loaded them)."""

from __future__ import annotations

import sys


def _pack(comfy_runner, suffix: str):
    return next(m for k, m in list(sys.modules.items()) if k.endswith(suffix))


def test_clip_width_mismatch_names_the_clip_file_that_fits(comfy_runner) -> None:
    """ViT-L-width weights (the proof's) in a ViT-H workflow: the message says which tower each side is and
    which CLIP vision file to load, not only the two widths."""
    cism = _pack(comfy_runner, ".nodes.cism")
    msg = cism.clip_width_problem(1024, [1, 257, 1280])
    assert "expected CLIP tokens [batch, tokens, 1024], got [1, 257, 1280]" in msg
    assert "trained with ViT-L/14" in msg and "come from ViT-H/14" in msg and "Load CLIP Vision" in msg, msg
    assert "ViT-H/14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in cism.clip_width_problem(1280, [1, 257, 1024])
