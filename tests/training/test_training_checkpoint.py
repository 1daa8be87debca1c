"""Atomic checkpoints (training/checkpoint.py): round trips, pruning, crashes mid-write."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training import checkpoint as ck

REPO = Path(__file__).resolve().parents[2]


def _trained_adam() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        net(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return net, opt, sched


def _assert_tree_equal(a: object, b: object) -> None:
    if isinstance(a, dict):  # an OrderedDict state_dict comes back as a plain dict (same keys, same order)
        assert isinstance(b, dict)
    else:
        assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_tree_equal(x, y)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_round_trip_of_models_adam_scheduler_rng_and_odd_values(tmp_path: Path) -> None:
    net, opt, sched = _trained_adam()
    gen = torch.Generator().manual_seed(5)
    torch.rand(7, generator=gen)
    state = {
        "modules": {"net": net.state_dict()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": ck.capture_rng_states({"data": gen}),
        "config": {"lr": 2.5e-5, "betas": (0.9, 0.999), "name": "x", "none": None, "nan": float("nan")},
        "odd": {1: "int key", (2, 3): [np.arange(3, dtype=np.uint32)], "__x": b"\x00\xff", "dt": torch.bfloat16},
        "half": torch.randn(3, dtype=torch.bfloat16),
    }
    path = ck.save_checkpoint(tmp_path, 7, state)
    assert path.name == "step-00000007" and ck.latest_checkpoint(tmp_path) == path
    json.loads((path / "state.json").read_text())  # plain JSON, no pickle anywhere
    back = ck.load_checkpoint(path)
    assert back.pop("step") == 7
    _assert_tree_equal(state, back)

    # the optimizer state really loads: a fresh Adam continues exactly like the original
    net2, opt2, sched2 = _trained_adam()
    for p in net2.parameters():
        p.data.add_(1.0)  # scramble, then restore from the checkpoint
    net2.load_state_dict(back["modules"]["net"])
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    x = torch.randn(5, 4)
    for m, o, s in ((net, opt, sched), (net2, opt2, sched2)):
        m(x).square().mean().backward()
        o.step()
        s.step()
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)

    # RNG states restore the global generators and named ones
    gen2 = torch.Generator()
    ck.restore_rng_states(back["rng"], {"data": gen2})
    assert torch.equal(torch.rand(3, generator=gen2), torch.rand(3, generator=gen))
    a = (random.random(), np.random.rand(), torch.rand(1))
    ck.restore_rng_states(back["rng"])
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_keep_last_n_and_latest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        ck.save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep_last=2)
    assert [ck.checkpoint_step(p) for p in ck.list_checkpoints(tmp_path)] == [4, 5]
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["w"][0] == 5
    # the same step again replaces it
    ck.save_checkpoint(tmp_path, 5, {"w": torch.zeros(2)}, keep_last=2)
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["w"][0] == 0


def test_crash_mid_write_leaves_previous_checkpoint_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck.save_checkpoint(tmp_path, 1, {"w": torch.ones(4)})

    def exploding_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, {"w": torch.zeros(4)})
    monkeypatch.undo()
    latest = ck.latest_checkpoint(tmp_path)
    assert ck.checkpoint_step(latest) == 1
    assert torch.equal(ck.load_checkpoint(latest)["w"], torch.ones(4))
    # a damaged newer checkpoint (truncated tensors) is skipped by latest and refused by load
    bad = ck.save_checkpoint(tmp_path, 3, {"w": torch.zeros(1000)})
    data = (bad / "tensors.safetensors").read_bytes()
    (bad / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    assert ck.checkpoint_step(ck.latest_checkpoint(tmp_path)) == 1
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.load_checkpoint(bad)


def test_sigkill_during_saves_never_leaves_a_broken_latest(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from training.checkpoint import save_checkpoint
        step = 0
        while True:
            step += 1
            save_checkpoint({str(tmp_path)!r}, step, {{"w": torch.full((1_000_000,), float(step))}}, keep_last=2)
            print(step, flush=True)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for _ in range(3):  # let a few saves complete, then kill in the middle of the next ones
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    latest = ck.latest_checkpoint(tmp_path)
    assert latest is not None
    state = ck.load_checkpoint(latest)
    assert float(state["w"][0]) == state["step"] and float(state["w"][-1]) == state["step"]


def test_unsupported_values_name_their_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config/fn"):
        ck.save_checkpoint(tmp_path, 1, {"config": {"fn": print}})
    assert ck.latest_checkpoint(tmp_path) is None
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "checkpoints" / "step-00000001")
