"""Peak tensor memory of a piece of torch code, counted exactly by the dispatcher (no RSS noise).

``TensorMemory`` is a ``TorchDispatchMode``: every tensor an aten op returns is counted by its storage
(views share one entry) from its creation until the last Python tensor on that storage dies. Tensors that
existed before the block (weights, inputs) are not counted. ``peak`` is the largest total of live bytes
seen, ``largest`` the largest single storage; both are deterministic for a given computation.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [bytes, python tensors alive on it]
        self.current = 0
        self.peak = 0
        self.largest = 0
        self._seen: set[int] = set()  # id() of tensors already counted (in-place ops return their input)

    def _release(self, ptr: int, tid: int) -> None:
        self._seen.discard(tid)
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self.live[ptr]

    def _track(self, t: torch.Tensor) -> None:
        if id(t) in self._seen or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr == 0:
            return
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, nbytes)
        entry[1] += 1
        self._seen.add(id(t))
        weakref.finalize(t, self._release, ptr, id(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out
