"""quantize / dequantize / fake_quantize (straight-through) and the group reshapes."""

import pytest
import torch

from gqsa.quant import (
    dequantize,
    expand_group_mask,
    fake_quantize,
    from_groups,
    minmax_qparams,
    quantize,
    round_ste,
    to_groups,
)

BITS = (2, 3, 4, 8)


def test_quantize_known_values_and_clamping():
    # scale 0.5, zero point 2, 2 bits: codes stand for (q - 2) * 0.5 in {-1, -0.5, 0, 0.5}.
    w = torch.tensor([[-3.0, -1.0, -0.26, 0.0, 0.24, 0.5, 0.74, 9.0]])
    codes = quantize(w, torch.tensor([0.5]), torch.tensor([2.0]), bits=2)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[0, 0, 1, 2, 2, 3, 3, 3]]
    assert dequantize(codes, torch.tensor([0.5]), torch.tensor([2.0])).tolist() == [
        [-1.0, -1.0, -0.5, 0.0, 0.0, 0.5, 0.5, 0.5]
    ]


def test_dequantize_broadcasts_per_group():
    codes = torch.tensor([[[0, 15], [7, 8]], [[1, 2], [3, 4]]], dtype=torch.uint8)  # (2, 2, 2)
    scale = torch.tensor([[1.0, 0.5], [2.0, 0.25]])
    zero = torch.tensor([[0.0, 8.0], [1.0, 4.0]])
    deq = dequantize(codes, scale, zero)
    assert deq.dtype == torch.float32
    assert deq.tolist() == [[[0.0, 15.0], [-0.5, 0.0]], [[0.0, 2.0], [-0.25, 0.0]]]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_codes_stay_in_range(bits, symmetric):
    torch.manual_seed(bits)
    groups = torch.randn(64, 16) * 3
    scale, zero = minmax_qparams(groups, bits, symmetric)
    codes = quantize(groups * 2, scale, zero, bits)  # out-of-range inputs are clamped, not wrapped
    assert int(codes.max()) <= 2**bits - 1
    assert int(codes.min()) >= 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_forward_equals_dequantize_of_quantize(bits, symmetric, dtype):
    torch.manual_seed(0)
    groups = (torch.randn(32, 4, 16) * 0.05).to(dtype)
    scale, zero = minmax_qparams(groups, bits, symmetric)
    out = fake_quantize(groups, scale, zero, bits)
    assert out.dtype == dtype and out.shape == groups.shape
    want = dequantize(quantize(groups, scale, zero, bits), scale, zero).to(dtype)
    assert torch.equal(out, want)


def test_fake_quantize_gradients_known_values():
    # 2 bits, scale 0.5, zero point 2: representable values -1, -0.5, 0, 0.5.
    w = torch.tensor([[-3.0, -0.7, 0.3, 5.0]], requires_grad=True)  # clipped low, inside, inside, clipped high
    scale = torch.tensor([0.5], requires_grad=True)
    zero = torch.tensor([2.0], requires_grad=True)
    out = fake_quantize(w, scale, zero, bits=2)
    assert out.tolist() == [[-1.0, -0.5, 0.5, 0.5]]
    out.sum().backward()
    # d/dw: straight-through inside the code range, zero where clamped.
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    # d/dscale (LSQ): (q - z) - w / s inside, (q - z) where clamped: -2 + (-1 + 1.4) + (1 - 0.6) + 1.
    assert scale.grad.shape == (1,)
    assert float(scale.grad) == pytest.approx(-0.2, abs=1e-6)
    # d/dzero: 0 inside (the shift cancels), -s where clamped.
    assert float(zero.grad) == pytest.approx(-1.0, abs=1e-6)


def test_fake_quantize_gradient_masks_match_clipping_on_random_data():
    torch.manual_seed(1)
    groups = torch.randn(64, 16)
    scale, zero = minmax_qparams(groups, 3, False)
    scale = (scale * 0.6).requires_grad_()  # shrink the range so that some weights clip
    zero = zero.clone().requires_grad_()
    w = groups.clone().requires_grad_()
    out = fake_quantize(w, scale, zero, 3)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    pre = torch.round(groups / scale.detach().unsqueeze(-1)) + zero.detach().unsqueeze(-1)
    clipped = (pre < 0) | (pre > 7)
    assert bool(clipped.any()) and bool((~clipped).any())
    # (1 / s) * s is 1 up to float32 rounding.
    torch.testing.assert_close(w.grad, torch.where(clipped, 0.0, upstream), rtol=1e-6, atol=0)
    assert bool((w.grad[clipped] == 0).all())
    assert scale.grad is not None and bool((scale.grad != 0).any())
    zero_grad_want = (torch.where(clipped, -scale.detach().unsqueeze(-1), 0.0) * upstream).sum(-1)
    torch.testing.assert_close(zero.grad, zero_grad_want)


def test_fake_quantize_zero_point_is_rounded_in_forward():
    # The zero point matters where codes clamp: 3.6 must act exactly as 4 (4 bits, scale 0.1).
    w = torch.tensor([[-1.0, 0.3, 2.0, 0.0]])  # w / s = -10 (clamps to 0), 3, 20 (clamps to 15), 0
    scale = torch.tensor([0.1])
    a = fake_quantize(w, scale, torch.tensor([3.6]), 4)
    b = fake_quantize(w, scale, torch.tensor([4.0]), 4)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.tensor([[-0.4, 0.3, 1.1, 0.0]]))


def test_round_ste():
    x = torch.tensor([-1.5, -0.4, 0.5, 0.6, 2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0))


def test_groups_round_trip_and_layout():
    w = torch.arange(2 * 32, dtype=torch.float32).reshape(2, 32)
    g = to_groups(w, 8)
    assert g.shape == (2, 4, 8)
    assert torch.equal(g[1, 2], w[1, 16:24])
    assert torch.equal(from_groups(g), w)
    with pytest.raises(ValueError, match="group_size 12"):
        to_groups(w, 12)


def test_expand_group_mask():
    mask = torch.tensor([[True, False], [False, True]])
    assert expand_group_mask(mask, 3).tolist() == [
        [True, True, True, False, False, False],
        [False, False, False, True, True, True],
    ]
