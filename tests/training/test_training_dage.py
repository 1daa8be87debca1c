"""DAGE fine-tuning stages end to end (training/dage.py via the CLI), on tiny real extractors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dage_fixtures import (
    TINY_CLIP_CONFIG,
    TINY_DEPTH_CONFIG,
    TINY_HED_CONFIG,
    TINY_SEG_CONFIG,
    write_dage_weight_files,
)
from PIL import Image
from safetensors.torch import load_file

from training.cli import main
from training.config import load_config
from training.dage import DAGE_KINDS, build_extractor, train_dage

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("dage")
    hr = root / "hr"
    hr.mkdir()
    Image.fromarray(skdata.astronaut()[100:300, 150:350]).save(hr / "astronaut.png")
    Image.fromarray(skdata.chelsea()[:160, 100:260]).save(hr / "cat.jpg")
    bases = write_dage_weight_files(str(root / "bases"), components=("dage_depth_lora", "dage_clip_lora"))
    cfg = {
        "base": str(TINY),
        "data": {"hr_dirs": [str(hr)]},
        "train": {"lr": 1e-3, "max_steps": 2, "checkpoint_every": 2},
        "dage_hed": {"extractor": TINY_HED_CONFIG},
        "dage_depth": {"base": bases["depth_base"], "extractor": TINY_DEPTH_CONFIG},
        "dage_seg": {"extractor": TINY_SEG_CONFIG},
        "dage_clip": {"base": bases["clip_vision"], "extractor": TINY_CLIP_CONFIG},
    }
    path = root / "dage_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"config": path, "depth_base": Path(bases["depth_base"]), "clip_base": Path(bases["clip_vision"])}


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 64, 64, generator=g)


@pytest.mark.parametrize("stage", ["dage-hed", "dage-depth", "dage-seg", "dage-clip"])
def test_stage_trains_and_exports_a_node_loadable_file(
    stage: str, setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from megasr.dage import load_extractor
    from megasr.weights import read_weight_header

    kind = stage.removeprefix("dage-")
    _, component, lora = DAGE_KINDS[kind]
    run = tmp_path / "run"
    assert main([stage, "--config", str(setup["config"]), "--output", str(run), "--log-level", "WARNING"]) == 0
    assert f"{stage}: trained steps 0..2" in capsys.readouterr().out
    export = run / "export" / f"{component}.safetensors"
    info = read_weight_header(str(export))
    assert info.component == component
    base = {"depth": setup["depth_base"], "clip": setup["clip_base"]}.get(kind)
    model = load_extractor(str(export), base_path=str(base) if base else None)
    out = model(_image())
    assert torch.isfinite(out.raw.float()).all()
    # the file holds the trained student, not the starting extractor
    cfg = load_config(setup["config"])
    start = build_extractor(kind, getattr(cfg, DAGE_KINDS[kind][0]), cfg.seed)
    trained = load_file(str(export))
    start_state = start.lora_state() if lora else start.net.state_dict() if kind == "hed" else None
    if start_state is not None:
        assert set(trained) == set(start_state)
        assert any(not torch.equal(trained[k], start_state[k]) for k in trained)
    # the export stage writes the same tensors from the run's checkpoint, and refuses to overwrite
    again = tmp_path / "again.safetensors"
    argv = ["export", "--from", stage, "--config", str(setup["config"]), "--run", str(run), "--output", str(again)]
    assert main(argv) == 0
    rewritten = load_file(str(again))
    assert set(rewritten) == set(trained) and all(torch.equal(rewritten[k], trained[k]) for k in trained)
    capsys.readouterr()
    assert main(argv) == 2 and "error: --out:" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["hed", "depth", "seg", "clip"])
def test_loss_decreases_on_a_fixed_batch(kind: str, setup: dict[str, Path], tmp_path: Path) -> None:
    over = [
        "train.max_steps=20",
        "train.overfit_batches=1",
        "train.lr=5e-3",
        "train.log_every=100",
        "train.checkpoint_every=100",
    ]
    cfg = load_config(setup["config"], over)
    result, _ = train_dage(kind, cfg, tmp_path / kind)
    losses = result.losses
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) and losses[-1] < 0.99 * losses[0], losses


@pytest.mark.parametrize("stage", ["dage-hed", "dage-depth", "dage-seg"])  # seg: Swin drop-path uses torch's RNG
def test_resume_after_interruption_equals_an_uninterrupted_run(
    stage: str, setup: dict[str, Path], tmp_path: Path
) -> None:
    base = [stage, "--config", str(setup["config"]), "--log-level", "WARNING", "--set", "train.checkpoint_every=1"]
    assert main([*base, "--output", str(tmp_path / "full"), "--max-steps", "4"]) == 0
    assert main([*base, "--output", str(tmp_path / "part"), "--max-steps", "2"]) == 0
    assert main([*base, "--output", str(tmp_path / "part"), "--max-steps", "4"]) == 2  # exists: needs --resume
    assert main([*base, "--output", str(tmp_path / "part"), "--max-steps", "4", "--resume"]) == 0
    component = DAGE_KINDS[stage.removeprefix("dage-")][1]
    full = load_file(str(tmp_path / "full" / "export" / f"{component}.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "export" / f"{component}.safetensors"))
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)


def test_bad_dage_inputs_exit_2(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(setup["config"])
    cases = [
        (
            ["dage-depth", "--config", cfg, "--output", str(tmp_path / "a"), "--set", "dage_depth.base=/no/such"],
            "dage_depth.base",
        ),  # fmt: skip
        (["dage-seg", "--config", cfg, "--output", str(tmp_path / "b"), "--input", str(tmp_path / "none")], "--input"),
        (
            [
                "export",
                "--from",
                "dage-hed",
                "--config",
                cfg,
                "--run",
                str(tmp_path / "none"),
                "--output",
                str(tmp_path / "x.safetensors"),
            ],
            "--run",
        ),  # fmt: skip
        (["dage-hed", "--config", cfg, "--output", str(tmp_path / "c"), "--max-steps", "-1"], "--max-steps"),
    ]
    for argv, option in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {option}:" in err and "Traceback" not in err, err
    # a run of another stage is not exported as this one
    run = tmp_path / "hedrun"
    assert main(["dage-hed", "--config", cfg, "--output", str(run), "--max-steps", "1", "--log-level", "WARNING"]) == 0
    capsys.readouterr()
    argv = ["export", "--from", "dage-seg", "--config", cfg, "--run", str(run), "--output", str(tmp_path / "s.st")]
    assert main(argv) == 2 and "not dage-seg" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dage-hed", "dage-seg"])  # seg: a parameter without gradient breaks DDP
def test_two_process_dage_run_over_gloo_exports_the_same_format(
    stage: str, setup: dict[str, Path], tmp_path: Path
) -> None:
    from megasr.dage import load_extractor

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training"]
    proc = subprocess.run(
        [*cmd, stage, "--config", str(setup["config"]), "--output", str(run), "--log-level", "WARNING"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"{stage}: trained steps 0..2") == 1  # one summary, from the main process
    state = (run / "checkpoints" / "step-00000002" / "state.json").read_text()
    assert '"world_size": 2' in state
    component = DAGE_KINDS[stage.removeprefix("dage-")][1]
    model = load_extractor(str(run / "export" / f"{component}.safetensors"))
    assert torch.isfinite(model(_image()).raw).all()


def test_bundled_dage_configs(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """training/configs/dage_{hed,depth,seg,clip}.yaml hold the documented defaults; dage_tiny.yaml (the same tiny
    extractors as tests/fixtures/dage_fixtures.py) runs every stage from the command line, and the exports say what they are
    through megasr.weights.detect_component."""
    from megasr.weights import detect_component

    configs = REPO / "training" / "configs"
    for kind, (section, _, lora) in DAGE_KINDS.items():
        cfg = load_config(configs / f"dage_{kind}.yaml")
        dcfg = getattr(cfg, section)
        assert dcfg.base is None and dcfg.output_weight == 1.0 and dcfg.teacher_input == "hr"
        assert cfg.output_dir == f"runs/dage_{kind}" and cfg.data.crop_size == 512
        assert cfg.train.lr == (1e-4 if lora else 1e-5) and cfg.train.mixed_precision == "fp16"
        assert (dcfg.extractor.get("lora", {}).get("r") == 8) == lora
    tiny = load_config(configs / "dage_tiny.yaml", [f"data.hr_dirs=[{setup['config'].parent / 'hr'}]"])
    expected = {"hed": TINY_HED_CONFIG, "depth": TINY_DEPTH_CONFIG, "seg": TINY_SEG_CONFIG, "clip": TINY_CLIP_CONFIG}
    for kind, (section, component, _) in DAGE_KINDS.items():
        assert getattr(tiny, section).extractor == expected[kind]
        run = tmp_path / kind
        argv = [f"dage-{kind}", "--config", "dage_tiny", "--input", str(setup["config"].parent / "hr")]
        assert main([*argv, "--output", str(run), "--max-steps", "1", "--log-level", "WARNING"]) == 0, kind
        assert detect_component(str(run / "export" / f"{component}.safetensors")) == component
    capsys.readouterr()
