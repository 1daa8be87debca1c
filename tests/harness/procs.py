"""Child processes that die with the test process: a killed pytest (SIGKILL, OOM, a CI timeout) leaves no server.

``die_with_parent`` is a ``preexec_fn``: in the child, before ``exec``, it asks the Linux kernel (``prctl
PR_SET_PDEATHSIG``) to send SIGTERM when the parent dies, and checks the parent did not die in between. ComfyUI's
server stops on SIGTERM; scripts/run.sh traps it and stops its server. On other systems it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Run in the child (``preexec_fn``): SIGTERM this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # the parent died before prctl: go now
        os.kill(os.getpid(), signal.SIGTERM)


def preexec() -> object:
    """The ``preexec_fn`` for a child of this process."""
    me = os.getpid()
    return lambda: die_with_parent(me)
