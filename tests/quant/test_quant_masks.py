"""Group scores and keep-masks: row / matrix allocation and one threshold across matrices."""

import pytest
import torch

from gqsa.quant import group_l2_norms, select_groups, select_groups_across
from gqsa.quant.masks import groups_to_prune


def _scores(n: int, g: int, seed: int) -> torch.Tensor:
    return torch.rand(n, g, generator=torch.Generator().manual_seed(seed))  # distinct with probability 1


def test_group_l2_norms():
    w = torch.tensor([[3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float16)
    norms = group_l2_norms(w, 4)
    assert norms.dtype == torch.float32
    assert norms.tolist() == [[5.0, 2.0]]


@pytest.mark.parametrize(
    ("total", "ratio", "pruned"),
    [(10, 0.0, 0), (10, 0.5, 5), (3, 0.5, 1), (5, 0.5, 2), (4, 0.3, 1), (4, 0.4, 2), (10, 0.25, 2), (7, 0.99, 7)],
)
def test_groups_to_prune_rounds_to_nearest_ties_down(total, ratio, pruned):
    assert groups_to_prune(total, ratio) == pruned


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.6, 0.9])
def test_row_allocation_keeps_the_same_count_and_the_largest_scores_in_every_row(ratio):
    scores = _scores(13, 24, seed=int(ratio * 100))
    mask = select_groups(scores, ratio, "row")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    keep = 24 - groups_to_prune(24, ratio)
    assert mask.sum(dim=1).tolist() == [keep] * 13
    for r in range(13):
        kept, pruned = scores[r][mask[r]], scores[r][~mask[r]]
        assert float(kept.min()) > float(pruned.max())


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75])
def test_matrix_allocation_prunes_the_global_lowest(ratio):
    scores = _scores(9, 16, seed=3)
    scores[0] += 10.0  # one row far more important: matrix allocation lets it keep everything
    mask = select_groups(scores, ratio, "matrix")
    total = 9 * 16
    assert int(mask.sum()) == total - groups_to_prune(total, ratio)
    assert float(scores[mask].min()) > float(scores[~mask].max())
    assert bool(mask[0].all())
    assert len(set(mask.sum(dim=1).tolist())) > 1  # rows differ


@pytest.mark.parametrize("allocation", ["row", "matrix"])
def test_ratio_zero_keeps_everything(allocation):
    scores = _scores(5, 8, seed=0)
    scores[2] = 0.0  # even all-zero scores are kept
    assert bool(select_groups(scores, 0.0, allocation).all())


def test_ratio_zero_across_keeps_everything():
    masks = select_groups_across({"a": _scores(2, 4, 1), "b": torch.zeros(3, 2)}, 0.0)
    assert all(bool(m.all()) for m in masks.values())


def test_ties_are_broken_by_lower_index():
    scores = torch.ones(2, 4)
    assert select_groups(scores, 0.5, "row").tolist() == [[True, True, False, False]] * 2
    assert select_groups(scores, 0.25, "matrix").tolist() == [[True, True, True, True], [True, True, False, False]]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_select_groups_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        select_groups(_scores(2, 4, 0), ratio)
    with pytest.raises(ValueError, match="ratio"):
        select_groups_across({"a": _scores(2, 4, 0)}, ratio)


@pytest.mark.parametrize("allocation", ["model", "column"])
def test_select_groups_rejects_allocations_for_other_scopes(allocation):
    with pytest.raises(ValueError, match=allocation):
        select_groups(_scores(2, 4, 0), 0.5, allocation)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_select_groups_across_total_count_and_threshold(ratio):
    scores = {"q": _scores(8, 4, 1), "k": _scores(4, 4, 2), "mlp": _scores(16, 8, 3)}
    masks = select_groups_across(scores, ratio)
    assert list(masks) == list(scores)
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - groups_to_prune(total, ratio)
    for name in scores:
        assert masks[name].shape == scores[name].shape and masks[name].dtype == torch.bool
    kept = torch.cat([scores[k][masks[k]] for k in scores])
    pruned = torch.cat([scores[k][~masks[k]] for k in scores])
    assert float(kept.min()) > float(pruned.max())


def test_select_groups_across_prunes_the_matrix_with_smaller_scores_more():
    big = _scores(6, 8, 4) + 0.5  # in [0.5, 1.5)
    small = _scores(6, 8, 5) * 0.8  # in [0, 0.8): uniformly smaller
    masks = select_groups_across({"big": big, "small": small}, 0.4)
    pruned_big = int((~masks["big"]).sum())
    pruned_small = int((~masks["small"]).sum())
    assert pruned_big + pruned_small == groups_to_prune(96, 0.4)
    assert pruned_small > pruned_big
    # Completely separated scores: the smaller matrix alone pays.
    masks = select_groups_across({"big": big + 10, "small": small}, 0.25)
    assert bool(masks["big"].all())
    assert int((~masks["small"]).sum()) == groups_to_prune(96, 0.25)
