"""The Triton kernels ("triton", task-centric, and "triton-rowsplit") against the reference op.

Without a GPU they run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``), on small shapes:
every bits and group size, symmetric and asymmetric, the decode kernel (M <= 16) and the prefill kernel, rows
with no kept group, 0% and 100% kept, rows shared by many programs (the partial sums and arrival counters),
16-bit activations with bias, and the errors. ``test_kernels_compile_for_sm90`` compiles them for an H100
(sm_90) with Triton's own ptxas, which needs no GPU: it catches what the interpreter does not check (types,
``tl.dot`` shapes). With a GPU the same tests run on CUDA tensors.
"""

import os
import re

import pytest
import torch
from problems import awkward_packed

from gqsa.config import MAX_GROUP_SIZE, MIN_GROUP_SIZE
from gqsa.format import PackedWeight, quantize_to_packed
from gqsa.ops import available_backends, packed_linear
from gqsa.ops import gpu

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' installs it)")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N = 37  # no tile divides it
GROUPS = 7
GROUP_SIZES = [MIN_GROUP_SIZE << i for i in range((MAX_GROUP_SIZE // MIN_GROUP_SIZE).bit_length())]  # 8..256
BACKENDS = ("triton", "triton-rowsplit")
# fp32: another accumulation order than the reference's matmul. 16-bit: both round the weight to x's dtype and
# the output; the kernels accumulate in float32, the reference in its own way.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


if not CUDA and not gpu.interpreting():
    pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before triton was imported (tests/conftest.py sets it)",
                allow_module_level=True)


def _packed(bits: int, group_size: int, symmetric: bool, kept: str = "mixed", seed: int = 0) -> PackedWeight:
    return _to(awkward_packed(bits, group_size, symmetric, kept, n=N, groups=GROUPS, seed=seed))


def _to(p: PackedWeight) -> PackedWeight:
    t = {name: getattr(p, name) for name in ("crow_indices", "col_indices", "values", "scale", "zero_point")}
    return PackedWeight(**{k: None if v is None else v.to(DEVICE) for k, v in t.items()}, out_features=p.out_features,
                        in_features=p.in_features, group_size=p.group_size, bits=p.bits)


def _x(m: int, k: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _check(x: torch.Tensor, p: PackedWeight, backend: str, bias: torch.Tensor | None = None, **kw) -> torch.Tensor:
    want = packed_linear(x, p, bias, backend="reference")
    if kw:
        got = gpu.triton_linear(x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, bias,
                                p.out_features, p.in_features, p.group_size, p.bits, **kw)
    else:
        got = packed_linear(x, p, bias, backend=backend)
    assert got.dtype == x.dtype and got.shape == want.shape and got.device == x.device
    torch.testing.assert_close(got.float(), want.float(), **TOL[x.dtype])
    return got


def test_registered_for_cuda_and_only_by_name_on_cpu():
    if CUDA:
        names = available_backends("cuda")
    else:  # "auto" keeps the native CPU kernels (or the reference) for CPU tensors, and lists skip them
        from gqsa.ops.backends import select_kernel
        from gqsa.ops.linear import reference_linear

        assert select_kernel("auto", "cpu", reference_linear) is not gpu.TRITON_KERNEL.fn
        assert "triton" not in available_backends("cpu", approximate=True)
        names = available_backends("cpu", named_only=True)
    assert names.index("triton") < names.index("triton-rowsplit")


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_bits_and_group_size(bits, group_size):
    for symmetric in (False, True):
        p = _packed(bits, group_size, symmetric, seed=bits * 1000 + group_size + symmetric)
        for m in (1, 3, 20):  # decode (M <= 16) and prefill
            x = _x(m, p.in_features, seed=m)
            _check(x, p, "triton")
        _check(_x(2, p.in_features), p, "triton-rowsplit")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_batch_up_to_the_decode_limit_and_beyond(backend):
    p = _packed(4, 16, False)
    for m in (1, 2, 5, 8, 16, 17, 33, 70):
        _check(_x(m, p.in_features, seed=m), p, backend)


@pytest.mark.parametrize("kept", ["all", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_pruned_and_everything_pruned(backend, kept):
    p = _packed(3, 16, False, kept=kept)
    bias = torch.randn(N).to(DEVICE)
    for m in (1, 4, 24):
        _check(_x(m, p.in_features), p, backend, bias)


@pytest.mark.parametrize("programs", [1, 2, 3, 5, 8, 13, 10_000])
def test_rows_shared_by_many_programs(programs):
    """Row 2 keeps every group of a wide matrix and the others keep one or none, so the equal ranges of kept
    groups cut row 2 into many pieces (one program may hold part of it only) and land on empty rows."""
    gen = torch.Generator().manual_seed(3)
    groups = 40
    mask = torch.zeros(9, groups, dtype=torch.bool)  # (N, G)
    mask[2] = True
    mask[4, 7] = True
    mask[7, 0] = True  # rows 0, 1, 3, 5, 6, 8 keep nothing
    p = _to(quantize_to_packed(torch.randn(9, 8 * groups, generator=gen), mask, 4, 8))
    bias = torch.randn(9).to(DEVICE)
    for m in (1, 3, 16):
        x = _x(m, p.in_features, seed=m)
        got = _check(x, p, "triton", bias, num_programs=programs)
        again = gpu.triton_linear(x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, bias,
                                  p.out_features, p.in_features, p.group_size, p.bits, num_programs=programs)
        assert torch.equal(got, again)  # deterministic: the shared rows are summed in program order
    assert int(gpu._counters[x.device].count_nonzero()) == 0  # every counter was reset by its last program


def test_uneven_rows_every_program_count():
    """Rows keeping 0..G groups in a shuffled order, from 1 program to more programs than kept groups."""
    gen = torch.Generator().manual_seed(4)
    groups = 6
    counts = torch.arange(groups + 1).repeat(2)[torch.randperm(2 * (groups + 1), generator=gen)]  # (N,)
    mask = torch.arange(groups)[None, :] < counts[:, None]  # (N, G)
    p = _to(quantize_to_packed(torch.randn(len(counts), 16 * groups, generator=gen), mask, 2, 16))
    x = _x(2, p.in_features)
    for programs in (1, 2, 3, 4, 6, 7, 11, 19, p.nnz - 1, p.nnz + 2):
        _check(x, p, "triton", num_programs=programs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_activations_with_bias(backend, dtype):
    p = _packed(4, 32, False)
    bias = torch.randn(N).to(dtype).to(DEVICE)
    # Triton's interpreter gets bfloat16 tl.dot wrong (numpy has no bfloat16): the prefill kernel is checked in
    # bfloat16 on a GPU only, and compiled for sm_90 by test_kernels_compile_for_sm90.
    batches = (1, 7) if dtype == torch.bfloat16 and not CUDA else (1, 7, 40)
    for m in batches:
        _check(_x(m, p.in_features, dtype), p, backend, bias)


def test_leading_dimensions_and_a_non_contiguous_x():
    p = _packed(4, 16, True)
    x = _x(6, 2 * p.in_features)[:, ::2].reshape(2, 3, p.in_features)  # (2, 3, K), every other column
    assert not x.is_contiguous()
    _check(x, p, "triton")
    _check(_x(0, p.in_features), p, "triton")  # no rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_long_prompts_dequantize_exactly_then_multiply_densely(bits):
    """From PREFILL_DENSE_MIN_M rows: the dense weight is dequantize_bsr's bit for bit, and the product is the
    reference's (the same weight through the same matmul on CPU tensors)."""
    from gqsa.format.packed import dequantize_bsr

    for group_size in GROUP_SIZES:
        for symmetric in (False, True):
            p = _packed(bits, group_size, symmetric, seed=bits + group_size)
            for dtype in (torch.float32, torch.float16):
                got = gpu.dequantize_dense(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point,
                                           p.out_features, p.in_features, group_size, bits, dtype)
                want = dequantize_bsr(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point,
                                      p.out_features, p.in_features, group_size, bits, dtype)
                assert torch.equal(got, want), (group_size, symmetric, dtype)
    p = _packed(bits, 16, False)
    bias = torch.randn(N).to(DEVICE)
    for m in (gpu.PREFILL_DENSE_MIN_M, gpu.PREFILL_DENSE_MIN_M + 7):
        got = _check(_x(m, p.in_features, seed=m), p, "triton", bias)
        if not CUDA:
            assert torch.equal(got, packed_linear(_x(m, p.in_features, seed=m), p, bias, backend="reference"))


def test_decode_limit_is_checked():
    p = _packed(4, 16, True)
    with pytest.raises(ValueError, match="decode_max_m"):
        _check(_x(1, p.in_features), p, "triton", decode_max_m=17)
    _check(_x(4, p.in_features), p, "triton", decode_max_m=2)  # M = 4 through the prefill kernel


@pytest.mark.skipif(not CUDA, reason="full-size shapes need a GPU (the interpreter takes minutes per call)")
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_llama_7b_shapes_on_the_gpu(shape, bits):
    """Llama-2-7B's linear shapes at 50% of groups pruned, fp16, decode and prefill batches, both splits; rows
    keeping very different numbers of groups; the same result twice."""
    n, k = shape
    gen = torch.Generator().manual_seed(5)
    keep = torch.rand(n, k // 16, generator=gen) < torch.linspace(0.05, 0.95, n)[:, None]  # uneven rows, ~50%
    p = _to(quantize_to_packed(torch.randn(n, k, generator=gen) * 0.02, keep, bits, 16))
    for m in (1, 4, 16, 64):
        x = _x(m, k, torch.float16, seed=m)
        for backend in BACKENDS:
            got = _check(x, p, backend)
            assert torch.equal(got, packed_linear(x, p, backend=backend))


@pytest.mark.skipif(CUDA, reason="CPU tensors only")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = _packed(4, 16, True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        gpu.TRITON_KERNEL.fn(_x(1, p.in_features), p.crow_indices, p.col_indices, p.values, p.scale,
                             p.zero_point, None, p.out_features, p.in_features, p.group_size, p.bits)


SM90_COMPILE = """
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gqsa.ops import gpu

k = gpu._kernels()
case = json.loads(sys.argv[1])
kernel = getattr(k, case["kernel"])
signature = {p.name: "constexpr" if p.name in case["constexprs"] else case["pointers"].get(p.name, "i32")
             for p in kernel.params}
# as the launcher specialises them at run time: 16-byte aligned pointers, strides that are multiples of 16
aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
           if p.name in case["pointers"] or p.name.startswith("stride")}
src = ASTSource(fn=kernel, signature=signature, constexprs=case["constexprs"], attrs=aligned)
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=case["options"])
print(len(compiled.asm["cubin"]))
"""


@pytest.mark.parametrize("case", ["decode-w4g16-m1", "decode-w3g8-m16-rows", "prefill-fp16-w4g16",
                                  "prefill-bf16-w3g8-bias", "dequantize-bf16-w4g16", "dequantize-fp16-w3g32"])
def test_kernels_compile_for_sm90(case):
    """Triton's own ptxas compiles for an H100 without a GPU, in a process without the interpreter."""
    import json
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(pytest.importorskip("triton").__file__), "backends", "nvidia", "bin",
                         "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    xdt = "bf16" if "bf16" in case else "fp16"
    bits, gs = map(int, re.search(r"w(\d+)g(\d+)", case).groups())
    pointers = {"x_ptr": f"*{xdt}", "y_ptr": f"*{xdt}", "bias_ptr": f"*{xdt}", "crow_ptr": "*i32",
                "col_ptr": "*i16", "values_ptr": "*i32" if bits in (2, 4, 8) and case.startswith("decode") else "*u8",
                "scale_ptr": "*fp16", "zero_ptr": "*u8", "partial_ptr": "*fp32", "counter_ptr": "*i32",
                "position_ptr": "*i32", "w_ptr": f"*{xdt}"}
    common = dict(BITS=bits, GS=gs, HAS_ZERO=True, HAS_BIAS="bias" in case)
    if case.startswith("decode"):
        spec = dict(kernel="decode_kernel", options={"num_warps": 4}, constexprs=dict(
            common, WORDS=bits in (2, 4, 8), TASK="rows" not in case, BLOCK_M=16 if "m16" in case else 1,
            BLOCK_R=gpu.ROWS_PER_BLOCK, BLOCK_G=gpu.DECODE_CODES // gs, FAN=gpu.SEARCH_FAN))
    elif case.startswith("dequantize"):
        spec = dict(kernel="dequantize_kernel", options={"num_warps": 4}, constexprs=dict(
            BITS=bits, GS=gs, HAS_ZERO=True, BLOCK_R=gpu.DEQUANT_BLOCK_R, BLOCK_G=gpu.DEQUANT_CODES // gs))
    else:
        spec = dict(kernel="prefill_kernel", options={"num_warps": 4, "num_stages": 2}, constexprs=dict(
            common, GPS=max(1, gpu.PREFILL_MIN_K // gs), BLOCK_M=64, BLOCK_N=gpu.PREFILL_BLOCK_N, IEEE=False))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SM90_COMPILE, json.dumps(dict(spec, pointers=pointers))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 1000  # bytes of cubin


@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_call_and_a_packed_layer_use_the_kernel(backend):
    """The inference fast path (gqsa.ops.direct, as PackedLinear calls it) gives the op's result bit for bit."""
    from gqsa.nn import PackedLinear
    from gqsa.ops.direct import bind_linear

    p = _packed(4, 16, False)
    bias = torch.randn(N).to(DEVICE)
    bound = bind_linear(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, bias, p.out_features,
                        p.in_features, p.group_size, p.bits, backend=backend)
    layer = PackedLinear.from_packed(p, bias=bias)
    layer.backend = backend
    for m in (1, 3, 20):
        x = _x(m, p.in_features, seed=m)
        want = packed_linear(x, p, bias, backend=backend)
        assert torch.equal(bound(x), want)
        with torch.no_grad():
            assert torch.equal(layer(x), want)
