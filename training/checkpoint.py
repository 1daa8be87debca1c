"""Atomic training checkpoints: tensors in safetensors, everything else in JSON (no pickle).

Layout of a run folder::

    run_dir/checkpoints/step-00001000/tensors.safetensors   every tensor / ndarray of the state
    run_dir/checkpoints/step-00001000/state.json            the rest of the state tree + format + step

A checkpoint is written into a hidden temporary folder next to the final one, its files flushed with
``fsync``, and the folder renamed into place with ``os.replace``: a crash at any moment leaves either the
previous checkpoints untouched or the new one complete. Hidden (``.tmp-*``) leftovers are ignored by
:func:`latest_checkpoint` and removed by the next save.

The state is any tree of dicts (any hashable JSON-able keys), lists, tuples, tensors, numpy arrays, bytes and
JSON scalars: model / optimizer / scheduler ``state_dict()``s, RNG states, the step and the run config.
Tuples, non-string keys and dtypes round-trip exactly, so ``optimizer.load_state_dict`` accepts the result.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megasr.files import fsync_dir, fsync_file

from .errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_states",
    "checkpoint_step",
    "decode_tree",
    "encode_tree",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "restore_rng_states",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "megasr-training-checkpoint/1"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
_PREFIX = "step-"


# ----------------------------------------------------------------------------------------------
# tree encoding
# ----------------------------------------------------------------------------------------------

_WIDE_UNSIGNED = {np.dtype("uint16"), np.dtype("uint32"), np.dtype("uint64")}


def encode_tree(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-able tree and a flat dict of CPU tensors referenced from it by name."""
    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: list[str]) -> str:
        name = "/".join(path) or "tensor"
        if name in tensors:
            name = f"{name}#{len(tensors)}"
        return name

    def enc(x: Any, path: list[str]) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            name = name_for(path)
            tensors[name] = x.detach().to("cpu", copy=True).contiguous()  # one copy, never shared storage
            return {"__tensor__": name}
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                raise TypeError(f"state at '{'/'.join(path)}': object arrays cannot be saved")
            name = name_for(path)
            arr = x.astype(np.int64) if x.dtype in _WIDE_UNSIGNED else x
            tensors[name] = torch.from_numpy(np.ascontiguousarray(arr)).clone()
            return {"__ndarray__": name, "dtype": x.dtype.str}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, bytes):
            return {"__bytes__": base64.b64encode(x).decode("ascii")}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, [*path, str(i)]) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, [*path, str(i)]) for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, [*path, k]) for k, v in x.items()}
            return {"__dict__": [[enc(k, [*path, "key"]), enc(v, [*path, str(k)])] for k, v in x.items()]}
        raise TypeError(f"state at '{'/'.join(path)}': cannot save a value of type {type(x).__name__}")

    return enc(obj, []), tensors


def decode_tree(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return tensors[x["__ndarray__"]].numpy().astype(np.dtype(x["dtype"]))
        if "__dtype__" in x:
            return getattr(torch, x["__dtype__"])
        if "__bytes__" in x:
            return base64.b64decode(x["__bytes__"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["__dict__"]}
        return {k: dec(v) for k, v in x.items()}

    return dec(tree)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------


def capture_rng_states(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """States of Python's, numpy's and torch's global RNGs (CPU + every CUDA device) and of ``generators``."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`capture_rng_states` captured (generators by name; missing names are an error)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"checkpoint has no RNG state for generator '{name}'")
        g.set_state(saved[name].to(torch.uint8))


# ----------------------------------------------------------------------------------------------
# save / find / load
# ----------------------------------------------------------------------------------------------


def _ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: str | Path) -> int | None:
    """The step encoded in a checkpoint folder name, or ``None`` when it is not one."""
    name = Path(path).name
    if not name.startswith(_PREFIX):
        return None
    try:
        return int(name[len(_PREFIX) :])
    except ValueError:
        return None


def save_checkpoint(run_dir: str | Path, step: int, state: Mapping[str, Any], keep_last: int | None = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically; prune to the newest ``keep_last``.

    Returns the checkpoint folder. An existing checkpoint of the same step is replaced.
    """
    root = _ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a crash
        shutil.rmtree(stale, ignore_errors=True)
    tree, tensors = encode_tree(dict(state))
    final = root / f"{_PREFIX}{int(step):08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensor_path = tmp / TENSORS_FILE
        save_file(tensors, str(tensor_path), metadata={"format": CHECKPOINT_FORMAT, "step": str(int(step))})
        fsync_file(tensor_path)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": int(step),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tensors_bytes": tensor_path.stat().st_size,
            "state": tree,
        }
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            old = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders of ``run_dir``, oldest step first."""
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and checkpoint_step(p) is not None and (p / STATE_FILE).is_file() and (p / TENSORS_FILE).is_file()
    ]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def _check(path: Path) -> dict[str, Any]:
    try:
        with open(path / STATE_FILE, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint '{path}': {STATE_FILE} is unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint '{path}': not a {CHECKPOINT_FORMAT} checkpoint")
    size = (path / TENSORS_FILE).stat().st_size if (path / TENSORS_FILE).is_file() else -1
    if size != meta.get("tensors_bytes"):
        raise CheckpointError(
            f"checkpoint '{path}': {TENSORS_FILE} has {size} bytes, expected {meta.get('tensors_bytes')} (truncated?)"
        )
    return meta


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes the integrity check, or ``None``."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            _check(path)
        except CheckpointError as exc:
            logger.warning("ignoring damaged checkpoint: %s", exc)
            continue
        return path
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint folder back into the state tree given to :func:`save_checkpoint`, plus ``"step"``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    meta = _check(path)
    try:
        tensors = load_file(str(path / TENSORS_FILE), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}': {TENSORS_FILE} is unreadable ({exc})") from exc
    try:
        state = decode_tree(meta["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}': state does not match its tensors ({exc})") from exc
    state["step"] = int(meta["step"])
    return state


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` (>= 1) checkpoints; returns the deleted folders."""
    keep_last = max(1, int(keep_last))
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last]
    for path in doomed:
        trash = path.with_name(f".tmp-del-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)  # leave the folder namespace first, so a crash never shows half a checkpoint
        shutil.rmtree(trash, ignore_errors=True)
        logger.debug("pruned checkpoint %s", path)
    return doomed
