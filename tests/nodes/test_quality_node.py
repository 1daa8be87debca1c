"""MegaSR Image Quality (nodes/quality.py) in the real ComfyUI 0.3.75, through the in-process executor.

Catches: a node that is not registered or not an output node (it would never run on its own), scores computed
on another channel or without the 8-bit rounding the eval command's files have, outputs in the wrong order
(the PSNR number must reach a downstream node as PSNR), a missing reference or missing LPIPS file that crashes
the run instead of giving one line, a size mismatch that is silently resized.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import comfy as hcomfy
from PIL import Image


def _y(u8: np.ndarray) -> np.ndarray:
    rgb = u8.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def _np_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / (np.mean((_y(a) - _y(b)) ** 2) + 1e-8))


@pytest.fixture()
def images(comfy_runner: hcomfy.ComfyRunner) -> tuple[np.ndarray, np.ndarray]:
    import folder_paths

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:40, 0:48]
    ref = np.stack([xx * 5, yy * 6, (xx + yy) * 2], -1) % 256
    ref = np.clip(ref + rng.normal(0, 10, ref.shape), 0, 255).astype(np.uint8)
    out = np.clip(ref + rng.normal(0, 15, ref.shape), 0, 255).astype(np.uint8)
    inp = Path(folder_paths.get_input_directory())
    Image.fromarray(ref).save(inp / "t_quality_ref.png")
    Image.fromarray(out).save(inp / "t_quality_out.png")
    Image.fromarray(ref[:, :30]).save(inp / "t_quality_small.png")
    return out, ref


def _prompt(reference: str | None = "t_quality_ref.png", **kw) -> dict:
    q = {"psnr": True, "ssim": True, "lpips": True, "crop_border": 0, "size_rule": "error", "image": ["1", 0]}
    q["dists"] = False
    q["niqe"] = False
    q["clipiqa"] = False
    q.update(kw)
    p = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "t_quality_out.png"}},
        "3": {"class_type": "MegaSRImageQuality", "inputs": q},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},  # the PSNR number, downstream
    }
    if reference:
        p["2"] = {"class_type": "LoadImage", "inputs": {"image": reference}}
        q["reference"] = ["2", 0]
    return p


def _text(result: hcomfy.RunResult, node: str) -> str:
    t = result.outputs[node]["text"]
    return t[0] if isinstance(t, list | tuple) else t


def test_scores_match_the_formula_and_missing_lpips_file_is_one_line(
    comfy_runner: hcomfy.ComfyRunner, images: tuple[np.ndarray, np.ndarray]
) -> None:
    out, ref = images
    r = comfy_runner.run(_prompt(dists=True))
    text = _text(r, "3")
    assert [line for line in text.splitlines() if line.startswith("DISTS")] == [
        next(line for line in text.splitlines() if "dists_vgg16.safetensors" in line)
    ]
    expected = _np_psnr(out, ref)
    assert float(_text(r, "4")) == pytest.approx(expected, abs=1e-4)  # output 0 is PSNR
    assert f"PSNR (Y): {expected:.4f} dB" in text
    assert "SSIM (Y): 0." in text
    lpips_lines = [line for line in text.splitlines() if line.startswith("LPIPS")]
    assert len(lpips_lines) == 1 and "lpips_alex.safetensors" in lpips_lines[0] and "skipped" in lpips_lines[0]


def test_without_reference_full_reference_metrics_are_skipped(comfy_runner: hcomfy.ComfyRunner, images) -> None:
    r = comfy_runner.run(_prompt(reference=None, lpips=False))
    text = _text(r, "3")
    assert "PSNR (Y): skipped (needs a reference image)" in text
    assert "SSIM (Y): skipped (needs a reference image)" in text
    assert _text(r, "4").lower() == "nan"


def test_lpips_runs_from_a_weight_file_in_the_metrics_folder(
    comfy_runner: hcomfy.ComfyRunner, images, tmp_path: Path
) -> None:
    import folder_paths
    from safetensors.torch import save_file

    from megasr.metrics.lpips import LPIPS

    torch.manual_seed(0)
    model = LPIPS("alex")
    for i in range(5):  # positive lin weights, as trained ones are
        getattr(model, f"lin{i}").model[1].weight.data.uniform_(0.0, 1.0)
    (tmp_path / "metrics").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "metrics/lpips_alex.safetensors")
    )
    folder_paths.add_model_folder_path("megasr", str(tmp_path), is_default=True)
    try:
        r = comfy_runner.run(_prompt(psnr=False, ssim=False))
    finally:
        folder_paths.folder_names_and_paths["megasr"][0].remove(str(tmp_path))
    out, ref = images
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0  # noqa: E731
    expected = float(model(to_t(out), to_t(ref)))
    text = _text(r, "3")
    assert expected > 0
    assert f"LPIPS (Alex): {expected:.4f}" in text
    assert "PSNR" not in text


def test_size_mismatch_is_an_error_naming_the_node(comfy_runner: hcomfy.ComfyRunner, images) -> None:
    with pytest.raises(hcomfy.ExecutionFailed, match="MegaSR Image Quality.*reference.*sizes differ"):
        comfy_runner.run(_prompt(reference="t_quality_small.png", lpips=False))


def test_niqe_output_without_a_reference(comfy_runner: hcomfy.ComfyRunner, tmp_path: Path) -> None:
    """NIQE (no reference) from a pristine file in the metrics folder reaches output 5 (the NIQE number)."""
    import folder_paths
    from safetensors.torch import save_file

    from megasr.metrics import compute_metrics

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:200, 0:300] / 30.0
    img = np.clip(
        np.stack([np.sin(xx), np.cos(yy), np.sin(xx + yy)], -1) * 90 + 128 + rng.normal(0, 9, (200, 300, 3)), 0, 255
    )
    img = img.astype(np.uint8)
    Image.fromarray(img).save(Path(folder_paths.get_input_directory()) / "t_quality_niqe.png")
    (tmp_path / "metrics").mkdir()
    a = torch.from_numpy(rng.normal(0, 0.3, (36, 36)))
    pris = {"mu_pris_param": torch.linspace(0.5, 2, 36, dtype=torch.float64), "cov_pris_param": a @ a.T + torch.eye(36)}
    save_file(pris, str(tmp_path / "metrics/niqe_pris_params.safetensors"))
    p = _prompt(reference=None, psnr=False, ssim=False, lpips=False, niqe=True)
    p["1"]["inputs"]["image"] = "t_quality_niqe.png"
    p["4"]["inputs"]["source"] = ["3", 5]
    folder_paths.add_model_folder_path("megasr", str(tmp_path), is_default=True)
    try:
        r = comfy_runner.run(p)
    finally:
        folder_paths.folder_names_and_paths["megasr"][0].remove(str(tmp_path))
    t = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255
    expected = compute_metrics(["niqe"], t, folders=[tmp_path / "metrics"]).values["niqe"][0]
    assert float(_text(r, "4")) == pytest.approx(expected, rel=1e-6)
    assert f"NIQE: {expected:.4f} (lower is better)" in _text(r, "3")
