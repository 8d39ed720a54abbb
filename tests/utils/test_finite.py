"""Non-finite values described in words: counts of each kind, in chunks."""

import torch

from gqsa.utils.finite import describe_nonfinite


def test_describe_nonfinite_counts_each_kind():
    t = torch.zeros(4, 8)
    assert describe_nonfinite(t) is None
    t[0, 0], t[1, 1], t[2, 2] = float("nan"), float("inf"), -float("inf")
    assert describe_nonfinite(t) == "3 non-finite values of 32 (1 NaN, 2 Inf)"
    assert describe_nonfinite(t.half()) == "3 non-finite values of 32 (1 NaN, 2 Inf)"
    assert describe_nonfinite(torch.tensor([float("nan")])) == "1 non-finite value of 1 (1 NaN, 0 Inf)"
    assert describe_nonfinite(torch.ones(3, dtype=torch.int64)) is None
    assert describe_nonfinite(torch.empty(0)) is None


def test_describe_nonfinite_in_chunks(monkeypatch):
    import gqsa.utils.finite as finite

    monkeypatch.setattr(finite, "_CHUNK", 5)  # the counts add up over chunks
    t = torch.zeros(23)
    t[[0, 7, 22]] = float("nan")
    t[11] = float("inf")
    assert describe_nonfinite(t) == "4 non-finite values of 23 (3 NaN, 1 Inf)"
