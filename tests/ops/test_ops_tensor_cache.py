"""The tensor-keyed cache behind the index check and the op path's layouts."""

import gc
import weakref

import torch

from gqsa.ops.tensor_cache import TensorCache


def test_computed_once_while_unchanged_and_again_after_any_change():
    cache, calls = TensorCache(), []
    a, b = torch.zeros(4), torch.ones(3)

    def compute():
        calls.append(1)
        return len(calls)

    assert cache.get((a, b, None), (7,), compute) == 1
    assert cache.get((a, b, None), (7,), compute) == 1  # looked up
    b.add_(1)  # in place: version counter
    assert cache.get((a, b, None), (7,), compute) == 2
    assert cache.get((a, b, None), (8,), compute) == 3  # other settings
    assert cache.get((a, b.clone(), None), (8,), compute) == 4  # another tensor
    assert cache.get((a, b, b), (8,), compute) == 5  # None -> a tensor


def test_an_entry_goes_with_its_first_tensor_and_never_takes_a_newer_ones():
    cache = TensorCache()
    a = torch.zeros(4)
    cache.get((a,), (), lambda: "old")
    ident = id(a)
    del a
    gc.collect()
    assert ident not in cache._entries
    b, other = torch.zeros(4), torch.zeros(1)
    cache.get((b,), (), lambda: "new")
    cache._forget(weakref.ref(other), id(b))  # the late callback of an older tensor that had b's id
    assert cache._entries[id(b)][2] == "new"
