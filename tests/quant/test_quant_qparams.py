"""Group quantization parameters: min-max covers the range, zero points are integers, scales are fp16, MSE helps."""

import pytest
import torch

from gqsa.quant import dequantize, group_qparams, minmax_qparams, mse_qparams, qmax, quantize, symmetric_zero_point

BITS = (2, 3, 4, 8)
SYM = (False, True)

# Relative slack for float32 arithmetic in the error bounds (far below any real violation, which is >= 1e-4).
REL = 1e-5


def _random_groups(seed: int, n: int = 1024, g: int = 16) -> torch.Tensor:
    """Groups of varied sign and scale: mixed, all-positive, all-negative, tiny and large magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, g, generator=gen)
    w = w * torch.logspace(-3, 2, n).unsqueeze(-1)  # magnitudes from 1e-3 to 1e2
    w[: n // 8] = w[: n // 8].abs()  # all positive
    w[n // 8 : n // 4] = -w[n // 8 : n // 4].abs()  # all negative
    return w


def _roundtrip(groups, scale, zero, bits):
    return dequantize(quantize(groups, scale, zero, bits), scale, zero)


def test_qmax_and_symmetric_zero_point():
    assert [qmax(b) for b in BITS] == [3, 7, 15, 255]
    assert [symmetric_zero_point(b) for b in BITS] == [2, 4, 8, 128]


@pytest.mark.parametrize("symmetric", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_minmax_scale_is_positive_fp16_and_zero_point_is_integer_in_range(bits, symmetric):
    groups = _random_groups(bits)
    scale, zero = minmax_qparams(groups, bits, symmetric)
    assert scale.shape == zero.shape == groups.shape[:-1]
    assert scale.dtype == zero.dtype == torch.float32
    assert bool((scale > 0).all())
    assert torch.equal(scale.half().float(), scale)
    assert torch.equal(zero, zero.round())
    assert bool((zero >= 0).all()) and bool((zero <= qmax(bits)).all())
    # The scale is the covering step rounded to fp16: within one fp16 step of (max - min) / qmax.
    lo = groups.amin(-1).clamp(max=0)
    hi = groups.amax(-1).clamp(min=0)
    exact = (torch.maximum(-lo, hi) * 2 if symmetric else hi - lo) / qmax(bits)
    normal = exact >= 2.0**-14
    assert bool(normal.any())
    ratio = (scale / exact)[normal]
    assert bool((ratio >= 1 - 2.0**-11).all()) and bool((ratio <= 1 + 2.0**-10).all())
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())
    else:
        # Zero points adapt to the sign of the group: 0 for all-positive groups, qmax for all-negative ones.
        # Scales round UP to fp16; in the subnormal fp16 range (scale < 2**-14) one step of the scale can
        # exceed the 1 / (2 * qmax) slack, so an all-negative group may get qmax - 1 there, never less.
        n = groups.shape[0]
        assert bool((zero[: n // 8] == 0).all())
        negative, normal = zero[n // 8 : n // 4], scale[n // 8 : n // 4] >= 2**-14
        assert bool((negative[normal] == qmax(bits)).all())
        assert bool((negative[~normal] >= qmax(bits) - 1).all())


@pytest.mark.parametrize("symmetric", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_minmax_codes_reach_the_ends_and_min_is_within_half_a_scale(bits, symmetric):
    groups = _random_groups(10 + bits)
    scale, zero = minmax_qparams(groups, bits, symmetric)
    codes = quantize(groups, scale, zero, bits)
    deq = dequantize(codes, scale, zero)
    err = (deq - groups).abs()  # (n, g)
    half = scale.unsqueeze(-1) / 2 * (1 + REL)
    lo_idx = groups.argmin(-1, keepdim=True)
    # The group's minimum is represented within scale / 2 ...
    assert bool((err.gather(-1, lo_idx) <= half).all())
    # ... and so is every weight (round to nearest inside a range that covers [min, max]).
    assert bool((err <= half).all()), float((err / scale.unsqueeze(-1)).max())
    if not symmetric:
        mixed = (groups.amin(-1) < 0) & (groups.amax(-1) > 0)
        assert bool((codes.gather(-1, lo_idx).squeeze(-1)[mixed] == 0).all())
        assert bool((codes.amax(-1)[mixed] >= qmax(bits) - 1).all())


def _group_whose_scale_rounds_down(bits: int, symmetric: bool) -> torch.Tensor:
    """A group whose exact min-max scale is 2**-6 * (1 + 0.45 ulp): the nearest fp16 value is smaller."""
    q = qmax(bits)
    s16 = 2.0**-6
    exact = s16 * (1 + 0.45 * 2.0**-10)
    if symmetric:
        hi = q * exact / 2
        lo = -hi / 3
    else:
        lo = -(q // 2 + 0.5 + 1e-3) * s16  # zero point rounds up
        hi = q * exact + lo
    return torch.tensor([[lo, hi, 0.0, 0.0, lo / 2, hi / 2, 0.0, 0.0]], dtype=torch.float64).float()


@pytest.mark.parametrize("symmetric", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_minmax_max_is_within_half_a_scale_when_fp16_rounding_would_shrink_the_scale(bits, symmetric):
    # Regression: rounding the scale to the NEAREST fp16 value made qmax * scale smaller than the range and
    # clipped the maximum by up to 0.62 * scale at 8 bits; the scale must be rounded up.
    groups = _group_whose_scale_rounds_down(bits, symmetric)
    scale, zero = minmax_qparams(groups, bits, symmetric)
    deq = _roundtrip(groups, scale, zero, bits)
    hi = groups.argmax(-1, keepdim=True)
    err = (deq - groups).abs().gather(-1, hi)
    assert bool((err <= scale.unsqueeze(-1) / 2 * (1 + REL)).all()), (err / scale).tolist()


@pytest.mark.parametrize("bits", BITS)
def test_minmax_max_is_within_half_a_scale_when_scale_is_exact(bits):
    q = qmax(bits)
    s = 2.0**-6
    lo = -(q // 2 + 0.5 + 1e-3) * s
    groups = torch.tensor([[lo, q * s + lo, 0.0, 0.1 * lo, 0, 0, 0, 0]])
    scale, zero = minmax_qparams(groups, bits, False)
    assert float(scale) == s
    err = (_roundtrip(groups, scale, zero, bits) - groups).abs()
    assert bool((err <= s / 2 * (1 + REL)).all())


@pytest.mark.parametrize("symmetric", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_all_zero_groups_dequantize_to_exact_zero(bits, symmetric):
    groups = torch.zeros(3, 16)
    scale, zero = minmax_qparams(groups, bits, symmetric)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert torch.equal(scale.half().float(), scale)
    deq = _roundtrip(groups, scale, zero, bits)
    assert torch.equal(deq, groups)
    # Zeros inside a non-zero group are exact too (the range always includes 0).
    mixed = torch.tensor([[0.0, 1.3, -0.2, 0.0, 0.7, 0.0, -0.9, 0.4]])
    s, z = minmax_qparams(mixed, bits, symmetric)
    assert bool((_roundtrip(mixed, s, z, bits)[mixed == 0] == 0).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_constant_groups_with_fp16_exact_range_dequantize_exactly(bits, sign):
    value = sign * qmax(bits) * 2.0**-4  # range / qmax = 2**-4 is an fp16 value
    groups = torch.full((2, 32), value)
    scale, zero = minmax_qparams(groups, bits, symmetric=False)
    assert torch.equal(_roundtrip(groups, scale, zero, bits), groups)


@pytest.mark.parametrize("symmetric", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_dequantize_to_one_value_within_half_a_scale(bits, symmetric):
    values = torch.tensor([1e-4, -3.3, 0.123, 7.0, -1e-3, 42.0])
    groups = values.unsqueeze(-1).expand(-1, 16).contiguous()
    scale, zero = minmax_qparams(groups, bits, symmetric)
    deq = _roundtrip(groups, scale, zero, bits)
    assert bool(torch.isfinite(deq).all())
    assert torch.equal(deq, deq[:, :1].expand_as(deq))
    assert bool(((deq - groups).abs() <= scale.unsqueeze(-1) / 2 * (1 + REL)).all())


@pytest.mark.parametrize("symmetric", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_mse_never_worse_than_minmax(bits, symmetric):
    groups = _random_groups(20 + bits, n=256)
    s0, z0 = minmax_qparams(groups, bits, symmetric)
    s1, z1 = mse_qparams(groups, bits, symmetric)
    assert torch.equal(s1.half().float(), s1) and bool((s1 > 0).all())
    assert torch.equal(z1, z1.round()) and bool((z1 >= 0).all()) and bool((z1 <= qmax(bits)).all())
    if symmetric:
        assert bool((z1 == 2 ** (bits - 1)).all())
    e0 = ((_roundtrip(groups, s0, z0, bits) - groups) ** 2).sum(-1)
    e1 = ((_roundtrip(groups, s1, z1, bits) - groups) ** 2).sum(-1)
    assert bool((e1 <= e0).all())


@pytest.mark.parametrize("symmetric", SYM)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_strictly_better_on_heavy_tailed_groups(bits, symmetric):
    torch.manual_seed(bits)
    groups = torch.distributions.StudentT(2.0).sample((512, 32))
    e0 = ((_roundtrip(groups, *minmax_qparams(groups, bits, symmetric), bits) - groups) ** 2).sum(-1)
    e1 = ((_roundtrip(groups, *mse_qparams(groups, bits, symmetric), bits) - groups) ** 2).sum(-1)
    assert float(e1.mean()) < 0.97 * float(e0.mean())
    assert int((e1 < e0).sum()) > groups.shape[0] // 4


def test_mse_element_weights_focus_the_error():
    torch.manual_seed(0)
    groups = torch.distributions.StudentT(2.0).sample((256, 16))
    weight = torch.zeros(256, 16)
    weight[:, :4] = 1.0  # only the first 4 elements matter
    s_w, z_w = mse_qparams(groups, 3, False, weight=weight)
    s_u, z_u = mse_qparams(groups, 3, False)

    def weighted_err(s, z):
        return (((_roundtrip(groups, s, z, 3) - groups) ** 2) * weight).sum(-1)

    assert bool((weighted_err(s_w, z_w) <= weighted_err(s_u, z_u) * (1 + REL) + 1e-12).all())
    assert float(weighted_err(s_w, z_w).mean()) < float(weighted_err(s_u, z_u).mean())
    # Unit weights are the unweighted search.
    s1, z1 = mse_qparams(groups, 3, False, weight=torch.ones(16))
    assert torch.equal(s1, s_u) and torch.equal(z1, z_u)


@pytest.mark.parametrize(("grid", "max_shrink"), [(0, 0.5), (10, 1.0), (10, -0.1)])
def test_mse_rejects_bad_search(grid, max_shrink):
    with pytest.raises(ValueError, match="mse_qparams"):
        mse_qparams(torch.randn(2, 8), 4, False, grid=grid, max_shrink=max_shrink)


def test_mse_with_no_shrink_is_minmax():
    groups = _random_groups(3, n=64)
    s0, z0 = minmax_qparams(groups, 4, False)
    s1, z1 = mse_qparams(groups, 4, False, grid=1)
    assert torch.equal(s0, s1) and torch.equal(z0, z1)


def test_group_qparams_dispatches_by_name():
    groups = _random_groups(4, n=32)
    for method, fn in (("minmax", minmax_qparams), ("mse", mse_qparams)):
        got, want = group_qparams(groups, 4, False, method), fn(groups, 4, False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="gptq"):
        group_qparams(groups, 4, False, "gptq")


def test_qparams_accept_leading_dimensions_and_half_input():
    groups = _random_groups(5, n=24).reshape(2, 3, 4, 16)
    s, z = minmax_qparams(groups.half(), 4, False)
    assert s.shape == z.shape == (2, 3, 4)
    s_ref, z_ref = minmax_qparams(groups.half().float(), 4, False)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
