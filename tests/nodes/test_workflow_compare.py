"""The shipped comparison workflow (workflows/megasr_compare.json): bicubic x4 beside MegaSR x4, each scored by
MegaSR Image Quality, converted from UI format as the frontend does and run in the real ComfyUI 0.3.75 with the
tiny checkpoints.

Catches: the two branches swapped (in the side-by-side preview or at the quality nodes), a baseline that is not
bicubic x4 of the LR, an HR node that is not wired to both quality nodes (or is not shipped muted, so a user
without an HR gets a missing-file error instead of "skipped"), a missing LPIPS file that crashes the run.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import workflow as hwf
from harness.images import load_image_array
from harness.paths import REPO_ROOT
from megasr_fixtures import megasr_env, prompt

WF = REPO_ROOT / "workflows" / "megasr_compare.json"
HR_TITLE = "HR reference (optional: un-mute with Ctrl+M and load your HR)"


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _y(u8: np.ndarray) -> np.ndarray:
    return 16.0 + (u8.astype(np.float64) / 255.0) @ np.array([65.481, 128.553, 24.966])


def _np_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / (np.mean((_y(a) - _y(b)) ** 2) + 1e-8))


def _u8(path) -> np.ndarray:
    return np.round(load_image_array(path) * 255.0).astype(np.uint8)


def _node(p: dict, title: str) -> str:
    (nid,) = hwf.find_nodes(p, title)
    return nid


def _text(result, nid: str) -> str:
    t = result.outputs[nid]["text"]
    return t[0] if isinstance(t, list | tuple) else t


def _bicubic_u8(name: str, rounded: bool = False) -> np.ndarray:
    """Bicubic x4 of an input PNG, written out here (torch's bicubic, as ComfyUI's ImageScaleBy), as 8 bit."""
    import folder_paths

    lr = load_image_array(f"{folder_paths.get_input_directory()}/{name}")
    x = torch.from_numpy(lr).permute(2, 0, 1)[None]
    up = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    up = np.clip(up * 255.0, 0, 255)
    return (np.round(up) if rounded else up).astype(np.uint8)  # truncated as PreviewImage writes it; rounded as scored


def test_shipped_graph_wires_the_muted_hr_to_both_quality_nodes():
    wf = json.loads(WF.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    (hr,) = [n for n in wf["nodes"] if n.get("title") == HR_TITLE]
    assert hr["type"] == "LoadImage" and hr["mode"] == 2
    targets = {(link[3], nodes[link[3]]["inputs"][link[4]]["name"]) for link in wf["links"] if link[1] == hr["id"]}
    assert {(nodes[t]["title"], name) for t, name in targets} == {
        ("Quality: bicubic", "reference"),
        ("Quality: MegaSR", "reference"),
    }
    scale = next(n for n in wf["nodes"] if n["type"] == "ImageScaleBy")
    assert scale["widgets_values"] == ["bicubic", 4.0]


def test_compare_without_hr_previews_both_and_skips_the_full_reference_metrics(env):
    p = prompt(env, "megasr_compare")
    assert not hwf.find_nodes(p, HR_TITLE), "a muted node must not reach the executor"
    result = env[0].run(p)
    for title in ("Quality: bicubic", "Quality: MegaSR"):
        text = _text(result, _node(p, title))
        assert "PSNR (Y): skipped (needs a reference image)" in text, text
        (niqe,) = [x for x in text.splitlines() if x.startswith("NIQE")]
        assert "niqe_pris_params.safetensors" in niqe and "skipped" in niqe, text  # no file here: one line
        (clip,) = [x for x in text.splitlines() if x.startswith("CLIP-IQA")]
        assert "clipiqa_rn50.safetensors" in clip and "skipped" in clip, text
    (side,) = result.images(_node(p, "Side by side: bicubic (left), MegaSR (right)"))
    (saved,) = result.images(_node(p, "SaveImage"))
    side, megasr = _u8(side), _u8(saved)
    assert megasr.shape == (44, 52, 3)  # t_lr.png is 13 x 11
    assert side.shape == (44, 52 + 8 + 52, 3)
    bicubic = _bicubic_u8("t_lr.png")
    assert np.abs(side[:, :52].astype(int) - bicubic).max() <= 1  # left: the bicubic baseline
    assert np.array_equal(side[:, 60:], megasr)  # right: MegaSR's result
    assert np.abs(megasr.astype(int) - bicubic).mean() > 2  # the two differ, so a swap would be seen


def test_compare_with_hr_scores_each_branch_against_it(env, monkeypatch):
    import folder_paths
    from PIL import Image

    # an HR close to the bicubic result: bicubic must score far higher than the tiny random MegaSR model
    rng = np.random.default_rng(9)
    near = _bicubic_u8("t_lr.png").astype(int) + rng.integers(-3, 4, (44, 52, 3))
    Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)).save(
        f"{folder_paths.get_input_directory()}/t_compare_hr.png"
    )
    real_load = hwf.load_workflow

    def unmuted(path):  # the user un-mutes the HR node (Ctrl+M)
        wf = real_load(path)
        for n in wf["nodes"]:
            if n.get("title") == HR_TITLE:
                n["mode"] = 0
        return wf

    monkeypatch.setattr(hwf, "load_workflow", unmuted)
    p = prompt(env, "megasr_compare", **{f"{HR_TITLE}.image": "t_compare_hr.png"})
    result = env[0].run(p)
    hr = _u8(f"{folder_paths.get_input_directory()}/t_compare_hr.png")
    (saved,) = result.images(_node(p, "SaveImage"))
    megasr = _u8(saved)
    scores = {}
    for title in ("Quality: bicubic", "Quality: MegaSR"):
        text = _text(result, _node(p, title))
        line = next(x for x in text.splitlines() if x.startswith("PSNR (Y): "))
        scores[title] = float(line.split()[2])
        lpips = [x for x in text.splitlines() if x.startswith("LPIPS")]
        assert len(lpips) == 1 and "skipped" in lpips[0] and "lpips_alex.safetensors" in lpips[0], text
    # the files are truncated to 8 bit, the node rounds: a fraction of a dB apart, far less than between branches
    assert scores["Quality: bicubic"] == pytest.approx(_np_psnr(_bicubic_u8("t_lr.png", True), hr), abs=1e-3)
    assert scores["Quality: MegaSR"] == pytest.approx(_np_psnr(megasr, hr), abs=0.15)
    assert scores["Quality: bicubic"] > 35 > scores["Quality: MegaSR"] + 10
