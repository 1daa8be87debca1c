"""The megasr stage's memory plan (training/memory_plan.py) against the measured peak of a real step.

Measured on the CPU with the dispatcher-exact counter of scripts/tools/tensor_memory.py: every tensor a
steady-state step (the second: the Adam moments exist) creates from the forward to the optimiser step --
activations, gradients, the optimiser's temporaries -- the weights and moments (which exist before) not
counted. Forward + backward against the plan's activations + gradients, the whole step against its peak less
the weights and moments: each within 15% for the tiny configs.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from megasr_training_fixtures import megasr_config, write_guidance_files, write_hr_folder, write_tiny_sd2_base

from training.config import load_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from training.stage_megasr import MegaSRStage

    root = tmp_path_factory.mktemp("memplan")
    cfg_path = megasr_config(
        write_tiny_sd2_base(root / "sd2"), write_guidance_files(root / "g"), write_hr_folder(root / "hr"), root / "run"
    )
    cfg = load_config(cfg_path)
    return MegaSRStage(cfg, torch.device("cpu"))


def _measured_peak(stage: Any, batch: int, crop: int) -> tuple[int, int]:
    """(peak of forward + backward, peak of the whole step) of new tensors, in a steady-state step."""
    sys.path.insert(0, str(REPO / "scripts" / "tools"))
    from tensor_memory import TensorMemory

    g = torch.Generator().manual_seed(0)
    hr = torch.rand(batch, 3, crop, crop, generator=g)
    inputs = stage.make_inputs(hr, [f"x{i}.png" for i in range(batch)], g)
    noise, t = stage.draw_noise(inputs.latents, g)
    params = [p for p in stage.module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    stage.loss(stage.module, inputs, noise, t).backward()  # a first step makes the Adam moments: steady state
    opt.step()
    opt.zero_grad(set_to_none=True)
    with TensorMemory() as tm:
        loss = stage.loss(stage.module, inputs, noise, t)
        loss.backward()
        backward = tm.peak
        opt.step()
        opt.zero_grad(set_to_none=True)
    return backward, tm.peak


@pytest.mark.parametrize(("batch", "crop"), [(2, 32), (1, 64)])
def test_predicted_peak_is_within_15_percent_of_the_measured(stage: Any, batch: int, crop: int) -> None:
    from training.memory_plan import plan_megasr

    plan = plan_megasr(stage, batch, crop)
    backward, step = _measured_peak(stage, batch, crop)
    predicted_backward = plan.activations + plan.gradients
    predicted_step = plan.peak - plan.weights - plan.optimizer  # what a step creates on top of weights and moments
    mb = 2**20
    print(
        f"batch {batch} crop {crop}: backward predicted {predicted_backward / mb:.1f} MB measured {backward / mb:.1f} MB;"
        f" step predicted {predicted_step / mb:.1f} MB measured {step / mb:.1f} MB"
    )
    assert abs(predicted_backward - backward) <= 0.15 * backward, (predicted_backward, backward)
    assert abs(predicted_step - step) <= 0.15 * step, (predicted_step, step)
    bigger = plan_megasr(stage, batch * 2, crop)
    assert bigger.activations > 1.2 * plan.activations  # activations grow with the batch, weights do not
    assert bigger.weights == plan.weights and bigger.optimizer == plan.optimizer


@pytest.mark.parametrize(("batch", "crop"), [(2, 32), (1, 64)])
def test_checkpointed_plan_drops_and_stays_within_15_percent_of_the_measured(stage: Any, batch: int, crop: int) -> None:
    """train.gradient_checkpointing: the plan counts the checkpointed blocks' inputs and one block's recompute;
    the measured forward + backward drops with it and stays within 15% of the plan."""
    from unittest import mock

    from training.memory_plan import plan_megasr

    plain_plan = plan_megasr(stage, batch, crop)
    plain_backward, _ = _measured_peak(stage, batch, crop)
    stage.module.set_gradient_checkpointing(True)
    try:
        with mock.patch.object(stage.cfg.train, "gradient_checkpointing", True):
            plan = plan_megasr(stage, batch, crop)
        backward, step = _measured_peak(stage, batch, crop)
    finally:
        stage.module.set_gradient_checkpointing(False)
    predicted_backward = plan.activations + plan.gradients
    predicted_step = plan.peak - plan.weights - plan.optimizer
    mb = 2**20
    print(
        f"checkpointed batch {batch} crop {crop}: activations {plain_plan.activations / mb:.1f} -> "
        f"{plan.activations / mb:.1f} MB; backward predicted {predicted_backward / mb:.1f} MB measured "
        f"{backward / mb:.1f} MB (plain {plain_backward / mb:.1f}); step predicted {predicted_step / mb:.1f} MB "
        f"measured {step / mb:.1f} MB"
    )
    assert plan.activations < 0.7 * plain_plan.activations
    assert backward < plain_backward
    assert abs(predicted_backward - backward) <= 0.15 * backward, (predicted_backward, backward)
    assert abs(predicted_step - step) <= 0.15 * step, (predicted_step, step)


def test_a_plan_that_does_not_fit_is_refused_with_the_numbers_and_cheaper_settings(stage: Any) -> None:
    from training.errors import UsageError
    from training.memory_plan import check_fits, parse_size, plan_megasr

    assert parse_size("24GB") == 24 * 2**30 and parse_size("512 MiB") == 512 * 2**20
    plan = plan_megasr(stage, 4, 32)
    check_fits(plan, plan.peak, grad_accum=1)  # exactly enough: no refusal
    fixed = plan.weights + plan.optimizer + plan.gradients
    with pytest.raises(UsageError) as err:  # below what the optimiser step alone needs: no batch size helps
        check_fits(plan, fixed + plan.step_temporaries - 1, grad_accum=1)
    text = str(err.value)
    assert text.startswith("--gpu-memory") and "memory plan" in text and "activations" in text
    assert "a larger device" in text and "train.batch_size" not in text
    # where the activations dominate (a full-size run): the batch that fits, accumulated to the same samples
    big = dataclasses.replace(plan, step_temporaries=0)
    per_sample = big.activations / 4
    with pytest.raises(UsageError) as err:
        check_fits(big, int(fixed + 1.5 * per_sample), grad_accum=1)  # room for one sample's activations
    assert "train.batch_size=1 with train.grad_accum=4 (the same 4 samples" in str(err.value)


def test_the_cli_prints_the_plan_and_refuses_a_run_that_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``megasr-train megasr --gpu-memory 100MB`` on the tiny config: exit 2 before the first step, the message
    names --gpu-memory, the plan's lines and the peak; nothing is trained (no checkpoint)."""
    from training.cli import main

    root = tmp_path
    cfg = megasr_config(
        write_tiny_sd2_base(root / "sd2"), write_guidance_files(root / "g"), write_hr_folder(root / "hr"), root / "run"
    )
    code = main(["megasr", "--config", str(cfg), "--output", str(root / "run"), "--gpu-memory", "100MB"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--gpu-memory" in err and "memory plan" in err and "peak" in err and "100.0 MB" in err
    assert not list((root / "run").rglob("step-*"))
