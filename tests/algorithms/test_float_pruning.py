"""Float pruning baselines: N:M and unstructured masks, SparseGPT's compensation, Wanda's activation weighting."""

import pytest
import torch
from problems import correlated_inputs, hessian, output_error
from tiny import tiny_model

from gqsa.algorithms.float_pruning import magnitude_prune, sparsegpt_prune, wanda_prune
from gqsa.algorithms.hessian import damped_inverse_cholesky
from gqsa.format.float_sparse_bits import float_sparse_bits_per_weight
from gqsa.quant.masks import nm_mask


def test_nm_mask_keeps_exactly_n_of_every_m_and_the_largest():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 6.0]])
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist() == [[True, False, True, False, False, False, True, True]]
    big = nm_mask(torch.rand(33, 64), 2, 4)
    assert (big.reshape(33, 16, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="divisible by M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_every_method_meets_the_pattern_exactly(nm):
    torch.manual_seed(0)
    x = correlated_inputs(1024)
    h = hessian(x)
    _, chol, _ = damped_inverse_cholesky(h)
    w = torch.randn(24, 64)
    for pruned, mask in (magnitude_prune(w, 0.5, nm), wanda_prune(w, h, 0.5, nm),
                         sparsegpt_prune(w, chol, 0.5, nm, block_size=32)):
        assert (pruned[~mask] == 0).all()
        assert mask.float().mean() == 0.5
        if nm:
            n, m = nm
            assert (mask.reshape(24, -1, m).sum(-1) == n).all()


def test_row_allocation_prunes_every_row_equally():
    w = torch.randn(8, 64)
    w[0] = 100 + w[0].abs()  # one row of large weights: a matrix-wide threshold would keep it whole
    _, row_mask = magnitude_prune(w, 0.5, allocation="row")
    _, mat_mask = magnitude_prune(w, 0.5, allocation="matrix")
    assert (row_mask.sum(1) == 32).all()
    assert mat_mask[0].all() and mat_mask.sum() == 256


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_compensation_beats_the_same_mask_without_update_and_wanda(nm):
    torch.manual_seed(0)
    x = correlated_inputs(1024)
    h = hessian(x)
    _, chol, _ = damped_inverse_cholesky(h)
    w = torch.randn(32, 64)
    pruned, mask = sparsegpt_prune(w, chol, 0.5, nm, allocation="row", block_size=32)
    no_update = w * mask  # the same mask, kept weights untouched: what the sweep would give without compensation
    wanda, _ = wanda_prune(w, h, 0.5, nm)
    assert output_error(w, pruned, h) < 0.7 * output_error(w, no_update, h)
    assert output_error(w, pruned, h) < 0.7 * output_error(w, wanda, h)


def test_wanda_beats_magnitude_when_input_columns_have_outliers():
    torch.manual_seed(0)
    x = correlated_inputs(1024, outlier_columns=True)
    h = hessian(x)
    w = torch.randn(32, 64)
    wanda, _ = wanda_prune(w, h, 0.5)
    magnitude, _ = magnitude_prune(w, 0.5)
    assert output_error(w, wanda, h) < 0.5 * output_error(w, magnitude, h)


def test_fp16_sparse_storage_accounting():
    assert float_sparse_bits_per_weight(0.5, "2:4") == 9.0  # 8 bits of values + 2-bit index per kept value
    assert float_sparse_bits_per_weight(0.5, "unstructured") == 9.0  # + a 1-bit bitmap per weight
    assert float_sparse_bits_per_weight(0.5, "4:8") == 9.5
    with pytest.raises(ValueError, match="pattern"):
        float_sparse_bits_per_weight(0.5, "group")


@pytest.mark.parametrize("preset_name", ["2of4-sparsegpt", "s50-wanda", "2of4-magnitude"])
def test_float_presets_prune_a_tiny_model_in_place(preset_name):
    from gqsa.compress import compress_model
    from gqsa.presets import preset
    from gqsa.models.adapter import compressible_linears

    model = tiny_model("llama")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    report = compress_model(model, preset(preset_name), calib_ids=calib, progress=False)
    assert report["summary"]["sparsity"] == pytest.approx(0.5)
    assert report["summary"]["bits_per_weight"] == pytest.approx(9.0)
    for name, linear in compressible_linears(model).items():
        assert type(linear) is torch.nn.Linear
        zero = (linear.weight == 0).float().mean()
        assert zero >= 0.5, name
    assert all("output_error" in r for r in report["layers"]) == (preset_name != "2of4-magnitude")
