"""The native CPU kernels ("cpu", task-centric, and "cpu-rowsplit") against the reference op.

Awkward shapes (N = 37, K = 7 groups), rows with no kept group, 0% and 100% kept, every bits and group size,
symmetric and asymmetric, bias, 16-bit activations, both splits, 1-3 threads, the AVX2 and the scalar path,
and the fallback to the reference when the extension is absent.
"""

import importlib

import pytest
import torch

from problems import awkward_packed

from gqsa.config import MAX_GROUP_SIZE, MIN_GROUP_SIZE
from gqsa.format import PackedWeight, quantize_to_packed
from gqsa.ops import available_backends, packed_linear
from gqsa.ops import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="gqsa._native_cpu is not built (pip install -e . compiles csrc/ with a C compiler and OpenMP)",
)

N = 37  # no tile divides it
GROUPS = 7  # K = group_size * 7
BATCHES = (1, 2, 3, 8, 16, 33)
GROUP_SIZES = [MIN_GROUP_SIZE << i for i in range((MAX_GROUP_SIZE // MIN_GROUP_SIZE).bit_length())]  # 8..256
# fp32: the kernel accumulates in another order than the reference matmul. 16-bit: the reference rounds the
# weight to x's dtype, the kernel keeps it in float32; the output is rounded to x's dtype by both.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.fixture
def threads(monkeypatch):
    """Set torch's thread count inside a test (restored afterwards); tiny matrices use every thread."""
    monkeypatch.setattr(cpu_kernels, "MIN_GROUPS_PER_THREAD", 1)
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _packed(bits: int, group_size: int, symmetric: bool, kept: str = "mixed", n: int = N, seed: int = 0):
    return awkward_packed(bits, group_size, symmetric, kept, n=n, groups=GROUPS, seed=seed)


def _x(m: int, k: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _check(x: torch.Tensor, p: PackedWeight, backend: str, bias: torch.Tensor | None = None) -> None:
    want = packed_linear(x, p, bias, backend="reference")
    got = packed_linear(x, p, bias, backend=backend)
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[x.dtype])


def test_both_kernels_are_registered_and_auto_prefers_the_task_split():
    names = available_backends("cpu")
    assert names.index("cpu") < names.index("cpu-rowsplit")
    assert "cpu" not in available_backends("cuda")
    assert cpu_kernels.isa() in ("avx512", "avx2", "scalar")


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_every_bits_group_size_and_batch(bits, group_size, symmetric):
    p = _packed(bits, group_size, symmetric, seed=bits * 1000 + group_size)
    for m in BATCHES:
        _check(_x(m, p.in_features, seed=m), p, "cpu")


@pytest.mark.parametrize("backend", ["cpu", "cpu-rowsplit"])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_splits_and_thread_counts(threads, backend, num_threads):
    threads(num_threads)
    for bits, group_size in ((4, 16), (3, 8), (2, 64)):
        p = _packed(bits, group_size, symmetric=False, seed=group_size)
        for m in BATCHES:
            _check(_x(m, p.in_features, seed=m), p, backend)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_task_split_is_deterministic_and_matches_the_row_split(threads, num_threads):
    threads(num_threads)
    p = _packed(4, 16, symmetric=False)
    x = _x(5, p.in_features)
    y = packed_linear(x, p, backend="cpu")
    assert torch.equal(y, packed_linear(x, p, backend="cpu"))
    torch.testing.assert_close(y, packed_linear(x, p, backend="cpu-rowsplit"), rtol=1e-6, atol=1e-6)


def test_more_threads_than_kept_groups(threads):
    threads(3)
    mask = torch.zeros(2, GROUPS, dtype=torch.bool)
    mask[1, 3] = True  # one kept group in the whole matrix
    p = quantize_to_packed(torch.randn(2, 8 * GROUPS), mask, 4, 8)
    for backend in ("cpu", "cpu-rowsplit"):
        _check(_x(3, p.in_features), p, backend)


@pytest.mark.parametrize("kept", ["all", "none"])
@pytest.mark.parametrize("backend", ["cpu", "cpu-rowsplit"])
def test_all_and_no_groups_kept(threads, kept, backend):
    threads(2)
    p = _packed(4, 16, symmetric=False, kept=kept)
    assert p.sparsity == (0.0 if kept == "all" else 1.0)
    bias = _x(1, N, seed=7)[0]
    for m in BATCHES:
        _check(_x(m, p.in_features, seed=m), p, backend, bias)
    if kept == "none":  # the bias alone, exactly
        assert torch.equal(packed_linear(_x(4, p.in_features), p, bias, backend=backend), bias.expand(4, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend", ["cpu", "cpu-rowsplit"])
def test_bias_and_activation_dtypes(dtype, has_bias, backend):
    p = _packed(4, 32, symmetric=False)
    bias = _x(1, N, dtype, seed=9)[0] if has_bias else None
    for m in BATCHES:
        _check(_x(m, p.in_features, dtype, seed=m), p, backend, bias)


def test_leading_dimensions_and_non_contiguous_input():
    p = _packed(4, 16, symmetric=True)
    x = _x(2 * 3 * 2, p.in_features).reshape(2, 3, 2, p.in_features)[:, :, 0]  # (2, 3, K), not contiguous
    assert not x.is_contiguous()
    _check(x, p, "cpu")
    _check(_x(1, p.in_features)[0], p, "cpu")  # (K,)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 33])
def test_scalar_fallback_path(bits, m):
    """The portable path (taken on CPUs without AVX2) computes the same thing."""
    p = _packed(bits, 16, symmetric=bits == 3)
    x = _x(m, p.in_features)
    want = packed_linear(x, p, backend="reference")
    tensors = [getattr(p, name) for name in ("crow_indices", "col_indices", "values", "scale", "zero_point")]
    got = cpu_kernels.native_linear(x, *tensors, None, p.out_features, p.in_features, p.group_size, p.bits,
                                    isa_=cpu_kernels.ISA_SCALAR)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("isa", [cpu_kernels.ISA_AVX2, cpu_kernels.ISA_AVX512])
def test_every_instruction_set_computes_the_same(isa, threads):
    """The AVX-512 paths (where the CPU has AVX-512F; ISA_AVX512 takes the batch-1 one whatever GQSA_CPU_AVX512
    says, and the tiles of 2-8 rows of x) and the AVX2 ones, on W4 g16 (the format with these paths): odd and even
    first entries, rows cut between threads, empty rows, symmetric and asymmetric, batch 1, 2, 5 and 9 (a full
    tile of 8 and one row more)."""
    if isa == cpu_kernels.ISA_AVX512 and not cpu_kernels.avx512_supported():
        pytest.skip("this CPU has no AVX-512F")
    for symmetric in (False, True):
        for n_groups in (7, 64):
            p = awkward_packed(4, 16, symmetric, n=37, groups=n_groups, seed=n_groups + symmetric)
            tensors = [getattr(p, name) for name in ("crow_indices", "col_indices", "values", "scale", "zero_point")]
            for t in (1, 2, 3):
                threads(t)
                for mode, m in ((cpu_kernels.MODE_TASK, 1), (cpu_kernels.MODE_ROWS, 1), (cpu_kernels.MODE_TASK, 2),
                                (cpu_kernels.MODE_TASK, 5), (cpu_kernels.MODE_ROWS, 9)):
                    x = _x(m, p.in_features, seed=t)
                    got = cpu_kernels.native_linear(x, *tensors, None, p.out_features, p.in_features, 16, 4,
                                                    mode=mode, isa_=isa)
                    torch.testing.assert_close(got, packed_linear(x, p, backend="reference"), **TOL[torch.float32])


@pytest.mark.parametrize("isa", [cpu_kernels.ISA_AUTO, cpu_kernels.ISA_SCALAR])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dense_dequantization_is_exact(isa, bits):
    """The large-batch path's dense weight is the reference's, bit for bit."""
    p = _packed(bits, 8, symmetric=bits == 2)
    w = cpu_kernels.dequantize_native(*p.tensors_with_none().values(), p.out_features, p.in_features,
                                      p.group_size, p.bits, isa_=isa)
    assert torch.equal(w, p.dequantize())


def test_int32_column_indices():
    """More than 32768 groups per row: col_indices is int32."""
    k = 8 * 32776
    mask = torch.zeros(3, k // 8, dtype=torch.bool)
    mask[0, ::1000] = True
    mask[2, -5:] = True
    p = quantize_to_packed(torch.randn(3, k), mask, 4, 8)
    assert p.col_indices.dtype == torch.int32
    _check(_x(2, k), p, "cpu")


def test_without_the_extension_auto_falls_back_to_the_reference(monkeypatch):
    real_import_module = importlib.import_module

    def failing_import_module(name, package=None):
        if name == cpu_kernels.EXTENSION:
            raise ImportError("simulated: extension not built")
        return real_import_module(name, package)

    monkeypatch.setattr(importlib, "import_module", failing_import_module)
    cpu_kernels._extension.cache_clear()
    try:
        assert not cpu_kernels.available()
        assert "cpu" not in available_backends("cpu") and "cpu-rowsplit" not in available_backends("cpu")
        p = _packed(4, 16, symmetric=False)
        x = _x(3, p.in_features)
        assert torch.equal(packed_linear(x, p), packed_linear(x, p, backend="reference"))
        with pytest.raises(ValueError, match="cannot run"):
            packed_linear(x, p, backend="cpu")
    finally:
        monkeypatch.undo()
        cpu_kernels._extension.cache_clear()
    assert cpu_kernels.available()
