"""Peak live tensor bytes, counted op by op: the memory probe of the salience tests and benchmark.

Exact for tensors on any machine and under any allocator (unlike RSS, which keeps freed heap memory
and sees the rest of the process): a storage is counted when an op first returns it and uncounted
when it is freed.  Views and in-place results alias an input's storage and are not counted again.
Not counted: memory that kernels allocate internally without returning it (scratch), and Python
objects.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as probe: ...`` then ``probe.peak``: the most bytes of tensor storages created
    inside the block that were alive at once (``probe.live``: those still alive)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self._counted and storage.data_ptr() not in inputs:
                    self._counted.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out
