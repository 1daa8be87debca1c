"""The training command line (training/cli.py, training/config.py): stages, configs, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.config import RunConfig, config_to_dict, load_config
from training.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("hr")
    Image.fromarray(skdata.astronaut()[:200, :200]).save(root / "astronaut.png")
    (root / "sub").mkdir()
    Image.fromarray(skdata.chelsea()[:150, :180]).save(root / "sub" / "cat.jpg")
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_bundled_configs_hold_the_documented_defaults() -> None:
    megasr = load_config(CONFIGS / "megasr.yaml")
    assert config_to_dict(megasr) == config_to_dict(RunConfig())  # the file documents every default
    assert megasr.train.lr == 2.5e-5 and megasr.train.batch_size == 16 and megasr.train.max_steps == 200_000
    assert megasr.data.crop_size == 512 and megasr.train.text_dropout == 0.5 and megasr.train.mixed_precision == "fp16"
    assert megasr.degradation.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    tiny = load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-4", "degradation.noise_range=[2, 5]"])
    assert tiny.data.crop_size == 64 and tiny.train.lr == 1e-4 and tiny.degradation.noise_range == (2.0, 5.0)
    assert tiny.degradation.blur_sigma == (0.2, 3.0)  # inherited from megasr.yaml


def test_config_errors_name_the_option(tmp_path: Path) -> None:
    cases = {
        "train.lrr=1": "--set train.lrr",
        "train.lr=fast": "--set train.lr",
        "data.crop_size=63": "--set data.crop_size",  # not a multiple of the scale
        "degradation.kernel_probs=[1, 0]": "--set degradation.kernel_probs",
        "train.mixed_precision=fp8": "--set train.mixed_precision",
        "nonsense": "--set",
    }
    for override, option in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(CONFIGS / "tiny.yaml", [override])
        assert info.value.option == option, (override, str(info.value))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="train.nope: unknown option"):
        load_config(bad)


def test_degrade_preview_writes_pairs_reproducibly(hr_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "preview"
    code, stdout, _ = _run(capsys, "degrade-preview", "--config", "tiny", "--input", str(hr_dir), "--output", str(out))
    assert code == 0 and "wrote 3 examples" in stdout
    for i in range(3):
        assert Image.open(out / f"{i:04d}_hr.png").size == (64, 64)
        assert Image.open(out / f"{i:04d}_hr_usm.png").size == (64, 64)
        assert Image.open(out / f"{i:04d}_lr.png").size == (16, 16)
        assert Image.open(out / f"{i:04d}_lr_up.png").size == (64, 64)
    meta = json.loads((out / "preview.json").read_text())
    assert len(meta["examples"]) == 3 and meta["config"]["data"]["crop_size"] == 64
    first = np.asarray(Image.open(out / "0000_lr.png"))
    # same seed -> same pictures (after --overwrite); another seed -> other pictures
    code, _, _ = _run(capsys, "degrade-preview", "--config", "tiny", "--input", str(hr_dir), "--output", str(out),
                      "--overwrite")  # fmt: skip
    assert code == 0 and np.array_equal(first, np.asarray(Image.open(out / "0000_lr.png")))
    code, _, _ = _run(capsys, "degrade-preview", "--config", "tiny", "--input", str(hr_dir), "--output", str(out),
                      "--overwrite", "--seed", "1")  # fmt: skip
    assert code == 0 and not np.array_equal(first, np.asarray(Image.open(out / "0000_lr.png")))


def test_bad_input_exits_2_naming_the_option(hr_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    base = ["degrade-preview", "--config", "tiny"]
    out = ["--output", str(tmp_path / "o")]
    cases = [
        ([*base, "--input", str(tmp_path / "missing"), *out], "--input", "does not exist"),
        ([*base, "--input", str(tmp_path / "empty"), *out], "--input", "no readable images"),
        ([*base, *out], "data.hr_dirs", "no HR image folder"),
        ([*base, "--input", str(hr_dir), "--output", str(tmp_path / "full")], "--output", "--overwrite"),
        ([*base, "--input", str(hr_dir), *out, "--set", "train.lrr=1"], "--set train.lrr", "unknown option"),
        ([*base, "--input", str(hr_dir), *out, "--set", "preview.count=many"], "--set preview.count", "integer"),
        ([*base, "--input", str(hr_dir), *out, "--count", "0"], "--count", ">= 1"),
        (["degrade-preview", "--config", str(tmp_path / "nope.yaml"), *out], "--config", "does not exist"),
        ([*base, "--input", str(hr_dir), *out, "--device", "gpu9"], "--device", ""),
    ]
    for argv, option, words in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert f"error: {option}:" in err and words in err, err
        assert "Traceback" not in err
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"  # nothing overwritten
    code, _, err = _run(capsys, "no-such-stage")
    assert code == 2 and "invalid choice" in err


def test_python_dash_m_entry_point(hr_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "training", "degrade-preview", "--config", "tiny", "--input", str(hr_dir)]
    ok = subprocess.run([*cmd, "--output", str(tmp_path / "p"), "--count", "1"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith("degrade-preview: wrote 1 examples")
    bad = subprocess.run([*cmd, "--output", str(tmp_path / "p")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "error: --output:" in bad.stderr and "Traceback" not in bad.stderr


def test_a_cpu_run_of_a_full_size_config_says_what_a_step_costs_and_points_to_tiny() -> None:
    """On a CPU the bundled configs (512 px crops) get a line with the estimated seconds per step, scaled from
    the measured dage-hed step, and the way to a quick run (``--config tiny``); the tiny config and a GPU get
    none. ``all`` is judged by its largest stage. Catches a note that never fires, or fires for tiny."""
    from training.cli import CPU_REFERENCE, _resolve_config_path, cpu_step_note

    hed = load_config(_resolve_config_path("dage_hed"))
    note = cpu_step_note(hed, "dage-hed", "cpu")
    assert note is not None and "--config tiny" in note and "estimate" in note
    per_step = CPU_REFERENCE["seconds"] * hed.data.crop_size**2 * hed.train.batch_size / CPU_REFERENCE["pixels"]
    assert f"about {per_step:.0f} s per step" in note
    assert cpu_step_note(load_config(_resolve_config_path("tiny")), "megasr", "cpu") is None
    assert cpu_step_note(hed, "dage-hed", "cuda") is None
    both = {
        "dage-hed": load_config(_resolve_config_path("tiny")),
        "megasr": load_config(_resolve_config_path("megasr")),
    }
    note = cpu_step_note(both, "all", "cpu")
    assert note is not None and note.startswith("megasr runs on the CPU with 512 px") and "several times" in note
