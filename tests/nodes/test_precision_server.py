"""Every precision mode a user can start ComfyUI in (issue 17): `megasr_x4` and `megasr_large_tiled` in a real
ComfyUI 0.3.75 server (CPU) started with fp32 (no option), --fp16-unet, --bf16-unet, --fp8_e4m3fn-unet,
--bf16-vae and a low-memory budget (--reserve-vram), one server per option, tiny generated weights, same seed everywhere.

Before the dtype split, --fp16-unet/--bf16-unet failed in the MegaSR Sampler ("compute_index_ranges_weights"
not implemented for 'Half': a map resized in the model dtype) and --fp8_e4m3fn-unet with "clamp_scalar_cpu"
not implemented for 'Float8_e4m3fn' (the MegaSR model computed in its fp8 storage dtype).

Closeness to fp32 (8-bit outputs, mean absolute difference over the image, 0..255): MEASURED holds the first
honest run (2026-12-02, torch 2.14.1 CPU, 2 steps, random tiny weights), MAX_MEAN_DIFF about 3x it. fp8 storage
of a random U-Net is far off fp32 (about 8 levels), so its bound only catches a broken run, not a subtle one. On CPU
no budget makes ComfyUI load a model partially (--lowvram is refused with --cpu; --reserve-vram only forces
unloading); partial loading itself is exercised in tests/core/test_precision.py with ComfyUI's own
ModelPatcher.load(lowvram_model_memory=1).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from megasr_fixtures import megasr_env, prompt
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.server]

OPTIONS = {
    "fp32": [],
    "fp16-unet": ["--fp16-unet"],
    "bf16-unet": ["--bf16-unet"],
    "fp8_e4m3fn-unet": ["--fp8_e4m3fn-unet"],
    "bf16-vae": ["--bf16-vae"],
    # --lowvram/--novram are refused next to --cpu (one argparse group); --reserve-vram is the low-memory budget a
    # CPU server takes: with 1000 GB reserved, model management unloads every model before it loads the next
    "reserve-vram": ["--reserve-vram", "1000"],
}
GRAPHS = {
    "megasr_x4": ({"MegaSRSampler.seed": 11}, (44, 52)),  # 4 x the 13 x 11 LR
    "megasr_large_tiled": (
        {"MegaSRSampler.seed": 11, "LR image.image": "t_big.png", "MegaSRSampler.tile_size": 128,
         "MegaSRSampler.tile_overlap": 32},
        (144, 160),
    ),
}  # fmt: skip
# mean |option - fp32| in 8-bit levels (megasr_x4, megasr_large_tiled), first honest run; bounds about 3x
MEASURED = {
    "fp32": (0.0, 0.0),
    "fp16-unet": (0.045, 0.053),
    "bf16-unet": (0.592, 0.352),
    "fp8_e4m3fn-unet": (7.817, 5.950),
    "bf16-vae": (0.704, 0.826),
    "reserve-vram": (0.0, 0.0),  # same dtypes as fp32: bit-identical output
}
MAX_MEAN_DIFF = {
    "fp32": 0.0,
    "fp16-unet": 0.2,
    "bf16-unet": 2.0,
    "fp8_e4m3fn-unet": 24.0,
    "bf16-vae": 2.5,
    "reserve-vram": 0.0,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, comfy_runner, tiny_sd2_ckpt, object_info):
    """option -> graph -> (image array or the error text, seconds). Servers run one after another."""
    import folder_paths
    from harness.paths import cache_dir
    from harness.server import ComfyServer, ServerError, fixture_model_paths

    env = megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    inputs = Path(folder_paths.get_input_directory())
    prompts = {name: prompt(env, name, **overrides) for name, (overrides, _) in GRAPHS.items()}
    out: dict[str, dict] = {}
    for option, args in OPTIONS.items():
        work = tmp_path_factory.mktemp(f"precision_{option}")
        out[option] = {}
        srv = ComfyServer(work, model_paths=fixture_model_paths(cache_dir()), extra_args=args)
        try:
            srv.start()
        except ServerError as e:
            out[option] = {name: (f"server did not start: {e}"[-3000:], 0.0) for name in GRAPHS}
            continue
        try:
            for name in ("t_lr.png", "t_big.png"):
                srv.add_input(inputs / name)
            for name, p in prompts.items():
                save = next(k for k, n in p.items() if n["class_type"] == "SaveImage")
                start = time.monotonic()
                try:
                    entry = srv.run(p, timeout=600)
                    [image] = entry["outputs"][save]["images"]
                    arr = np.asarray(Image.open(io.BytesIO(srv.view(image))).convert("RGB"))
                except ServerError as e:
                    arr = str(e)[-3000:]
                out[option][name] = (arr, time.monotonic() - start)
        finally:
            srv.stop()
    return out


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_graph_runs_in_every_precision_mode_close_to_fp32(results, option, graph):
    """Success, exact size, a real image (not constant: NaNs save as black), and within the measured bound of
    the fp32 result on the same seed."""
    arr, seconds = results[option][graph]
    assert not isinstance(arr, str), f"{graph} under {OPTIONS[option]} failed: {arr}"
    assert arr.shape[:2] == GRAPHS[graph][1]
    assert arr.std() > 1.0
    ref, _ = results["fp32"][graph]
    assert not isinstance(ref, str)
    diff = float(np.abs(arr.astype(np.float64) - ref.astype(np.float64)).mean())
    print(f"precision-server {option} {graph}: mean |diff| {diff:.3f} levels, {seconds:.1f} s")
    assert diff <= MAX_MEAN_DIFF[option], f"mean difference to fp32 {diff:.2f} > {MAX_MEAN_DIFF[option]}"
