"""Peak bytes of the tensors a piece of eager torch code keeps alive at once, counted exactly (no sampling).

``LiveBytes`` is a dispatch mode: every tensor an ATen op returns inside it is counted by its storage until the
last Python tensor object on that storage is gone (CPython frees at once, so ``del x`` shows). Inputs created
outside the mode are not counted, and neither is an op's scratch memory that never becomes a returned tensor: the
peak is that of the code's own intermediates, which is what a change to the code's memory use changes.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage pointer -> [tensor objects alive on it, bytes]

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._refs:
                    self._refs[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self._refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out
