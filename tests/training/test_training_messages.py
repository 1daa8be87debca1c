"""Training messages that used to point the wrong way (issue 29)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from training.config import ConfigError, apply_overrides


def test_bad_train_section_in_the_file_is_blamed_on_the_file_not_on_set() -> None:
    """``train: 5`` in the config file plus ``--max-steps`` (train.max_steps=...) used to say
    "--set train.max_steps: 'train' is not a section"."""
    with pytest.raises(ConfigError) as e:
        apply_overrides({"train": 5}, ["train.max_steps=10"], "my.yaml")
    msg = str(e.value)
    assert "in my.yaml, 'train' is 5, not a section" in msg and "fix the file" in msg, msg
    with pytest.raises(ConfigError) as e:  # an earlier --set that wrote the value is named instead
        apply_overrides({}, ["train=5", "train.max_steps=10"], "my.yaml")
    assert "--set train=5" in str(e.value) and "my.yaml" not in str(e.value)


def test_export_onto_a_folder_does_not_suggest_force(tmp_path, monkeypatch) -> None:
    """An existing folder as --out: "is a folder", never "pass --force" (which then refused). The run's checkpoint
    lookup is stubbed: only the --out checks, which come next, are under test."""
    from training import export

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(export, "latest_checkpoint", lambda d: d / "checkpoint_1")
    out = tmp_path / "existing"
    out.mkdir()
    for overwrite in (False, True):
        with pytest.raises(export.UsageError) as e:
            export.export_run(run, out, overwrite=overwrite)
        assert "is a folder" in str(e.value) and "--force" not in str(e.value), str(e.value)


def test_small_training_image_padding_is_logged_once_per_size(caplog) -> None:
    from training import data

    data._PADDED_SIZES.clear()
    arr = np.random.default_rng(0).random((10, 10, 3), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger=data.logger.name):
        out1 = data._fit_small(arr, 64, "reflect")
        data._fit_small(arr, 64, "reflect")
    assert out1.shape == (64, 64, 3)
    msgs = [r.getMessage() for r in caplog.records if "smaller than the 64 px crop" in r.getMessage()]
    assert msgs == ["a 10x10 px training image is smaller than the 64 px crop: padded by reflection to 64 px "
                    "(data.small_images: upscale resizes instead; tiny images teach the model little)"]  # fmt: skip
