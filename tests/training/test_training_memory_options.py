"""The one-GPU options of issue 27: gradient checkpointing, EMA, the 8-bit optimiser and the 24 GB recipe.

Gradient checkpointing must not change a single gradient (the checkpointed blocks are re-run in backward with
the guidance context they first ran with); the memory plan must count what it saves. The EMA follows its
recurrence, survives a resume bit for bit and is what gets exported. ``adamw8bit`` is refused before anything
trains where bitsandbytes or CUDA is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from megasr_training_fixtures import megasr_config, write_guidance_files, write_hr_folder, write_tiny_sd2_base
from torch import nn

from training.config import load_config
from training.loop import LoopConfig, StepContext, run_training

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("memopts")
    return {
        "root": root,
        "base": write_tiny_sd2_base(root / "sd2"),
        "guidance": write_guidance_files(root / "g"),
        "hr": write_hr_folder(root / "hr"),
    }


@pytest.fixture(scope="module")
def stage(files: dict[str, Any]) -> Any:
    from training.stage_megasr import MegaSRStage

    cfg = load_config(megasr_config(files["base"], files["guidance"], files["hr"], files["root"] / "run"))
    st = MegaSRStage(cfg, torch.device("cpu"))
    # the new parts start at zero (their gradients are mostly zero then): random values make every gradient count
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in st.module.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return st


def _gradients(stage: Any, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    inputs = stage.make_inputs(torch.rand(2, 3, 32, 32, generator=g), ["a.png", "b.png"], g)
    noise, t = stage.draw_noise(inputs.latents, g)
    stage.module.set_gradient_checkpointing(checkpointing)
    stage.module.train()
    params = {n: p for n, p in stage.module.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    try:
        loss = stage.loss(stage.module, inputs, noise, t)
        loss.backward()
    finally:
        stage.module.set_gradient_checkpointing(False)
    return loss.item(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(stage: Any) -> None:
    """Every trained tensor's gradient with checkpointing equals the plain one (1e-6): a block skipped, its
    output detached or re-run without its guidance context fails. The checkpoint must really run (ControlNet
    and U-Net blocks both), and not in eval mode."""
    loss0, plain = _gradients(stage, False)
    real = torch.utils.checkpoint.checkpoint
    with mock.patch.object(torch.utils.checkpoint, "checkpoint", side_effect=real) as spy:
        loss1, ckpt = _gradients(stage, True)
    n_trained = sum(1 for p in stage.module.parameters() if p.requires_grad)
    assert len(plain) == n_trained, "some trained tensor got no gradient"
    assert loss1 == pytest.approx(loss0, abs=1e-7)
    assert ckpt.keys() == plain.keys()
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # resnets + transformer blocks of the ControlNet's encoder and of the whole U-Net
    cn = stage.model.controlnet
    expected = sum(len(b.resnets) + len(getattr(b, "attentions", []) or []) for b in cn.down_blocks)
    assert spy.call_count > expected, spy.call_count
    stage.module.set_gradient_checkpointing(True)
    stage.module.eval()
    try:
        with mock.patch.object(torch.utils.checkpoint, "checkpoint", side_effect=real) as spy:
            g = torch.Generator().manual_seed(0)
            inputs = stage.make_inputs(torch.rand(1, 3, 32, 32, generator=g), ["a.png"], g)
            noise, t = stage.draw_noise(inputs.latents, g)
            stage.loss(stage.module, inputs, noise, t)
        assert spy.call_count == 0  # validation / inference: plain blocks
    finally:
        stage.module.set_gradient_checkpointing(False)
        stage.module.train()


def test_memory_plan_counts_checkpointing_ema_and_the_8bit_optimizer(stage: Any) -> None:
    from training.memory_plan import plan_megasr

    train = stage.cfg.train
    plain = plan_megasr(stage, 2, 32)
    stage.module.set_gradient_checkpointing(True)
    try:
        with mock.patch.multiple(train, gradient_checkpointing=True, ema_decay=0.999, optimizer="adamw8bit"):
            cheap = plan_megasr(stage, 2, 32)
    finally:
        stage.module.set_gradient_checkpointing(False)
    n = plain.trainable_params
    print(f"activations: plain {plain.activations / 2**20:.2f} MB, checkpointed {cheap.activations / 2**20:.2f} MB")
    assert cheap.activations < 0.7 * plain.activations
    assert plain.optimizer == 8 * n and cheap.optimizer == 2 * n  # Adam's fp32 moments vs 8-bit ones
    assert plain.ema == 0 and cheap.ema == 4 * n  # the fp32 EMA shadow
    assert cheap.step_temporaries == 0 < plain.step_temporaries
    text = cheap.describe()
    assert "AdamW8bit" in text and "ema" in text and "gradient checkpointing" in text


def test_adamw8bit_is_refused_before_anything_trains_where_it_cannot_run(
    files: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without bitsandbytes, or without CUDA: one problem naming train.optimizer and what to do; the CLI exits 2
    before a step."""
    from training.errors import UsageError
    from training.preflight import preflight
    from training.runs import check_optimizer

    cfg = load_config(
        megasr_config(files["base"], files["guidance"], files["hr"], files["root"] / "r8", optimizer="adamw8bit")
    )
    with mock.patch("importlib.util.find_spec", return_value=None):
        with pytest.raises(UsageError) as err:
            check_optimizer(cfg, cuda=True)
    text = str(err.value)
    assert text.startswith("train.optimizer: adamw8bit") and "pip install bitsandbytes" in text
    assert "CUDA" not in text.split(". Use")[0]
    with mock.patch("importlib.util.find_spec", return_value=object()):
        with pytest.raises(UsageError) as err:
            check_optimizer(cfg, cuda=False)
        assert "needs a CUDA GPU" in str(err.value) and "pip install" not in str(err.value)
        check_optimizer(cfg, cuda=True)  # both present: no refusal
    if not torch.cuda.is_available():
        problems = preflight(cfg, "megasr")
        assert [p.option for p in problems].count("train.optimizer") == 1, problems
        from training.cli import main

        run = files["root"] / "r8cli"
        path = megasr_config(files["base"], files["guidance"], files["hr"], run)
        code = main(["megasr", "--config", str(path), "--output", str(run), "--set", "train.optimizer=adamw8bit"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("train.optimizer") >= 1 and "CUDA GPU" in err, err
        assert not list(run.rglob("step-*"))
    with pytest.raises(Exception) as bad:
        load_config(megasr_config(files["base"], files["guidance"], files["hr"], files["root"] / "rb", optimizer="sgd"))
    assert "train.optimizer" in str(bad.value) and "adamw8bit" in str(bad.value)


# ------------------------------------------------------------------------------------------------------- EMA


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(self.frozen(x))))


def _ema_run(run_dir: Path, max_steps: int, resume: bool = False) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    net = _Net()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.05)
    history: list[dict[str, torch.Tensor]] = []

    def step_fn(batch: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = torch.randn(8, 4, generator=ctx.generator)
        return (ctx.modules["net"](x) - x.sum(1, keepdim=True)).pow(2).mean()

    def batches(start: int, rank: int, world: int):  # noqa: ANN202
        while True:
            yield None

    def on_step(step: int, modules: dict[str, nn.Module], saved: Path | None) -> None:
        history.append({n: p.detach().clone() for n, p in modules["net"].named_parameters() if p.requires_grad})

    if not resume:
        history.append({n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad})
    cfg = LoopConfig(max_steps=max_steps, checkpoint_every=3, log_every=100, ema_decay=0.9, cpu=True)
    res = run_training(
        run_dir=run_dir,
        config=cfg,
        modules={"net": net},
        optimizer=opt,
        step_fn=step_fn,
        batches=batches,
        resume=resume,
        on_step=on_step,
    )
    return res, history


def test_ema_follows_its_recurrence_and_a_resume_restores_it_exactly(tmp_path: Path) -> None:
    from training.checkpoint import latest_checkpoint, load_checkpoint

    res, history = _ema_run(tmp_path / "full", 6)
    shadow = res.ema["net"].shadow
    assert set(shadow) == {"a.weight", "a.bias", "b.weight", "b.bias"}  # trained only, fp32
    d = 0.9
    expected = {k: v.double() for k, v in history[0].items()}
    for params in history[1:]:
        expected = {k: d * expected[k] + (1 - d) * params[k].double() for k in expected}
    for k, v in shadow.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.double(), expected[k], atol=1e-6, rtol=0, msg=k)
        assert not torch.allclose(v, history[-1][k], atol=1e-3)  # an average, not the last weights
    saved = load_checkpoint(latest_checkpoint(tmp_path / "full"))["ema"]["net"]
    assert saved["decay"] == d and all(torch.equal(saved["shadow"][k], shadow[k]) for k in shadow)
    # interrupted at step 3 (checkpointed), resumed to 6: the same shadow, bit for bit
    _ema_run(tmp_path / "part", 3)
    resumed, _ = _ema_run(tmp_path / "part", 6, resume=True)
    assert resumed.start_step == 3
    for k in shadow:
        assert torch.equal(resumed.ema["net"].shadow[k], shadow[k]), k


def test_megasr_exports_the_ema_weights_when_on(
    files: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stage's export and ``megasr-train export`` write the EMA tensors (not the raw ones) and say so."""
    from safetensors.torch import load_file

    from training.checkpoint import latest_checkpoint, load_checkpoint
    from training.export import export_megasr
    from training.stage_megasr import train_megasr

    run = tmp_path / "run"
    cfg = load_config(
        megasr_config(files["base"], files["guidance"], files["hr"], run, max_steps=2, batch_size=1, ema_decay=0.5)
    )
    with caplog.at_level("INFO", logger="training"):
        result, export, stage = train_megasr(cfg, run)
    state = load_checkpoint(latest_checkpoint(run))
    raw, ema = state["modules"]["megasr"], state["ema"]["megasr"]["shadow"]
    changed = [k for k in ema if not torch.equal(ema[k], raw[k])]
    assert changed, "the EMA equals the raw weights: nothing to tell apart"
    again = tmp_path / "again.safetensors"
    with caplog.at_level("INFO", logger="training"):
        export_megasr(run, again)
    said = [r.getMessage() for r in caplog.records if "exported" in r.getMessage()]
    assert len(said) == 2 and all("EMA weights (decay 0.5)" in m for m in said), said
    for path in (export, again):
        written = load_file(str(path))
        for k in changed:
            assert torch.equal(written[k.removeprefix("model.")], ema[k]), (path, k)
    # the module keeps its raw weights after the export
    live = stage.module.state_dict()
    assert all(torch.equal(live[k], raw[k]) for k in changed)


def test_the_24gb_recipe_parses_and_its_full_size_plan_fits_24gb() -> None:
    """megasr_seesr_24gb.yaml: bf16, checkpointing, 8-bit AdamW, batch 2 x 8 = 16; its plan at full SD-2-base
    size (meta device, fake tensors) fits 24 GB, and the same recipe without the cheap settings does not. The plan
    is a SeeSR start's: the U-Net side of SeeSR's branch frozen (as the warm start leaves it), not counted as
    trained -- a frozen part counted as trained (or one that trains) shows in the parameter counts."""
    import dataclasses

    from training.cli import _resolve_config_path
    from training.memory_plan import parse_size
    from training.memory_plan_full import plan_full_size

    cfg = load_config(_resolve_config_path("megasr_seesr_24gb"))
    t = cfg.train
    assert (t.mixed_precision, t.gradient_checkpointing, t.optimizer) == ("bf16", True, "adamw8bit")
    assert t.batch_size * t.grad_accum == 16 and t.gpu_memory == "24GB" and not t.ema_decay
    assert cfg.megasr.model["representation_dim"] == 512 and cfg.data.crop_size == 512  # SeeSR's start, 512 px
    plan = plan_full_size(cfg, seesr_start=True)
    print(plan.describe())
    assert plan.trainable_params > 300_000_000  # the real SD-2 ControlNet (and SeeSR's branch), not a toy
    assert plan.peak <= parse_size("24GB"), plan.describe()
    # SeeSR's U-Net branch at full size: 16 Transformer2DModels (SD-2's cross-attention blocks), about 261M
    scratch = plan_full_size(cfg, seesr_start=False)
    assert 200_000_000 < scratch.trainable_params - plan.trainable_params < 300_000_000
    plain = plan_full_size(
        dataclasses.replace(cfg, train=dataclasses.replace(t, gradient_checkpointing=False)), seesr_start=True
    )
    assert plain.activations > 1.5 * plan.activations
    # a bf16 trace keeps less than the fp32 one, and checkpointing is still what makes the recipe fit
    bf16 = plan_full_size(cfg, trace_dtype=torch.bfloat16, seesr_start=True)
    assert bf16.activations < plan.activations and bf16.weights == plan.weights
    plain_bf16 = plan_full_size(
        dataclasses.replace(cfg, train=dataclasses.replace(t, gradient_checkpointing=False)),
        trace_dtype=torch.bfloat16,
        seesr_start=True,
    )
    assert plain_bf16.activations > bf16.activations and bf16.peak <= parse_size("24GB")
    # fp32 Adam (no bitsandbytes: train.optimizer=adam) costs > 3 GB of the headroom (its moments and step copies)
    adam = dataclasses.replace(plan, optimizer=4 * plan.optimizer, step_temporaries=12 * plan.trainable_params)
    assert adam.peak - plan.peak > 3 * 2**30
