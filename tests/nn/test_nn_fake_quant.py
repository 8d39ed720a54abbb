"""FakeQuantLinear: the trainable stand-in of a packed layer starts exactly where the packed layer is."""

import pytest
import torch

from gqsa.format.packed import quantize_to_packed
from gqsa.nn.fake_quant import FakeQuantLinear
from gqsa.nn.packed_linear import PackedLinear
from gqsa.quant.masks import group_l2_norms, select_groups


def _packed(symmetric=False, bits=4, n=12, k=64, g=16):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    mask = select_groups(group_l2_norms(w, g), 0.5, "row")
    return quantize_to_packed(w, mask, bits, g, symmetric, "minmax")


@pytest.mark.parametrize("mode", ["weights", "qparams"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_starts_at_the_packed_weight_and_packs_back_exactly(mode, symmetric, bits):
    packed = _packed(symmetric, bits)
    fake = FakeQuantLinear(packed, mode=mode)
    torch.testing.assert_close(fake.dequantized_weight(), packed.dequantize(), rtol=0, atol=0)
    back = fake.to_packed()
    for name, t in packed.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    x = torch.randn(3, 64)
    torch.testing.assert_close(fake(x), PackedLinear.from_packed(packed)(x), rtol=1e-5, atol=1e-5)


def test_pruned_groups_stay_zero_and_get_no_gradient():
    packed = _packed()
    fake = FakeQuantLinear(packed, mode="weights")
    loss = fake(torch.randn(5, 64)).pow(2).sum()
    loss.backward()
    mask = packed.unpack().mask  # (N, G)
    grad = fake.weight.grad.reshape(12, 4, 16)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    assert (fake.scale.grad[~mask] == 0).all()
    with torch.no_grad():
        fake.weight.add_(1.0)  # move every weight, pruned ones included
    w = fake.dequantized_weight().reshape(12, 4, 16)
    assert (w[~mask] == 0).all()
    assert fake.to_packed().nnz == packed.nnz


def test_qparams_mode_trains_only_scales_unless_asked():
    packed = _packed()
    names = {n for n, _ in FakeQuantLinear(packed, mode="qparams").named_parameters()}
    assert names == {"scale"}
    names = {n for n, _ in FakeQuantLinear(packed, mode="qparams", train_zero_point=True).named_parameters()}
    assert names == {"scale", "zero_point"}
    names = {n for n, _ in FakeQuantLinear(packed, mode="weights").named_parameters()}
    assert names == {"weight", "scale", "zero_point"}
    with pytest.raises(ValueError, match="mode must be one of"):
        FakeQuantLinear(packed, mode="codes")


def test_qparams_mode_keeps_the_codes_after_scale_changes():
    packed = _packed()
    fake = FakeQuantLinear(packed, mode="qparams")
    with torch.no_grad():
        fake.scale.mul_(1.3)
    back = fake.to_packed().unpack()
    assert torch.equal(back.codes, packed.unpack().codes)
    assert not torch.equal(back.scale, packed.unpack().scale)
