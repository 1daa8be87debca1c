"""Every user-facing failure of the training CLI is one clear message, exit 2, traceback only in the log.

Each test reproduces a case from the held-out bad-input matrix (issues 13, 14, 18).
"""

from __future__ import annotations

import errno
import hashlib
import pickle
from pathlib import Path

import pytest
import yaml
from megasr_training_fixtures import write_hr_folder

from training.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY_HED = {"widths": [4, 8, 8, 16, 16], "resolution": 64}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hr_folder(tmp_path_factory.mktemp("hr") / "photos", count=2)


def _tiny_cfg(tmp: Path, **extra: object) -> Path:
    cfg = {
        "base": str(REPO / "training" / "configs" / "tiny.yaml"),
        "data": {"crop_size": 32},
        "train": {"max_steps": 1, "checkpoint_every": 1, "lr": 1e-3},
        "dage_hed": {"extractor": TINY_HED},
        **extra,
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_three_config_mistakes_are_reported_together_before_anything_loads(
    hr: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A misspelt key, a value of the wrong type and a base that does not exist: one message, all three named
    (key, value, what was expected, an example), exit 2, and no run folder made. Catches a first-error-only
    report (three re-runs to find three mistakes) and a check that happens after a model has loaded."""
    cfg = tmp_path / "three.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "training" / "configs" / "tiny.yaml"),
                "train": {"lrr": 1e-4, "batch_size": "two"},
                "megasr": {"base": str(tmp_path / "no_such_sd2.safetensors")},
            }
        )
    )
    out = tmp_path / "run"
    code, _, err = _run(capsys, "megasr", "--config", str(cfg), "--input", str(hr), "--out", str(out))
    assert code == 2, err
    assert "3 problems" in err
    assert "train.lrr: unknown option (value 0.0001)" in err and "e.g. train.lr" in err
    assert "train.batch_size: must be an integer, got 'two'" in err
    assert "megasr.base: '" in err and "no_such_sd2.safetensors' does not exist" in err and "e.g. " in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing was started


def test_unknown_key_inside_an_extractor_config_is_refused(
    hr: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``dage_hed.extractor.widthz`` (and an unknown LoRA key) used to be accepted silently and ignored."""
    cfg = _tiny_cfg(tmp_path, dage_depth={"extractor": {"lora": {"rank": 4}}})
    argv = ["dage-hed", "--config", str(cfg), "--input", str(hr), "--out", str(tmp_path / "run")]
    code, _, err = _run(capsys, *argv, "--set", "dage_hed.extractor.widthz=[1,2]")
    assert code == 2, err
    assert "--set dage_hed.extractor.widthz: unknown option" in err and "e.g. dage_hed.extractor.widths" in err
    assert "dage_depth.extractor.lora.rank: unknown option" in err and "alpha, dropout, r, target" in err
    assert not (tmp_path / "run").exists()


def test_malicious_pickle_base_is_refused_in_one_line(hr: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A pickle that would run code, given as the HED base: one line naming the option, exit 2, the code never
    runs (the marker file stays absent). Catches a raw UnpicklingError traceback and an unsafe torch.load."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    evil = tmp_path / "ControlNetHED.pth"
    evil.write_bytes(pickle.dumps({"net": Evil()}))
    cfg = _tiny_cfg(tmp_path)
    argv = ["dage-hed", "--config", str(cfg), "--input", str(hr), "--out", str(tmp_path / "run")]
    code, _, err = _run(capsys, *argv, "--hed-base", str(evil), "--log-level", "WARNING")
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "dage_hed.base" in lines[0] and "pickle" in lines[0], err
    assert "Traceback" not in err and not marker.exists()
    code, _, err = _run(capsys, *argv, "--hed-base", str(tmp_path / "cfg.yaml"), "--log-level", "WARNING", "--force")
    assert code == 2 and "dage_hed.base" in err and len(err.strip().splitlines()) == 1, err


def test_export_disk_full_keeps_the_old_file_and_says_what_to_do(
    hr: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full during ``export`` (an injected ENOSPC from the weight writer): the previous export is intact,
    the user gets one line (cause, path, fix), exit 2, and the traceback is in the run's ``train.log``.
    Also: export reads everything from the run (no --config), and ``--force`` is the alias of ``--overwrite``."""
    run = tmp_path / "run"
    cfg = _tiny_cfg(tmp_path)
    code, _, err = _run(capsys, "dage-hed", "--config", str(cfg), "--input", str(hr), "--out", str(run))
    assert code == 0, err
    out = tmp_path / "models" / "dage_hed.safetensors"
    code, stdout, err = _run(capsys, "export", "--run", str(run), "--out", str(out))
    assert code == 0 and out.is_file(), err
    before = _sha(out)
    code, _, err = _run(capsys, "export", "--run", str(run), "--out", str(out))
    assert code == 2 and "--force" in err and "Traceback" not in err

    import safetensors.torch

    def full(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = _run(capsys, "export", "--run", str(run), "--out", str(out), "--force", "--log-level", "ERROR")
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no space left on the device" in lines[0] and "free space" in lines[0], err
    assert str(out.parent) in lines[0] and "Traceback" not in err
    assert _sha(out) == before  # the old file is untouched
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp file left behind
    log = (run / "train.log").read_text()
    assert "Traceback" in log and "No space left on device" in log
    monkeypatch.undo()
    code, _, err = _run(capsys, "export", "--run", str(run), "--out", str(out), "--overwrite")
    assert code == 0, err


def test_a_run_that_failed_before_its_first_checkpoint_can_be_rerun(
    hr: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run folder is "in use" only once a step is checkpointed: a first attempt that stopped before (here:
    its run_config.json and log exist, no checkpoint) does not block the re-run; a checkpointed one does."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    (run / "train.log").write_text("an earlier failed attempt\n")
    cfg = _tiny_cfg(tmp_path)
    argv = ["dage-hed", "--config", str(cfg), "--input", str(hr), "--out", str(run)]
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "--resume" in err and "--force" in err
