"""Per-tile CISM² semantics on a real 4-tile run cost one batched CLIP encoding per run (issue 18).

Before, every tile re-encoded its LR crop at every model call (4.4 s per tile per call on this machine; a
361-tile image had not finished after 72 minutes). The shipped ``megasr_large_tiled`` workflow runs here in
the real ComfyUI executor with the tiny files; forward hooks on ComfyUI's own CLIP vision module count the
images it encodes and the CPU time it takes, split into the semantics node's whole-image encoding and the
sampler's per-tile encodings.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from megasr_fixtures import megasr_env, prompt

TILES = 4  # 160x144 output, 128 px tiles, 32 px overlap: 2 x 2 tiles, each over a 32x32 LR crop
STEPS = 4
# Stated bound: CPU time of all CLIP vision work during sampling <= K x the semantics node's encoding of one
# image. The 4 crops are 4 images' work (CLIP resizes every crop to its 224 px input), so ~4; K = 6 leaves
# room for noise while one encoding per tile per model call (TILES x STEPS = 16) is far above it.
K = 6.0


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


class ClipVisionMeter:
    """Global module hooks that record each forward of ComfyUI's CLIP vision model:
    (inside the MegaSR Sampler?, images in the batch, CPU seconds of this thread)."""

    def __init__(self) -> None:
        import comfy.clip_model
        import torch

        self._cls = comfy.clip_model.CLIPVisionModelProjection
        self._torch = torch
        self.calls: list[tuple[bool, int, float]] = []
        self._start: list[tuple[bool, float]] = []

    def __enter__(self) -> ClipVisionMeter:
        hooks = self._torch.nn.modules.module
        self._handles = [
            hooks.register_module_forward_pre_hook(self._pre),
            hooks.register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module, args) -> None:  # noqa: ANN001
        if isinstance(module, self._cls):
            self._start.append((_inside_sampler(), time.thread_time()))

    def _post(self, module, args, out) -> None:  # noqa: ANN001
        if isinstance(module, self._cls):
            inside, t0 = self._start.pop()
            self.calls.append((inside, int(out[0].shape[0]), time.thread_time() - t0))


def _inside_sampler() -> bool:
    """Whether the MegaSR Sampler node (nodes/sampler.py of the pack) is on the call stack."""
    f = sys._getframe()
    while f is not None:
        if Path(f.f_code.co_filename).parts[-2:] == ("nodes", "sampler.py"):
            return True
        f = f.f_back
    return False


def test_a_4_tile_run_encodes_each_tile_once_in_one_batched_call(env):
    """Catches per-tile CLIP encodings repeated at every step or model call (16 images instead of 4: the
    tile-semantics cache dropped), tiles encoded one call each instead of one batch (4 calls), and tiles
    that silently fall back to the whole image's tokens (0 images encoded while sampling). Checked by hand:
    with ``if key not in self._semantics:`` in nodes/runtime/tiled_model.py replaced by ``if True:`` the test fails
    on the count (16 images) and on the time bound; with CLIP_CHUNK = 1 it fails on the call count."""
    import folder_paths
    from harness.images import write_test_image

    # Its own LR image: the semantics node and the sampler cannot be answered from an earlier test's cache.
    write_test_image(f"{folder_paths.get_input_directory()}/t_sem_cost.png", width=40, height=36, seed=21)
    p = prompt(
        env,
        "megasr_large_tiled",
        **{
            "LR image.image": "t_sem_cost.png",
            "SaveImage.filename_prefix": "semcost",
            "MegaSRSampler.tile_size": 128,
            "MegaSRSampler.tile_overlap": 32,
            "MegaSRSampler.steps": STEPS,
            "MegaSRSampler.seed": 21,
        },
    )
    with ClipVisionMeter() as meter:
        env[0].run(p)
    node = [c for c in meter.calls if not c[0]]
    sampling = [c for c in meter.calls if c[0]]
    assert [n for _, n, _ in node] == [1], meter.calls  # the semantics node: the whole LR image, once
    assert sum(n for _, n, _ in sampling) == TILES, meter.calls  # each tile's crop encoded exactly once per run
    assert len(sampling) == 1, meter.calls  # the four same-size crops in one batched call
    one = node[0][2]
    spent = sum(t for _, _, t in sampling)
    assert spent <= K * one, f"semantics during sampling took {spent:.2f} s CPU = {spent / one:.1f} x one encoding"


@pytest.mark.parametrize("strength_input", ["strength", "levels"])
def test_cism_strength_0_encodes_no_tile_crops(env, strength_input):
    """Catches per-tile CLIP crops encoded although CISM² is off (global strength 0, or every per-level strength
    0): the tokens are never read then, and each crop costs a full CLIP vision forward (issue 8, part B)."""
    import folder_paths
    from harness.images import write_test_image

    write_test_image(f"{folder_paths.get_input_directory()}/t_sem_off.png", width=40, height=36, seed=22)
    off = {"MegaSRCismInjection.strength": 0.0}
    if strength_input == "levels":
        off = {
            f"MegaSRCismInjection.{name}": 0.0
            for name in ("strength_full_res", "strength_half_res", "strength_quarter_res", "strength_eighth_res")
        }
    p = prompt(
        env,
        "megasr_large_tiled",
        **{
            "LR image.image": "t_sem_off.png",
            "SaveImage.filename_prefix": f"semoff_{strength_input}",
            "MegaSRSampler.tile_size": 128,
            "MegaSRSampler.tile_overlap": 32,
            "MegaSRSampler.steps": 1,
            "MegaSRSampler.seed": 22,
            **off,
        },
    )
    for n in p.values():  # no DAGE maps: only the CLIP work matters here
        if n["class_type"] == "MegaSRGuidanceFusion":
            for name in ("hed", "depth", "seg"):
                n["inputs"].pop(name, None)
    with ClipVisionMeter() as meter:
        env[0].run(p)
    assert [c for c in meter.calls if c[0]] == [], meter.calls  # nothing encoded while sampling
