"""Weight files exported by the training package load in the nodes and run in the real ComfyUI workflow."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from dage_fixtures import TINY_DEPTH_CONFIG, TINY_HED_CONFIG, TINY_SEG_CONFIG
from megasr_fixtures import ensure_dage_files, megasr_env, run_image
from PIL import Image

from training.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):  # noqa: ANN001, ANN201
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def test_trained_dage_exports_run_in_the_megasr_x4_workflow(env, tmp_path: Path) -> None:  # noqa: ANN001
    from megasr_fixtures import models_dir

    skdata = pytest.importorskip("skimage.data")
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(skdata.astronaut()[120:300, 160:340]).save(hr / "astronaut.png")
    dage_files = ensure_dage_files()
    cfg = {
        "base": str(REPO / "training" / "configs" / "tiny.yaml"),
        "data": {"hr_dirs": [str(hr)]},
        "train": {"lr": 1e-3, "max_steps": 2, "checkpoint_every": 2},
        "dage_hed": {"extractor": TINY_HED_CONFIG},
        # the depth LoRA is trained on the base file the workflow's loader pairs it with
        "dage_depth": {
            "base": str(models_dir("megasr") / dage_files["depth_base"]),
            "extractor": TINY_DEPTH_CONFIG,
        },  # fmt: skip
        "dage_seg": {"extractor": TINY_SEG_CONFIG},
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    models = tmp_path / "models"
    models.mkdir()
    names = {}
    for stage, component in (("dage-hed", "dage_hed"), ("dage-depth", "dage_depth_lora"), ("dage-seg", "dage_seg")):
        run = tmp_path / stage
        assert main([stage, "--config", str(config), "--output", str(run), "--log-level", "WARNING"]) == 0
        names[component] = f"trained_{tmp_path.name}_{component}.safetensors"
        shutil.copyfile(run / "export" / f"{component}.safetensors", models / names[component])
    env[0].register_model_dir("megasr", models, first=False)

    kw = {"MegaSRSampler.seed": 5}
    trained = run_image(
        env,
        "megasr_x4",
        **kw,
        **{
            "DAGE HED weights.dage_name": names["dage_hed"],
            "DAGE depth weights.dage_name": names["dage_depth_lora"],
            "DAGE seg weights.dage_name": names["dage_seg"],
            "SaveImage.filename_prefix": "trained_dage",
        },
    )
    assert trained.shape[:2] == (44, 52) and trained.std() > 0
    fixture = run_image(env, "megasr_x4", **kw, **{"SaveImage.filename_prefix": "fixture_dage"})
    assert np.abs(trained.astype(float) - fixture).max() > 0  # the trained maps reached the sampler
