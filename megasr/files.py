"""File helpers shared by the core, the nodes and training: atomic writes, fsync, sha256, state-dict reading.

One home for each: the weight-file format (``weights.py``), the downloader (``download.py``), training
checkpoints and the nodes all call these instead of keeping their own copies.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

PathLike = str | os.PathLike


def fsync_dir(folder: PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """fsync a file's contents to disk."""
    with open(os.fspath(path), "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Write through ``write(tmp_path)`` to a temp file beside ``path``, fsync it, then rename into place.

    On any error (or interrupt) the temp file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """A single-file state dict: safetensors, or a torch file loaded with ``weights_only=True``
    (a ``{"state_dict": ...}`` wrapper is unwrapped). Never unpickles arbitrary objects."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"'{p}' does not hold a state dict")
    return state
