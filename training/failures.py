"""One clear line for the failures a user can fix: a full disk, no permission, a refused weight file, and
for a run that lost another of its processes (a rank that died: exit 1, the run can be resumed).

:func:`explain` turns such an exception into ``(message, exit code)``; anything else is an internal error
(exit 1) whose message points at the log file that holds the full traceback.
"""

from __future__ import annotations

import errno
import pickle
import re
from pathlib import Path

__all__ = ["explain"]

_OS_FIXES = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another --out"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or choose another --out"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
    errno.EROFS: ("read-only file system", "choose a writable folder for --out"),
}
# safetensors' Rust errors carry the OS error only in their text
_RUST_OS = re.compile(r"code:\s*(\d+)")
# gloo / NCCL / the TCP store when another process of the run is gone
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crash")


def _peer_lost_message(run_dir: Path | None) -> str:
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir) if run_dir is not None and run_dir.is_dir() else None
    resume = (
        f"the newest checkpoint is '{last}': rerun the same command with --resume to continue from it"
        if last is not None
        else "no checkpoint was written yet: rerun the same command"
    )
    return (
        "another process of this run stopped (the connection to a peer rank was lost; its own output says why), "
        f"so this one stopped too; {resume}"
    )


def _os_message(code: int, path: str | None) -> str | None:
    if code not in _OS_FIXES:
        return None
    cause, fix = _OS_FIXES[code]
    where = f" writing '{path}'" if path else ""
    return f"{cause}{where}: {fix}; files written before are intact"


def explain(exc: BaseException, run_dir: Path | None = None) -> tuple[str, int] | None:
    """``(one-line message, exit code)`` for a failure the user can fix (exit 2) or a lost peer process (exit 1,
    naming the newest checkpoint of ``run_dir``), else None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        msg = _os_message(exc.errno, exc.filename)
        if msg:
            return msg, 2
    text = " ".join(str(exc).split())
    if type(exc).__name__ == "SafetensorError":
        m = _RUST_OS.search(text)
        if m:
            msg = _os_message(int(m.group(1)), None)
            if msg:
                return msg, 2
        if "StorageFull" in text or "No space left" in text:
            return _os_message(errno.ENOSPC, None) or text, 2
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return (
            "refused to read a weight file: it is a pickle that is not plain tensors (it could run code); "
            "give a .safetensors file or a plain-tensor .pth",
            2,
        )
    if type(exc).__name__ == "WeightFileError":
        return text, 2
    if isinstance(exc, RuntimeError) and any(m in text for m in _PEER_LOST):  # DistBackendError is one too
        return _peer_lost_message(run_dir), 1
    return None
