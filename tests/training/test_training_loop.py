"""The generic training loop (training/loop.py) with a tiny real model undoing the degradation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from training.checkpoint import latest_checkpoint, list_checkpoints
from training.data import DegradedBatch
from training.degradations import DegradationPipeline
from training.loop import LoopConfig, StepContext, run_training

REPO = Path(__file__).resolve().parents[2]


def _hr_batch() -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    img = torch.from_numpy(np.ascontiguousarray(skdata.astronaut())).permute(2, 0, 1).float().div(255)
    crops = [img[:, y : y + 32, x : x + 32] for y, x in ((60, 200), (150, 230), (300, 100), (400, 300))]
    return torch.stack(crops)


class TinyRestorer(nn.Module):
    """A small residual conv net: bicubic-upscaled LR -> HR."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(16, 3, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _make(lr: float = 3e-3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = TinyRestorer()
    return net, torch.optim.Adam(net.parameters(), lr=lr)


def test_loss_decreases_on_a_fixed_batch(tmp_path: Path) -> None:
    hr = _hr_batch()
    fixed = DegradedBatch.build(hr, DegradationPipeline(), torch.Generator().manual_seed(0))
    net, opt = _make()

    def step_fn(batch: DegradedBatch, ctx: StepContext) -> torch.Tensor:
        return (ctx.modules["net"](batch.lr_up) - batch.hr).abs().mean()

    def batches(start: int, rank: int, world: int):  # noqa: ANN202
        while True:
            yield fixed

    cfg = LoopConfig(max_steps=20, checkpoint_every=100, log_every=5)
    res = run_training(
        run_dir=tmp_path, config=cfg, modules={"net": net}, optimizer=opt, step_fn=step_fn, batches=batches
    )
    assert res.step == 20 and len(res.losses) == 20
    assert all(np.isfinite(res.losses))
    assert np.mean(res.losses[-3:]) < 0.9 * res.losses[0], res.losses
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020"]  # final checkpoint always written


def _resumable_run(run_dir: Path, max_steps: int, resume: bool, grad_accum: int = 2) -> tuple[nn.Module, list[float]]:
    """Fresh degradation per micro-batch from ctx.generator, dropout from the global RNG, LR schedule, accumulation."""
    hr = _hr_batch()
    pipe = DegradationPipeline()
    net, opt = _make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))

    def step_fn(batch: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b = DegradedBatch.build(batch, pipe, ctx.generator)
        return (ctx.modules["net"](b.lr_up) - b.hr_usm).abs().mean()

    def batches(start: int, rank: int, world: int):  # noqa: ANN202
        k = start
        while True:  # a different (deterministic) crop order per micro-batch index
            yield hr.roll(k, dims=0)
            k += 1

    cfg = LoopConfig(max_steps=max_steps, grad_accum=grad_accum, checkpoint_every=3, keep_last=2, max_grad_norm=1.0)
    res = run_training(
        run_dir=run_dir,
        config=cfg,
        modules={"net": net},
        optimizer=opt,
        scheduler=sched,
        step_fn=step_fn,
        batches=batches,
        resume=resume,
        extra_state={"config": {"note": "test"}},
    )
    return net, res.losses


def test_kill_and_resume_equals_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    full_net, full_losses = _resumable_run(tmp_path / "full", 10, resume=False)
    part_net, part_losses = _resumable_run(tmp_path / "part", 5, resume=False)
    assert latest_checkpoint(tmp_path / "part").name == "step-00000005"
    rest_net, rest_losses = _resumable_run(tmp_path / "part", 10, resume=True)
    assert part_losses + rest_losses == full_losses
    for p, q in zip(full_net.parameters(), rest_net.parameters(), strict=True):
        assert torch.equal(p, q)
    # resuming a finished run does nothing
    again, losses = _resumable_run(tmp_path / "part", 10, resume=True)
    assert losses == [] and all(torch.equal(p, q) for p, q in zip(again.parameters(), rest_net.parameters()))


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from torch import nn
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[1])
    from training.loop import LoopConfig, run_training

    out = Path(sys.argv[2])

    def run(run_dir, max_steps, resume):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)

        def step_fn(batch, ctx):
            noise = torch.randn(batch.shape, generator=ctx.generator) * 0.1
            return (ctx.modules["net"](batch + noise) - batch).square().mean()

        def batches(start, rank, world):
            k = start
            while True:  # each rank its own data: without gradient all-reduce the ranks would diverge
                g = torch.Generator().manual_seed(1000 * (k * world + rank))
                yield torch.rand(2, 3, 16, 16, generator=g)
                k += 1

        cfg = LoopConfig(max_steps=max_steps, checkpoint_every=2, cpu=True)
        res = run_training(run_dir=run_dir, config=cfg, modules={"net": net}, optimizer=opt, step_fn=step_fn,
                           batches=batches, resume=resume)
        return net, res

    net, res = run(out / "full", 6, False)
    rank = res and __import__("os").environ["RANK"]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"full-{rank}.safetensors"))
    run(out / "part", 3, False)
    net, res = run(out / "part", 6, True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / f"resumed-{rank}.safetensors"))
    from accelerate import PartialState
    PartialState().wait_for_everyone()
    if int(rank) == 0:
        print("world", res.start_step, res.step, PartialState().num_processes, flush=True)
    """
)


@pytest.mark.slow
def test_two_process_cpu_ddp_over_gloo_keeps_ranks_identical(tmp_path: Path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(REPO), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world 3 6 2" in proc.stdout
    full0, full1 = (load_file(str(tmp_path / f"full-{r}.safetensors")) for r in (0, 1))
    res0, res1 = (load_file(str(tmp_path / f"resumed-{r}.safetensors")) for r in (0, 1))
    for k in full0:
        assert torch.equal(full0[k], full1[k]), k  # DDP kept the ranks in step
        assert torch.equal(full0[k], res0[k]) and torch.equal(res0[k], res1[k]), k  # resume is exact under DDP
    assert latest_checkpoint(tmp_path / "full").name == "step-00000006"


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from training.loop import LoopConfig, run_training


    def run(run_dir, max_steps, resume, delay=0.0, sigterm_at=None):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(8, 3, 3, padding=1))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)

        def step_fn(batch, ctx):
            time.sleep(delay)
            if ctx.step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            x = batch + 0.1 * torch.randn(batch.shape, generator=ctx.generator)
            return (ctx.modules["net"](x) - batch).abs().mean()

        def batches(start, rank, world):
            k = start
            while True:
                yield torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(k))
                k += 1

        cfg = LoopConfig(max_steps=max_steps, checkpoint_every=2, keep_last=2, log_every=1)
        res = run_training(run_dir=run_dir, config=cfg, modules={"net": net}, optimizer=opt, step_fn=step_fn,
                           batches=batches, resume=resume)
        return net, res


    if __name__ == "__main__":
        sys.path.insert(0, sys.argv[1])
        run(Path(sys.argv[2]), int(sys.argv[3]), False, delay=float(sys.argv[4]))
    """
)


def _kill_module(tmp_path: Path):  # noqa: ANN202
    import importlib.util

    path = tmp_path / "kill_run.py"
    path.write_text(KILL_SCRIPT)
    spec = importlib.util.spec_from_file_location("kill_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    import signal
    import time

    script, mod = _kill_module(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "part"
    victim = subprocess.Popen(  # slow steps, so the kill lands between checkpoints
        [sys.executable, str(script), str(REPO), str(run_dir), "8", "0.3"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 120
        while latest_checkpoint(run_dir) is None or latest_checkpoint(run_dir).name < "step-00000004":
            assert victim.poll() is None, victim.communicate()[1][-2000:]
            assert time.monotonic() < end, "no checkpoint of step 4 in time"
            time.sleep(0.05)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    killed_at = int(latest_checkpoint(run_dir).name.split("-")[1])
    assert 4 <= killed_at < 8
    resumed, res = mod.run(run_dir, 8, True)
    assert (res.start_step, res.step) == (killed_at, 8)
    full, _ = mod.run(tmp_path / "full", 8, False)
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_stops(tmp_path: Path) -> None:
    _, mod = _kill_module(tmp_path)
    _, res = mod.run(tmp_path / "term", 50, False, sigterm_at=2)  # the signal arrives during step 3
    assert res.interrupted and res.step == 3
    assert latest_checkpoint(tmp_path / "term").name == "step-00000003"  # nothing lost
    resumed, res2 = mod.run(tmp_path / "term", 6, True)
    full, _ = mod.run(tmp_path / "full", 6, False)
    assert (res2.start_step, res2.step) == (3, 6)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters(), strict=True))
