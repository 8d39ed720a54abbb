"""GQSA one-shot: Hessian statistics, group saliency, the compensated sweep, and the block-by-block driver."""

import pytest
import torch
from problems import correlated_inputs, hessian, output_error
from tiny import tiny_model

from gqsa.algorithms.hessian import HessianAccumulator, SingularHessianError, damped_inverse_cholesky
from gqsa.algorithms.oneshot import compensated_prune_quantize, gqsa_oneshot_linear
from gqsa.format.packed import PackedWeight
from gqsa.quant.groups import expand_group_mask
from gqsa.quant.masks import select_groups
from gqsa.quant.saliency import group_saliency, obs_diag_group_saliency, obs_group_saliency


def test_hessian_accumulator_is_2_over_n_xtx_in_any_chunking():
    x = torch.randn(3, 50, 16)
    acc = HessianAccumulator(16)
    acc.add(x[0])
    acc.add(x[1:])
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(acc.hessian, 2.0 / 150 * flat.T @ flat, rtol=1e-5, atol=1e-6)
    assert acc.tokens == 150


def test_damped_inverse_handles_dead_columns_and_rejects_nan():
    x = torch.randn(100, 8)
    x[:, 3] = 0  # an input column that is never active
    h = hessian(x)
    hinv, chol, dead = damped_inverse_cholesky(h)
    assert dead.tolist() == [i == 3 for i in range(8)]
    torch.testing.assert_close(chol.T @ chol, hinv, rtol=1e-4, atol=1e-5)
    assert torch.equal(chol, torch.triu(chol))
    h[0, 0] = float("nan")
    with pytest.raises(SingularHessianError, match="layer.*NaN"):
        damped_inverse_cholesky(h, layer="layer")


def test_damped_inverse_raises_dampening_for_indefinite_matrices():
    h = -torch.eye(4)  # never positive definite for small relative dampening... mean diagonal is negative
    with pytest.raises(SingularHessianError, match="q_proj: the calibration Hessian is not positive definite"):
        damped_inverse_cholesky(h, layer="q_proj")


def _damped_inverse_reference(h: torch.Tensor, lam: float):
    """The textbook computation, one full matrix per step: (H + lam * mean(diag H) I)^-1 and its upper factor."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    damped = h + lam * torch.diagonal(h).mean() * torch.eye(h.shape[0])
    linv = torch.linalg.solve_triangular(torch.linalg.cholesky(damped), torch.eye(h.shape[0]), upper=False)
    hinv = linv.T @ linv
    return hinv, torch.linalg.cholesky(hinv, upper=True), dead


def test_damped_inverse_is_the_textbook_one_bit_for_bit_and_leaves_the_hessian_alone():
    # the in-place dampening and early releases (peak memory) must not change a single bit of the result
    torch.manual_seed(0)
    x = torch.randn(200, 48)
    x[:, 5] = 0
    h = hessian(x)
    before = h.clone()
    hinv, chol, dead = damped_inverse_cholesky(h, damp=0.01)
    ref_hinv, ref_chol, ref_dead = _damped_inverse_reference(before, 0.01)
    assert torch.equal(hinv, ref_hinv) and torch.equal(chol, ref_chol) and torch.equal(dead, ref_dead)
    assert torch.equal(h, before)


def test_damped_inverse_retries_with_ten_times_the_dampening(caplog):
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))  # damp 0.01 leaves it indefinite, 0.1 does not
    before = h.clone()
    with caplog.at_level("WARNING", logger="gqsa.algorithms.hessian"):
        hinv, chol, _ = damped_inverse_cholesky(h, damp=0.01, layer="mlp.down_proj")
    ref_hinv, ref_chol, _ = _damped_inverse_reference(before, 0.1)
    assert torch.equal(hinv, ref_hinv) and torch.equal(chol, ref_chol)
    assert torch.equal(h, before)
    assert "mlp.down_proj: Hessian needed dampening 0.1" in caplog.text


def test_damped_inverse_holds_at_most_three_k_by_k_matrices():
    """Peak memory (Llama-2-7B's down_proj: K = 11008, 485 MB per matrix): the textbook computation keeps H's
    copy, the damped copy, its factor, the identity, L^-1 and H^-1 alive together (six or seven)."""
    from live_bytes import LiveBytes

    k = 256
    h = hessian(torch.randn(400, k))
    with LiveBytes() as mem:
        result = damped_inverse_cholesky(h)
    matrix = k * k * 4
    assert mem.peak <= 3 * matrix + 16 * k, mem.peak / matrix
    assert mem.live >= 2 * matrix  # what it returns is counted: the tracker sees the tensors
    del result


def test_obs_saliency_is_the_output_error_of_removing_a_group_with_optimal_compensation():
    torch.manual_seed(0)
    x = correlated_inputs(k=32)
    h = hessian(x) + 1e-3 * torch.eye(32)
    hinv = torch.linalg.inv(h)
    w = torch.randn(1, 32)
    scores = obs_group_saliency(w, hinv, 8)  # (1, 4)
    for grp in range(4):
        cols = torch.arange(grp * 8, grp * 8 + 8)
        rest = torch.tensor([c for c in range(32) if c not in cols])
        # Optimal compensation: least-squares refit of the remaining weights to the original output.
        h_rr, h_rg = h[rest][:, rest], h[rest][:, cols]
        new_rest = w[:, rest] + (w[:, cols] @ h_rg.T) @ torch.linalg.inv(h_rr)
        wq = torch.zeros_like(w)
        wq[:, rest] = new_rest
        torch.testing.assert_close(torch.tensor(output_error(w, wq, h)), scores[0, grp], rtol=1e-3, atol=1e-5)


def test_diag_and_wanda_saliencies_match_their_formulas():
    torch.manual_seed(1)
    w, h = torch.randn(3, 16), hessian(torch.randn(64, 16))
    hinv = torch.linalg.inv(h + 0.01 * torch.eye(16))
    torch.testing.assert_close(
        obs_diag_group_saliency(w, hinv, 8), (w**2 / torch.diagonal(hinv)).reshape(3, 2, 8).sum(-1)
    )
    torch.testing.assert_close(
        group_saliency("wanda", w, h, None, 8), (w**2 * torch.diagonal(h)).reshape(3, 2, 8).sum(-1)
    )
    with pytest.raises(ValueError, match="needs the inverse Hessian"):
        group_saliency("obs", w, h, None, 8)


def test_compensation_lowers_output_error_against_round_to_nearest_with_the_same_mask():
    torch.manual_seed(2)
    x = correlated_inputs(k=64)
    h = hessian(x)
    w = torch.randn(32, 64)
    hinv, chol, _ = damped_inverse_cholesky(h)
    mask = select_groups(group_saliency("obs", w, h, hinv, 16), 0.5, "row")
    for bits in (2, 4):
        compensated = gqsa_oneshot_linear(w, h, hinv, chol, bits, 16, 0.5, mask=mask).dequantize()
        rtn = PackedWeight.pack(*_rtn(w, mask, bits), mask, bits).dequantize()
        assert output_error(w, compensated, h) < 0.7 * output_error(w, rtn, h), bits


def _rtn(w, mask, bits):
    from gqsa.quant import minmax_qparams, quantize, to_groups

    groups = to_groups(w, 16)
    scale, zero = minmax_qparams(groups, bits, False)
    return quantize(groups, scale, zero, bits), scale, zero


def test_obs_saliency_beats_magnitude_masks_on_skewed_inputs():
    torch.manual_seed(3)
    x = correlated_inputs(k=64)
    x[:, :16] *= 20.0  # the first group of inputs carries most of the signal
    h = hessian(x)
    w = torch.randn(32, 64)
    w[:, :16] *= 0.2  # ... through small weights that magnitude pruning would drop
    hinv, chol, _ = damped_inverse_cholesky(h)
    errors = {}
    for kind in ("obs", "magnitude"):
        packed = gqsa_oneshot_linear(w, h, hinv, chol, 8, 16, 0.5, saliency=kind)
        errors[kind] = output_error(w, packed.dequantize(), h)
    assert errors["obs"] < 0.5 * errors["magnitude"]


@pytest.mark.parametrize("bits,symmetric", [(3, False), (4, True), (8, False)])
def test_sweep_output_is_on_the_grid_and_pruned_groups_are_zero(bits, symmetric):
    torch.manual_seed(4)
    x = correlated_inputs(k=48)
    h = hessian(x)
    w = torch.randn(10, 48)
    hinv, chol, _ = damped_inverse_cholesky(h)
    mask = select_groups(torch.rand(10, 3), 1 / 3, "matrix")
    mask[4] = False  # a row with every group pruned
    codes, scale, zero = compensated_prune_quantize(w, chol, mask, bits, 16, symmetric, block_size=32)
    packed = PackedWeight.pack(codes, scale, None if symmetric else zero, mask, bits)
    dense = packed.dequantize()
    assert torch.equal(dense[~expand_group_mask(mask, 16)], torch.zeros(int((~mask).sum()) * 16))
    assert torch.equal(dense[4], torch.zeros(48))
    assert int(codes.max()) <= 2**bits - 1
    assert packed.sparsity == pytest.approx(float((~mask).float().mean()))


def test_zero_sparsity_is_gptq_and_beats_rtn():
    torch.manual_seed(5)
    x = correlated_inputs(k=64)
    h = hessian(x)
    w = torch.randn(16, 64)
    hinv, chol, _ = damped_inverse_cholesky(h)
    full = torch.ones(16, 4, dtype=torch.bool)
    gptq = gqsa_oneshot_linear(w, h, hinv, chol, 3, 16, 0.0)
    assert gptq.nnz == 16 * 4
    rtn = PackedWeight.pack(*_rtn(w, full, 3), full, 3)
    assert output_error(w, gptq.dequantize(), h) < output_error(w, rtn.dequantize(), h)


def test_blockwise_compression_of_a_tiny_model_beats_magnitude():
    from gqsa.compress import compress_model
    from gqsa.config import CalibSpec, CompressConfig, QuantSpec, SparsitySpec
    from gqsa.models.surgery import packed_layers

    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (8, 48), generator=gen)
    heldout = torch.randint(0, 320, (4, 48), generator=gen)
    reference = tiny_model("llama")
    with torch.inference_mode():
        ref_logits = reference(heldout).logits
    errors = {}
    for method in ("gqsa", "magnitude"):
        model = tiny_model("llama")
        cfg = CompressConfig(method=method, quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(0.5),
                             calib=CalibSpec(samples=8, seq_len=48))
        report = compress_model(model, cfg, calib_ids=calib if method == "gqsa" else None, progress=False)
        assert len(packed_layers(model)) == 14 and len(report["layers"]) == 14
        assert report["summary"]["sparsity"] == pytest.approx(0.5)
        with torch.inference_mode():
            errors[method] = float((model(heldout).logits - ref_logits).pow(2).mean())
    # A random model on random tokens has nearly isotropic activations, the case where Hessian-awareness helps
    # least; it must still help.
    assert errors["gqsa"] < 0.9 * errors["magnitude"]


def test_blockwise_driver_feeds_compressed_outputs_to_the_next_block():
    from torch import nn

    from gqsa.algorithms.blockwise import compress_blockwise
    from gqsa.algorithms.driver import capture_calibration_inputs
    from gqsa.models.adapter import decoder_layers

    model = tiny_model("llama")
    calib = torch.randint(0, 320, (3, 20), generator=torch.Generator().manual_seed(1))
    seen = {}

    def halve(name, linear, stats):
        seen[name] = stats.hessian.clone()
        new = nn.Linear(linear.in_features, linear.out_features, bias=False)
        new.weight.data = linear.weight.data * 0.5
        return new, {"layer": name}

    hidden, kwargs = capture_calibration_inputs(model, calib)
    reports = compress_blockwise(model, calib, halve, progress=False)
    assert [r["layer"] for r in reports][:7] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    # q/k/v share one Hessian, and block 1 sees the output of the already halved block 0.
    assert torch.equal(seen["model.layers.0.self_attn.q_proj"], seen["model.layers.0.self_attn.v_proj"])
    block0, block1 = decoder_layers(model)[:2]
    acc = HessianAccumulator(64)
    with torch.no_grad():
        for h in hidden:
            out = block0(h, **kwargs[0])
            out = out[0] if isinstance(out, tuple) else out
            acc.add(block1.input_layernorm(out))
    torch.testing.assert_close(seen["model.layers.1.self_attn.q_proj"], acc.hessian, rtol=1e-4, atol=1e-6)


def test_gqsa_without_calibration_windows_is_an_error():
    from gqsa.compress import compress_model
    from gqsa.config import CompressConfig

    with pytest.raises(ValueError, match="calibration windows"):
        compress_model(tiny_model("llama"), CompressConfig(method="gqsa"), progress=False)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.55])
@pytest.mark.parametrize("allocation", ["row", "matrix"])
@pytest.mark.parametrize("group_size", [8, 16, 32])
def test_adaptive_masks_meet_the_ratio_exactly(ratio, allocation, group_size):
    from gqsa.quant.masks import groups_to_prune

    torch.manual_seed(0)
    h = hessian(correlated_inputs(k=128))
    hinv, chol, _ = damped_inverse_cholesky(h)
    w = torch.randn(24, 128)
    packed = gqsa_oneshot_linear(w, h, hinv, chol, 4, group_size, ratio, allocation, "obs_adaptive",
                                 block_size=32)
    groups = 128 // group_size
    if allocation == "row":
        assert (packed.crow_indices.diff() == groups - groups_to_prune(groups, ratio)).all()
    else:
        assert 24 * groups - packed.nnz == groups_to_prune(24 * groups, ratio)


def test_adaptive_masks_with_one_block_are_the_exact_obs_masks():
    # With one block covering every column, the "remaining" inverse Hessian is H^-1 itself and the weights are
    # not updated yet: the adaptive choice must be the fixed OBS choice.
    torch.manual_seed(0)
    h = hessian(correlated_inputs(k=64))
    hinv, chol, _ = damped_inverse_cholesky(h)
    w = torch.randn(16, 64)
    for allocation in ("row", "matrix"):
        fixed = gqsa_oneshot_linear(w, h, hinv, chol, 4, 8, 0.5, allocation, "obs", block_size=64)
        adaptive = gqsa_oneshot_linear(w, h, hinv, chol, 4, 8, 0.5, allocation, "obs_adaptive", block_size=64)
        assert torch.equal(fixed.crow_indices, adaptive.crow_indices)
        assert torch.equal(fixed.col_indices, adaptive.col_indices)


def test_static_qparams_come_from_the_original_weights():
    from gqsa.quant.qparams import group_qparams
    from gqsa.quant.groups import to_groups

    torch.manual_seed(0)
    h = hessian(correlated_inputs(k=64))
    hinv, chol, _ = damped_inverse_cholesky(h)
    w = torch.randn(8, 64)
    mask = torch.ones(8, 4, dtype=torch.bool)
    _, scale, zero = compensated_prune_quantize(w, chol, mask, 2, 16, static_qparams=True)
    s0, z0 = group_qparams(to_groups(w, 16), 2, False, "minmax")
    assert torch.equal(scale, s0) and torch.equal(zero, z0)
    _, refit, _ = compensated_prune_quantize(w, chol, mask, 2, 16)
    assert torch.equal(refit[:, 0], s0[:, 0]) and not torch.equal(refit, s0)  # only the first group is untouched
