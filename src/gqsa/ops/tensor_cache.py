"""Values computed from tensors, kept while those tensors live and are unchanged.

The kernels' index check (``gqsa.ops.safety``) and the layouts a backend builds for the op path
(``gqsa.ops.gpu_a8``) are computed once per tensors and looked up on every call. An entry is keyed by the first
tensor's id and holds weak references to all of them, so it goes when that tensor goes; it is used only while
every tensor is the same object with the same data pointer, shape and version counter (bumped by every in-place
change), so a changed tensor is computed again. A plain dict of ids: a quarter of the cost of a
``WeakIdKeyDictionary`` lookup.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


def tensor_version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change), or None for an inference tensor."""
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version (they cannot be changed outside inference mode)
        return None


def _state(tensors: tuple, extra: tuple) -> tuple:
    """What must not change for an entry to hold: each tensor's data pointer, version counter and shape."""
    return extra + tuple([None if t is None else (t.data_ptr(), tensor_version(t), t.shape) for t in tensors])


def _same(refs: tuple, tensors: tuple) -> bool:
    """Whether the weak references point at exactly these tensors (None where a tensor is None)."""
    for ref, t in zip(refs, tensors):
        if (ref() if ref is not None else None) is not t:
            return False
    return True


class TensorCache:
    """``get(tensors, extra, compute)``: ``compute()`` once for these tensors (the first must not be None) and
    ``extra`` (hashable settings), then the stored value while they live unchanged."""

    def __init__(self) -> None:
        # id(tensors[0]) -> (weak references to the tensors, their state and extra, value)
        self._entries: dict[int, tuple[tuple, tuple, Any]] = {}

    def get(self, tensors: tuple, extra: tuple, compute: Callable[[], Any]) -> Any:
        ident = id(tensors[0])
        state = _state(tensors, extra)
        entry = self._entries.get(ident)
        if entry is not None and entry[1] == state and _same(entry[0], tensors):
            return entry[2]
        value = compute()
        first = weakref.ref(tensors[0], lambda ref: self._forget(ref, ident))
        refs = (first, *(None if t is None else weakref.ref(t) for t in tensors[1:]))
        self._entries[ident] = (refs, state, value)
        return value

    def _forget(self, ref: weakref.ref, ident: int) -> None:
        if self._entries.get(ident, ((None,),))[0][0] is ref:  # not the entry of a newer tensor with the same id
            del self._entries[ident]
