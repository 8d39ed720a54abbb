"""The int8-activation kernel ("cpu-a8"): x quantized per 16 columns, integer dot products.

Its oracle is the reference op applied to the dequantized int8 activations (gqsa.quant.int8_activations), which the
kernel must match to float32 summation-order error; the quantization itself is checked bit for bit against the
native one. "auto" never picks it.
"""

import pytest
import torch

from gqsa.format import quantize_to_packed
from gqsa.ops import available_backends, packed_linear
from gqsa.ops import cpu as cpu_kernels
from gqsa.quant.int8_activations import dequantize_activations, quantize_activations

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="gqsa._native_cpu is not built")

N, GROUPS = 37, 7


def _packed(group_size: int, symmetric: bool, bits: int = 4, seed: int = 0, groups: int = GROUPS):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, group_size * groups, generator=gen) * 0.1  # (N, K)
    mask = torch.rand(N, groups, generator=gen) < 0.5
    mask[0] = True
    mask[5] = False
    mask[-1] = False
    return quantize_to_packed(w, mask, bits, group_size, symmetric=symmetric)


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, :16] = 0.0  # an all-zero activation group
    x[-1, 16:32] *= 50.0  # an outlier group
    return x


def _oracle(x, p, bias=None):
    return packed_linear(dequantize_activations(*quantize_activations(x)), p, bias, backend="reference")


def _scale(x, p):
    """|x'| @ |W|^T: the size of the terms summed, for an error bound relative to cancellation."""
    w = packed_linear(torch.eye(p.in_features), p, backend="reference").T.abs()  # (N, K) dense |W|
    return dequantize_activations(*quantize_activations(x)).abs() @ w.T


@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 17])
def test_a8_equals_the_reference_on_quantized_activations(group_size, symmetric, m):
    p = _packed(group_size, symmetric)
    x = _x(m, p.in_features)
    got = packed_linear(x, p, backend="cpu-a8")
    want = _oracle(x, p)
    assert (got - want).abs().max() <= 1e-5 * _scale(x, p).max()
    assert not torch.equal(got, packed_linear(x, p, backend="reference"))  # it did quantize x


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_a8_threads_and_bias(monkeypatch, num_threads):
    monkeypatch.setattr(cpu_kernels, "MIN_GROUPS_PER_THREAD", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        p = _packed(16, False, groups=33)
        bias = torch.randn(N)
        x = _x(2, p.in_features)
        got = packed_linear(x, p, bias, backend="cpu-a8")
        assert (got - _oracle(x, p, bias)).abs().max() <= 1e-5 * _scale(x, p).max()
    finally:
        torch.set_num_threads(before)


def test_scalar_path_matches_the_avx2_path():
    p = _packed(16, False)
    x = _x(3, p.in_features)
    args = (x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, None, p.out_features,
            p.in_features, p.group_size, p.bits)
    avx = cpu_kernels.native_linear(*args, act8=True)
    scalar = cpu_kernels.native_linear(*args, act8=True, isa_=cpu_kernels.ISA_SCALAR)
    assert (avx - scalar).abs().max() <= 1e-5 * _scale(x, p).max()


def test_native_activation_quantization_is_bit_exact():
    x = _x(5, 160)
    x[1, 3] = 0.5 / 127 * 3  # values near rounding ties
    xq, xs = quantize_activations(x)
    got_q, got_s = torch.empty(5, 160, dtype=torch.int8), torch.empty(5, 10)
    cpu_kernels._extension().quantize_x(x.data_ptr(), got_q.data_ptr(), got_s.data_ptr(), 5, 160)
    assert torch.equal(got_q, xq) and torch.equal(got_s, xs)
    assert xq.abs().max() == 127 and torch.all(xs[0, 0] == 0)


def test_other_bits_use_the_exact_kernel_and_auto_never_picks_a8():
    p = _packed(16, False, bits=3)
    x = _x(2, p.in_features)
    assert torch.equal(packed_linear(x, p, backend="cpu-a8"), packed_linear(x, p, backend="cpu"))
    assert "cpu-a8" not in available_backends("cpu") and "cpu-a8" in available_backends("cpu", approximate=True)
    p4 = _packed(16, False)
    x4 = _x(1, p4.in_features)
    assert torch.equal(packed_linear(x4, p4), packed_linear(x4, p4, backend="cpu"))


def test_activation_quantization_error_is_small_against_the_exact_op():
    """What int8 activations cost: relative output error on Gaussian activations (~0.5%)."""
    p = _packed(16, False, groups=64)
    x = torch.randn(4, p.in_features, generator=torch.Generator().manual_seed(3))
    exact = packed_linear(x, p, backend="reference")
    err = (packed_linear(x, p, backend="cpu-a8") - exact).norm() / exact.norm()
    assert 1e-4 < err < 2e-2


vnni = pytest.mark.skipif(cpu_kernels.a8_isa() != "avx512-vnni", reason="this CPU has no AVX-512 VNNI")


def _native_a8(x, p, isa_, **kw):
    return cpu_kernels.native_linear(x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, None,
                                     p.out_features, p.in_features, p.group_size, p.bits, act8=True, isa_=isa_, **kw)


def _ragged_packed(symmetric: bool, groups: int = 40, seed: int = 4):
    """Row r keeps r % (groups + 1) groups (0 .. groups kept, every tail length of the 16-entry blocks), so rows
    start at odd and even entries (the zero-point nibbles' two alignments)."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * (groups + 1)
    w = torch.randn(n, 16 * groups, generator=gen)
    mask = torch.zeros(n, groups, dtype=torch.bool)
    for r in range(n):
        mask[r, torch.randperm(groups, generator=gen)[: r % (groups + 1)]] = True
    return quantize_to_packed(w, mask, 4, 16, symmetric=symmetric)


@vnni
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("threads", [1, 3])
def test_vnni_path_matches_the_oracle_on_ragged_rows(monkeypatch, symmetric, m, threads):
    """The AVX-512 VNNI path (group 16, where the CPU has it) against the oracle: every row length 0..40 (full
    blocks of 16 entries and every tail), rows cut between threads at odd entries, tiles of 4 rows of x and their
    remainders."""
    monkeypatch.setattr(cpu_kernels, "MIN_GROUPS_PER_THREAD", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p = _ragged_packed(symmetric)
        x = _x(m, p.in_features)
        got = _native_a8(x, p, cpu_kernels.ISA_AUTO)
        assert (got - _oracle(x, p)).abs().max() <= 1e-5 * _scale(x, p).max()
        assert torch.all(got[:, 0] == 0) and torch.all(got[:, 41] == 0)  # rows with no kept group
        avx2 = _native_a8(x, p, cpu_kernels.ISA_AVX2)
        assert (got - avx2).abs().max() <= 1e-5 * _scale(x, p).max()
        assert not torch.equal(got, avx2)  # a different kernel ran (other summation order)
    finally:
        torch.set_num_threads(before)


@vnni
def test_vnni_path_large_codes_and_activations_do_not_overflow():
    """Codes 15 against activations +-127 in every column: the int32 lane sums stay exact."""
    k = 16 * 64
    w = torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0).repeat(8, 1) * torch.linspace(0.5, 4.0, 8)[:, None]
    p = quantize_to_packed(w, torch.ones(8, 64, dtype=torch.bool), 4, 16)
    x = torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0)[None] * 3.0
    got = _native_a8(x, p, cpu_kernels.ISA_AUTO)
    assert (got - _oracle(x, p)).abs().max() <= 1e-5 * _scale(x, p).max()
