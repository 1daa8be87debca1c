"""Two-process training over gloo when one rank has no data or dies (issue 14): every rank stops in bounded
time with one clear line, and no checkpoint is left half-written.

The ranks are started as plain processes with the torch.distributed environment (what a multi-node launcher
such as srun does), not through torchrun: torchrun's agent would SIGTERM the survivor and hide whether it
stops by itself. A small launcher gives each rank its own argv (a node-local data folder) and, for the dying
rank, SIGKILLs it at the start of a chosen step; everything else is the real ``python -m training`` CLI.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from dage_fixtures import TINY_HED_CONFIG
from megasr_training_fixtures import write_hr_folder

from training.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BOUND_S = 60  # a survivor must stop this soon after its peer is gone (gloo's own timeout is 30 minutes)

LAUNCHER = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    rank = int(os.environ["RANK"])
    argv = json.loads(sys.argv[2])[rank]
    die_at = int(sys.argv[3])
    if rank == 1 and die_at >= 0:
        import training.loop as loop
        seed_of = loop.step_seed  # called once per micro-batch, just before its forward pass

        def step_seed(seed, step, micro, r):
            if step == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return seed_of(seed, step, micro, r)

        loop.step_seed = step_seed
    from training.cli import main
    sys.exit(main(argv))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, argvs: list[list[str]], die_at: int = -1) -> list[tuple[int, str, float]]:
    """Run both ranks; returns (exit code, stderr, exit time) per rank."""
    script = tmp / "launch.py"
    script.write_text(LAUNCHER)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
        }
        cmd = [sys.executable, str(script), str(REPO), json.dumps(argvs), str(die_at)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 240
    try:
        while len(ended) < 2:
            assert time.monotonic() < deadline, "a rank hangs"
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, p.stderr.read(), ended[i]) for i, p in enumerate(procs)]


def _config(tmp: Path, max_steps: int) -> Path:
    cfg = {
        "base": str(REPO / "training" / "configs" / "tiny.yaml"),
        "data": {"crop_size": 32},
        "train": {"max_steps": max_steps, "checkpoint_every": 2, "lr": 1e-3},
        "dage_hed": {"extractor": TINY_HED_CONFIG},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def test_an_empty_data_shard_on_one_of_two_ranks_stops_both_with_one_line(tmp_path: Path) -> None:
    """Rank 1's (node-local) HR folder is empty. Catches the old 42-line traceback, a rank 0 that trains alone
    and waits forever for its peer, and a run folder or checkpoint made before the data was checked. Both
    ranks exit 2: rank 0 names the folder, the rank and what it expects; rank 1 says it stops with rank 0."""
    hr = write_hr_folder(tmp_path / "hr", count=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg, out = _config(tmp_path, 2), tmp_path / "run"
    argvs = [["dage-hed", "--config", str(cfg), "--input", str(d), "--output", str(out)] for d in (hr, empty)]
    (code0, err0, _), (code1, err1, _) = _launch(tmp_path, argvs)
    assert (code0, code1) == (2, 2), (err0, err1)
    assert _lines(err0) == [
        f"python -m training dage-hed: error: --input: '{empty}' holds no readable images (rank 1); "
        "expected png/jpg/webp/bmp/tif files"
    ], err0
    assert _lines(err1) == ["python -m training dage-hed: stopped (rank 1); rank 0 reports the problems"], err1
    assert list_checkpoints(out) == []  # nothing was started


def test_a_rank_that_dies_stops_the_other_in_bounded_time_and_leaves_whole_checkpoints(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed at the start of step 3 of 6 (after the step-2 checkpoint). Catches a survivor that
    waits in the next all-reduce until gloo's 30-minute timeout, one that exits 0 as if the run were done,
    a raw gloo error line, and a checkpoint left half-written: rank 0 exits 1 within BOUND_S with one line
    saying another process stopped and naming the step-2 checkpoint to resume from, and every checkpoint
    on disk loads."""
    hr = write_hr_folder(tmp_path / "hr", count=2)
    cfg, out = _config(tmp_path, 6), tmp_path / "run"
    argv = ["dage-hed", "--config", str(cfg), "--input", str(hr), "--output", str(out), "--log-level", "WARNING"]
    (code0, err0, end0), (code1, _, end1) = _launch(tmp_path, [argv, argv], die_at=3)
    assert code1 == -9  # the injected death
    assert code0 == 1, err0
    assert end0 - end1 < BOUND_S
    lines = re.findall(r"python -m training dage-hed: [^\r\n]*", err0)  # tqdm's bar shares the line
    step2 = out / "checkpoints" / "step-00000002"
    assert len(lines) == 1 and "another process of this run stopped" in lines[-1], err0
    assert f"'{step2}'" in lines[-1] and "--resume" in lines[-1] and "Traceback" not in err0, err0
    ckpts = list_checkpoints(out)
    assert step2 in ckpts and all(int(p.name.split("-")[1]) <= 3 for p in ckpts), ckpts
    for p in ckpts:
        assert load_checkpoint(p, map_location="cpu")["world_size"] == 2
    # the raw cause is in the log; gloo words it "closed" or "reset" by peer, depending on which side sees it first
    assert re.search(r"Connection (closed|reset) by peer", (out / "train.log").read_text())
