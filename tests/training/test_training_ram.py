"""RAM/DAPE in the megasr training stage (training/ram_guidance.py): the prompt is RAM's tags of the HR crop,
SeeSR's representation branch reads RAM's tokens of the LR, and a config that needs RAM without one is refused
before anything loads.

Real parts: the tiny SD-2 base of the training fixtures, the tiny RAM + DAPE files in the published key layouts
(tests/fixtures/ram/, made with SeeSR's own code), the real stage, degradations and MegaSR model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAM_FX = REPO / "tests" / "fixtures" / "ram"


def _ram_files() -> dict[str, str]:
    return {
        "ram": str(RAM_FX / "ram_tiny.safetensors"),
        "dape": str(RAM_FX / "dape_tiny.safetensors"),
        "ram_tag_list": str(RAM_FX / "tags.txt"),
        "ram_thresholds": str(RAM_FX / "thresholds.txt"),
    }


def _config(tmp_path: Path, representation_dim: int, **megasr: Any):
    from megasr_training_fixtures import write_hr_folder, write_tiny_sd2_base

    from training.config import load_config

    base = write_tiny_sd2_base(tmp_path / "sd2")
    hr = write_hr_folder(tmp_path / "hr", count=2)
    values = {
        "base": str(REPO / "training" / "configs" / "tiny.yaml"),
        "data": {"hr_dirs": [str(hr)], "crop_size": 32},
        "train": {"batch_size": 2, "max_steps": 1, "lr": 1e-5, "text_dropout": 0.0},
        "megasr": {
            "base": str(base),
            "captions": False,
            "model": {"clip_dim": 32, "msgam_hidden": 16, "representation_dim": representation_dim},
            **megasr,
        },
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(values))
    return load_config(path)


def _hr_batch(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def ram():
    from megasr.ram.loader import load_ram, read_tag_list, read_thresholds

    f = _ram_files()
    return load_ram(
        f["ram"], f["dape"], tag_names=read_tag_list(f["ram_tag_list"]), thresholds=read_thresholds(f["ram_thresholds"])
    )


@torch.no_grad()
def test_representation_tokens_are_rams_tokens_of_the_lr_and_the_prompt_is_rams_tags_of_the_hr(tmp_path, ram):
    from training.data import DegradedBatch
    from training.stage_megasr import MegaSRStage

    stage = MegaSRStage(_config(tmp_path, 512, **_ram_files()), torch.device("cpu"))
    assert stage.tagger is None  # RAM replaces the zero-shot teacher
    assert not any(p.requires_grad for p in stage.ram.model.parameters())
    assert not {id(p) for p in stage.ram.model.parameters()} & {id(p) for p in stage.module.parameters()}

    hr = _hr_batch()
    seed = 7
    b = DegradedBatch.build(hr, stage.pipeline, torch.Generator().manual_seed(seed), device=torch.device("cpu"))
    inputs = stage.make_inputs(hr, ["a.png", "b.png"], torch.Generator().manual_seed(seed))

    want = ram.tokens(b.lr)
    assert inputs.representation is not None and inputs.representation.shape == want.shape == (2, 145, 512)
    torch.testing.assert_close(inputs.representation, want, rtol=0, atol=1e-6)
    # not the HR's, nor the bicubic hint's: the nodes run RAM on the LR input
    assert (ram.tokens(b.hr) - inputs.representation).abs().max() > 1e-3
    assert (ram.tokens(b.lr_up) - inputs.representation).abs().max() > 1e-3
    # the two images differ, so a batch-broadcast first row would fail here
    assert (inputs.representation[0] - inputs.representation[1]).abs().max() > 1e-4

    tags = ram(b.hr).tag_text
    assert any(tags), "the tiny RAM tags nothing: the prompt check below would be empty"
    assert stage.last_prompts == [t or stage.mcfg.prompt for t in tags]
    assert stage.last_prompts != ram(b.lr).tag_text or tags == ram(b.lr).tag_text

    seen: list[torch.Tensor | None] = []
    prepare = stage.model.prepare_context

    def recording(*args, **kwargs):
        seen.append(kwargs.get("representation_tokens"))
        return prepare(*args, **kwargs)

    stage.model.prepare_context = recording
    noise, t = stage.draw_noise(inputs.latents, torch.Generator().manual_seed(1))
    loss = stage.loss(stage.module, inputs, noise, t)
    assert torch.isfinite(loss)
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(seen[0].float(), want, rtol=0, atol=1e-6)


def test_a_training_step_with_ram_tokens_exports_the_representation_branch(tmp_path):
    """One real step: the branch gets gradients from RAM's tokens and is in the exported file. Without a SeeSR
    warm start the U-Net side of the branch trains too (SeeSR trains both; after the warm start megasr/seesr_weights.py
    freezes it, tests/core/test_seesr_branch.py)."""
    from megasr.model_io import load_megasr_model
    from training.stage_megasr import train_megasr

    cfg = _config(tmp_path, 512, **_ram_files())
    run = tmp_path / "run"
    run.mkdir()
    result, export, stage = train_megasr(cfg, run)
    assert result.step == 1 and export is not None
    branch = {n: p for n, p in stage.model.named_parameters() if "image_attentions" in n}
    assert branch and all(p.requires_grad for p in branch.values())
    loaded = load_megasr_model(str(export))
    assert loaded.config.representation_dim == 512
    saved = {n: p for n, p in loaded.named_parameters() if "image_attentions" in n}
    assert saved.keys() == branch.keys()
    for n, p in saved.items():
        torch.testing.assert_close(p, branch[n].detach().float(), rtol=0, atol=0)


def test_without_a_representation_branch_ram_still_gives_the_prompt_and_no_tokens(tmp_path, ram):
    from training.stage_megasr import MegaSRStage

    stage = MegaSRStage(_config(tmp_path, 0, **_ram_files()), torch.device("cpu"))
    hr = _hr_batch(5)
    inputs = stage.make_inputs(hr, ["a.png", "b.png"], torch.Generator().manual_seed(2))
    assert inputs.representation is None
    assert any(stage.last_prompts) and all(p != stage.mcfg.prompt or not p for p in stage.last_prompts)


def test_a_representation_branch_without_ram_and_dape_without_ram_are_refused_before_loading(tmp_path):
    from training.errors import ConfigError
    from training.preflight import megasr_input_problems

    cfg = _config(tmp_path, 512)
    problems = megasr_input_problems(cfg)
    assert [p.option for p in problems if isinstance(p, ConfigError)] == ["megasr.ram"]
    assert "representation_dim 512" in str(problems[0]) and "ram_swin_large_14m.pth" in str(problems[0])

    cfg = _config(tmp_path / "b", 0, dape=_ram_files()["dape"], ram_tag_list=str(tmp_path / "nope.txt"))
    assert sorted(p.option for p in megasr_input_problems(cfg)) == ["megasr.dape", "megasr.ram_tag_list"]

    cfg = _config(tmp_path / "c", 512, **_ram_files())
    assert megasr_input_problems(cfg) == []


def test_a_wrong_dape_file_is_named(tmp_path):
    from training.errors import UsageError
    from training.stage_megasr import MegaSRStage

    wrong = dict(_ram_files(), dape=_ram_files()["ram"])  # the RAM file given as the DAPE LoRA
    with pytest.raises(UsageError) as err:
        MegaSRStage(_config(tmp_path, 512, **wrong), torch.device("cpu"))
    assert "megasr.dape" in str(err.value)


def test_the_cli_names_the_ram_flag_when_the_branch_has_no_ram(tmp_path, capsys):
    """``megasr-train megasr`` (and ``all``) take ``--ram`` / ``--dape``; a branch without RAM exits 2 before
    anything loads, naming the flag the user types."""
    from training.cli import build_parser, main

    _config(tmp_path, 512)
    cfg = tmp_path / "cfg.json"
    args = ["megasr", "--config", str(cfg), "--output", str(tmp_path / "run"), "--log-level", "ERROR"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--ram" in err and "representation_dim 512" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    parsed = build_parser().parse_args(["all", "--ram", "r.pth", "--dape", "d.pth"])
    assert (parsed.ram, parsed.dape) == ("r.pth", "d.pth")
