"""Masks that learn in BQPO: pruned groups keep trainable weights, and the kept groups are chosen again."""

import pytest
import torch
from tiny import tiny_model

from gqsa.algorithms.bqpo import _mask_update_steps
from gqsa.algorithms.training import fit
from gqsa.compress import compress_model
from gqsa.config import BQPOSpec, CalibSpec, CompressConfig, QuantSpec, SparsitySpec
from gqsa.format.packed import PackedWeight
from gqsa.models.surgery import packed_layers
from gqsa.nn.fake_quant import FakeQuantLinear
from gqsa.presets import fast, resolve_config
from gqsa.quant.quantize import quantize


def _packed_half(dense: torch.Tensor, keep_first: bool = True) -> PackedWeight:
    """(N, K) -> W4 g8, each row keeping its first (or last) half of the groups, min-max per group."""
    from gqsa.quant.groups import to_groups
    from gqsa.quant.qparams import minmax_qparams

    n, k = dense.shape
    groups = to_groups(dense, 8)
    mask = torch.zeros(n, k // 8, dtype=torch.bool)
    half = k // 16
    if keep_first:
        mask[:, :half] = True
    else:
        mask[:, half:] = True
    scale, zero = minmax_qparams(groups, 4, False)
    codes = quantize(groups, scale, zero, 4) * mask.unsqueeze(-1)
    return PackedWeight.pack(codes, torch.where(mask, scale, torch.ones_like(scale)), zero, mask, 4)


def test_a_learnable_mask_starts_as_the_packed_layer_and_trains_the_pruned_groups():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 64, generator=gen)
    packed = _packed_half(dense)
    fixed, learner = FakeQuantLinear(packed), FakeQuantLinear(packed, dense=dense)
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(fixed(x), learner(x))  # same forward: the pruned groups are zero either way
    assert torch.equal(learner.mask, packed.unpack().mask)
    # the pruned groups hold the dense weights (up to their 4-bit grid), the kept ones the packed values
    pruned_cols = slice(32, 64)
    assert torch.allclose(learner.weight[:, pruned_cols], dense[:, pruned_cols], atol=0.2)
    assert torch.equal(learner.weight[:, :32], fixed.weight[:, :32])
    for layer in (fixed, learner):
        layer(x).square().sum().backward()
    assert float(fixed.weight.grad[:, pruned_cols].abs().max()) == 0  # a fixed mask: no gradient there
    assert float(learner.weight.grad[:, pruned_cols].abs().min()) > 0  # straight through: every weight learns
    assert torch.allclose(learner.weight.grad[:, :32], fixed.weight.grad[:, :32])
    with pytest.raises(ValueError, match="learnable mask"):
        FakeQuantLinear(packed, mode="qparams", dense=dense)


def test_reselect_mask_keeps_each_rows_count_and_takes_the_groups_that_matter_on_the_inputs():
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(4, 64, generator=gen)
    dense[:, 0:8] *= 0.001  # kept group 0 is small
    dense[:, 32:] *= 0.01  # the pruned groups are small...
    dense[:, 40:48] = 5.0  # ...but group 5...
    dense[:, 56:64] = 5.0  # ...and so is pruned group 7, but its inputs are zero
    layer = FakeQuantLinear(_packed_half(dense), dense=dense)
    counts = layer.mask.sum(1).clone()
    input_sq = torch.ones(64)
    input_sq[56:64] = 0
    revived = layer.reselect_mask(input_sq)
    assert revived == 4  # one group per row
    assert torch.equal(layer.mask.sum(1), counts)
    assert bool(layer.mask[:, 5].all()) and not bool(layer.mask[:, 7].any()) and not bool(layer.mask[:, 0].any())
    assert bool(layer.mask[:, 1:4].all())
    packed = layer.to_packed()
    assert torch.equal(packed.unpack().mask, layer.mask) and packed.sparsity == 0.5
    # the packed layer computes what the trained one does (up to the fp16 rounding of scales)
    x = torch.randn(2, 64, generator=gen)
    assert torch.allclose(x @ packed.dequantize().T, layer(x).detach(), atol=1e-2)
    with pytest.raises(RuntimeError, match="dense weight"):
        FakeQuantLinear(_packed_half(dense)).reselect_mask(input_sq)


def test_fit_restores_state_tensors_with_the_best_parameters():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    flag = torch.tensor([0.0])

    def loss(i):
        return (w - 3.0).square().sum() + 100 * flag.sum()

    def ruin(step):
        flag.fill_(1.0)  # a state change that makes every later loss worse

    result = fit([{"params": [w], "lr": 0.1}], loss, 4, 3, 1, 0.0, 1, 1, 0, on_step=ruin, state=[flag])
    assert float(flag) == 0.0 and result["loss_after"] == result["loss_before"]
    assert float(w.detach()) == 1.0  # the starting point was the best: parameters and state restored together


def test_mask_updates_are_spread_over_every_epoch_but_the_last():
    spec = BQPOSpec(epochs=3, batch_size=2, val_windows=4, mask_updates=4)
    steps = _mask_update_steps(spec, 20)  # 16 training windows, 8 steps per epoch, 16 before the last epoch
    assert steps == {4, 8, 12, 16}
    assert _mask_update_steps(spec.replace(mask_updates=0), 20) == set()
    with pytest.raises(ValueError, match="at least 2 epochs"):
        BQPOSpec(epochs=1, mask_updates=2)


def _config(mask_updates: int) -> CompressConfig:
    return CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                          calib=CalibSpec(samples=12, seq_len=32),
                          bqpo=BQPOSpec(epochs=3, lr_weight=3e-4, lr_qparams=1e-4, val_windows=4, patience=3,
                                        mask_updates=mask_updates))


def test_bqpo_with_mask_updates_changes_masks_at_the_same_sparsity_per_row():
    calib = torch.randint(0, 320, (12, 32), generator=torch.Generator().manual_seed(0))
    frozen_model = tiny_model("llama")
    compress_model(frozen_model, _config(0), calib_ids=calib, progress=False)
    model = tiny_model("llama")
    report = compress_model(model, _config(4), calib_ids=calib, progress=False)
    frozen, learned = packed_layers(frozen_model), packed_layers(model)
    changed = 0
    for name, layer in learned.items():
        a, b = frozen[name].packed_weight().unpack().mask, layer.packed_weight().unpack().mask
        assert torch.equal(a.sum(1), b.sum(1)), name  # every row keeps its number of groups
        if name.startswith("model.layers.0."):  # block 0 sees the same inputs in both runs
            changed += int(not torch.equal(a, b))
    assert changed > 0  # some layer of block 0 chose other groups
    assert report["summary"]["sparsity"] == 0.5
    for block in report["bqpo_blocks"]:
        assert block["mask_updates"]["updates"] == 4 or block["epochs_run"] < 2
        assert block["loss_after"] <= block["loss_before"]


def test_presets_drop_mask_updates_where_they_cannot_run():
    cfg = resolve_config("w4s50", bqpo_mask_updates=3)
    assert cfg.bqpo.mask_updates == 3
    assert fast(cfg).bqpo.mask_updates == 0  # one epoch: nothing before the last
    assert resolve_config("w4s50", bqpo_mask_updates=3, bqpo_epochs=0).bqpo.mask_updates == 3  # BQPO off
    with pytest.raises(ValueError, match="at least 2 epochs"):
        resolve_config("w4s50", bqpo_mask_updates=3, bqpo_epochs=1)
    with pytest.raises(ValueError, match="keeps its mask"):
        CompressConfig(method="sparsegpt", quant=None, sparsity=SparsitySpec(ratio=0.5, pattern="2:4"),
                       bqpo=BQPOSpec(epochs=2, mask_updates=1))
