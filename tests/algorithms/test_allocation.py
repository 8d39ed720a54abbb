"""Allocation "model": per-layer shares of the pruning from measured sensitivity, meeting the global target."""

import pytest
import torch
from tiny import tiny_model

from gqsa.algorithms.allocation import SensitivityCurve, allocate_counts
from gqsa.quant.masks import groups_to_prune


def _curves(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "cheap": SensitivityCurve.from_scores(torch.rand(64, 8, generator=gen) * 0.01, 1.0),
        "mid": SensitivityCurve.from_scores(torch.rand(40, 9, generator=gen), 1.0),
        "costly": SensitivityCurve.from_scores(torch.rand(30, 7, generator=gen) * 100, 1.0),
    }


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.55, 0.7])
@pytest.mark.parametrize("spread", [0.0, 0.05, 0.2, 1.0])
def test_counts_meet_the_global_target_exactly_within_the_bounds(ratio, spread):
    curves = _curves()
    counts = allocate_counts(curves, ratio, spread)
    total = sum(c.groups for c in curves.values())
    assert sum(counts.values()) == groups_to_prune(total, ratio)
    for name, c in curves.items():
        assert (ratio - spread) * c.groups - 1 <= counts[name] <= (ratio + spread) * c.groups + 1
        assert 0 <= counts[name] < c.groups


def test_less_sensitive_layers_are_pruned_more():
    counts = allocate_counts(_curves(), 0.5, 0.3)
    frac = {n: counts[n] / c.groups for n, c in _curves().items()}
    assert frac["cheap"] == pytest.approx(0.8, abs=0.01)  # at its upper bound
    assert frac["costly"] == pytest.approx(0.2, abs=0.01)  # at its lower bound
    assert frac["cheap"] > frac["mid"] > frac["costly"]


def test_normalisation_by_output_energy_makes_scaled_layers_equal():
    base = torch.rand(50, 10, generator=torch.Generator().manual_seed(3))
    curves = {"a": SensitivityCurve.from_scores(base, 1.0), "b": SensitivityCurve.from_scores(base * 1e4, 1e4)}
    counts = allocate_counts(curves, 0.5, 0.5)
    assert abs(counts["a"] - counts["b"]) <= 1


def test_curve_fraction_below_matches_the_data():
    scores = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)
    curve = SensitivityCurve.from_scores(scores, 1.0, quantiles=100)
    assert curve.groups == 100
    assert curve.fraction_below(30.0) == pytest.approx(0.30)
    assert curve.fraction_below(0.5) == 0.0 and curve.fraction_below(1000.0) == 1.0


def test_model_allocation_compresses_a_tiny_model_to_the_exact_global_ratio():
    from gqsa.compress import compress_model
    from gqsa.config import CalibSpec, CompressConfig, QuantSpec, SparsitySpec
    from gqsa.models.surgery import packed_layers

    model = tiny_model("llama")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(quant=QuantSpec(bits=4, group_size=16),
                         sparsity=SparsitySpec(ratio=0.5, allocation="model", model_spread=0.2),
                         calib=CalibSpec(samples=4, seq_len=32))
    report = compress_model(model, cfg, calib_ids=calib, progress=False)
    layers = packed_layers(model)
    groups = {n: m.out_features * m.in_features // 16 for n, m in layers.items()}
    kept = {n: m.packed_weight().nnz for n, m in layers.items()}
    assert sum(groups.values()) - sum(kept.values()) == groups_to_prune(sum(groups.values()), 0.5)
    assert report["groups_pruned_per_layer"] == {n: groups[n] - kept[n] for n in layers}
    ratios = {n: 1 - kept[n] / groups[n] for n in layers}
    assert max(ratios.values()) - min(ratios.values()) > 0.05  # the shares really differ
    assert all(0.3 - 1 / groups[n] <= r <= 0.7 + 1 / groups[n] for n, r in ratios.items())  # bounds, +-1 group
