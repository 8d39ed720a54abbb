"""The ``triton-a8`` backend (int8 activations on the sliced layout) against its oracle, and its layout.

The oracle: the reference op applied to ``dequantize_activations(quantize_activations(x))``; the kernel differs
from it by float32 rounding only, far less than the activation quantization's own error, so a kernel that used
x unquantized (or quantized it otherwise) fails. Without a GPU the kernels run through Triton's interpreter on
small awkward shapes; ``test_decode_kernel_compiles_for_sm90`` compiles them for an H100 with Triton's ptxas and
checks the memory design from the generated code: 128-bit loads of the weight planes, no spills, a register
ceiling. With a GPU the same tests run on CUDA tensors.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from problems import awkward_packed

from gqsa.format import PackedWeight, quantize_to_packed
from gqsa.format.packed import dequantize_bsr
from gqsa.ops import available_backends, gpu, packed_linear
from gqsa.ops import gpu_a8
from gqsa.ops.sliced_layout import SLOT_QUANTUM, build_sliced_layout, dense_from_layout, layout_unsupported
from gqsa.quant.int8_activations import dequantize_activations, quantize_activations

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' installs it)")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N = 37
GROUPS = 7
FORMATS = [(4, 16), (2, 16), (8, 16), (4, 32), (2, 64)]  # (bits, group size) the layout holds
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

if not CUDA and not gpu.interpreting():
    pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before triton was imported (tests/conftest.py sets it)",
                allow_module_level=True)


def _to(p: PackedWeight) -> PackedWeight:
    t = {name: getattr(p, name) for name in ("crow_indices", "col_indices", "values", "scale", "zero_point")}
    return PackedWeight(**{k: None if v is None else v.to(DEVICE) for k, v in t.items()}, out_features=p.out_features,
                        in_features=p.in_features, group_size=p.group_size, bits=p.bits)


def _packed(bits, group_size, symmetric=False, kept="mixed", n=N, groups=GROUPS, seed=0) -> PackedWeight:
    return _to(awkward_packed(bits, group_size, symmetric, kept, n=n, groups=groups, seed=seed))


def _uneven(bits=4, group_size=16, n=41, groups=24, seed=0) -> PackedWeight:
    """Rows keeping 0 .. groups groups (a few long rows, many short), in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    counts = (torch.rand(n, generator=gen) ** 3 * (groups + 1)).long().clamp(max=groups)
    counts[3], counts[7] = groups, 1
    mask = torch.zeros(n, groups, dtype=torch.bool)
    for r, c in enumerate(counts.tolist()):
        mask[r, torch.randperm(groups, generator=gen)[:c]] = True
    w = torch.randn(n, groups * group_size, generator=gen)
    return _to(quantize_to_packed(w, mask, bits, group_size))


def _x(m, k, dtype=torch.float32, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _oracle(x, p, bias=None):
    xd = dequantize_activations(*quantize_activations(x.reshape(-1, p.in_features).float().cpu()))
    return packed_linear(xd.to(x.dtype).to(DEVICE).reshape(x.shape), p, bias, backend="reference")


def _check(x, p, bias=None):
    got = packed_linear(x, p, bias, backend="triton-a8")
    want = _oracle(x, p, bias)
    assert got.dtype == x.dtype and got.shape == want.shape and got.device == x.device
    torch.testing.assert_close(got.float(), want.float(), **TOL[x.dtype])
    return got


def test_registered_approximate_and_by_name_only():
    assert "triton-a8" not in available_backends(DEVICE)  # never "auto", never listed as exact
    assert "triton-a8" in available_backends(DEVICE, approximate=True, named_only=True)


# ---------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("kept", ["mixed", "all", "none"])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_layout_holds_the_weight_exactly(bits, group_size, kept, rows):
    for symmetric in (True, False):
        p = _packed(bits, group_size, symmetric, kept)
        layout = build_sliced_layout(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point,
                                     p.out_features, p.in_features, group_size, bits, rows)
        want = dequantize_bsr(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, p.out_features,
                              p.in_features, group_size, bits).cpu()
        assert torch.equal(dense_from_layout(layout), want)
        assert sorted(r for r in layout.rows.tolist() if r >= 0) == list(range(N))  # every row once


def test_layout_sorts_rows_so_uneven_rows_cost_little_padding():
    p = _uneven(n=200, groups=64)
    counts = (p.crow_indices[1:] - p.crow_indices[:-1]).cpu()
    for rows in (1, 2, 4):
        layout = build_sliced_layout(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point,
                                     p.out_features, p.in_features, 16, 4, rows)
        widths = layout.slices[:, 1].cpu() * SLOT_QUANTUM
        assert torch.all(widths[:-1] >= widths[1:])  # the longest slices first
        slots = int(widths.sum()) * rows
        # sorted: a slice pads only to its rounded longest row; in the original order (no sort) it would be
        # about rows x the longest row of each slice (measured below for comparison)
        unsorted = sum(int(c.max()) for c in counts.split(rows)) * rows
        assert slots <= p.nnz + layout.n_slices * rows * SLOT_QUANTUM + rows * 64
        if rows > 1:
            assert slots < 0.8 * unsorted


def test_layout_refuses_what_it_cannot_hold():
    assert "3-bit" in layout_unsupported(64, 16, 3)
    assert "multiples of 16" in layout_unsupported(64, 8, 4)
    assert "4096 groups" in layout_unsupported(16 * 4097, 16, 4)
    assert layout_unsupported(16 * 4096, 16, 4) is None
    p = _packed(3, 16)
    with pytest.raises(ValueError, match="3-bit"):
        build_sliced_layout(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, p.out_features,
                            p.in_features, 16, 3, 2)


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_quantization_is_the_reference_bit_for_bit(bits):
    x = _x(3, 16 * 70) * torch.tensor([0.0] * 16 + [1.0] * (16 * 69)).to(DEVICE)  # an all-zero group
    x[1, 40] = 1e4
    xq, xsc = gpu_a8.quantize_x(x, bits)
    want_q, want_s = quantize_activations(x.cpu())
    sh = 8 // bits  # byte p holds input (t // sh) * (32 // bits) + j * sh + t % sh, t = p // 4, j = p % 4
    source = [(p // 4) // sh * (32 // bits) + (p % 4) * sh + (p // 4) % sh for p in range(16)]
    assert sorted(source) == list(range(16))
    unpermuted = torch.empty_like(xq.cpu()).reshape(3, 70, 16)
    unpermuted[:, :, source] = xq.cpu().reshape(3, 70, 16)
    assert torch.equal(unpermuted.reshape(3, -1), want_q)
    assert torch.equal(xsc[..., 0].cpu(), want_s)
    assert torch.equal(xsc[..., 1].cpu(), want_q.reshape(3, 70, 16).sum(-1).float())


@pytest.mark.parametrize("bits,group_size", FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_format_against_the_oracle(bits, group_size, symmetric):
    p = _packed(bits, group_size, symmetric)
    for m in (1, 2, 3):
        got = _check(_x(m, p.in_features, seed=m), p)
        exact = packed_linear(_x(m, p.in_features, seed=m), p, backend="reference")
        assert (got - exact).abs().max() > 1e-4  # the int8 activations are really used (the oracle is not exact)


@pytest.mark.parametrize("m", [1, 4, 5, 8, 16])
def test_batches_up_to_the_decode_limit(m):
    _check(_x(m, 16 * GROUPS, seed=m), _packed(4, 16))


@pytest.mark.parametrize("kept", ["all", "none"])
def test_nothing_pruned_and_everything_pruned(kept):
    p = _packed(4, 16, kept=kept)
    bias = torch.randn(N).to(DEVICE)
    got = _check(_x(2, p.in_features), p, bias)
    if kept == "none":
        assert torch.equal(got, bias.expand(2, N))


def test_uneven_rows_one_row_one_group_one_column():
    _check(_x(1, 16 * 24), _uneven())
    one_row = _to(quantize_to_packed(torch.randn(1, 80), torch.tensor([[1, 0, 1, 1, 0]], dtype=torch.bool), 4, 16))
    _check(_x(2, one_row.in_features), one_row)
    one_group = _to(quantize_to_packed(torch.randn(5, 16), torch.ones(5, 1, dtype=torch.bool), 4, 16))
    _check(_x(3, 16), one_group)


def test_rows_longer_than_one_step():
    """Widths above BLOCK_S: a program walks its slice in several steps (above WIDE_INPUT inputs, one row per
    slice)."""
    for groups in (gpu_a8.MAX_BLOCK_S * 2 + 9, gpu_a8.WIDE_INPUT // 16 + 18):
        gen = torch.Generator().manual_seed(groups)
        mask = torch.rand(5, groups, generator=gen) < 0.9
        mask[2] = True
        p = _to(quantize_to_packed(torch.randn(5, groups * 16, generator=gen), mask, 4, 16))
        x = _x(2, p.in_features)
        got, want = packed_linear(x, p, backend="triton-a8"), _oracle(x, p)
        # thousands of terms: float32 rounding grows with the sum of |terms|, not with the (cancelling) result
        w = dequantize_bsr(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, p.out_features,
                           p.in_features, 16, 4)
        magnitude = x.abs() @ w.abs().T  # (2, 5)
        assert torch.all((got - want).abs() <= 1e-6 * magnitude + 1e-6)
        assert (got - packed_linear(x, p, backend="reference")).abs().max() > 1e-3  # quantized activations


def test_16_bit_activations_with_bias_leading_dims_and_a_non_contiguous_x():
    p = _packed(4, 16)
    dtypes = (torch.float16, torch.bfloat16) if CUDA else (torch.float16,)  # no bfloat16 in the interpreter
    for dtype in dtypes:
        bias = torch.randn(N).to(dtype).to(DEVICE)
        _check(_x(1, p.in_features, dtype), p, bias)
    x = _x(2 * 3 * 2, p.in_features).reshape(2, 3, 2 * p.in_features)[..., ::2]
    assert not x.is_contiguous()
    _check(x, p)


def test_beyond_the_decode_limit_and_formats_without_a_layout_take_the_exact_kernel():
    p = _packed(4, 16)
    x = _x(gpu_a8.A8_MAX_M + 1, p.in_features)
    assert torch.equal(packed_linear(x, p, backend="triton-a8"), packed_linear(x, p, backend="triton"))
    for bits, group_size in ((3, 16), (4, 8)):
        q = _packed(bits, group_size)
        x = _x(1, q.in_features)
        assert torch.equal(packed_linear(x, q, backend="triton-a8"), packed_linear(x, q, backend="triton"))


def test_bound_path_and_layer_equal_the_op_and_a_changed_weight_is_repacked():
    from gqsa.nn import PackedLinear
    from gqsa.ops.direct import bind_linear

    p = _packed(4, 16)
    bias = torch.randn(N).to(DEVICE)
    bound = bind_linear(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, bias, p.out_features,
                        p.in_features, p.group_size, p.bits, backend="triton-a8")
    layer = PackedLinear.from_packed(p, bias=bias)
    layer.backend = "triton-a8"
    for m in (1, 3):
        x = _x(m, p.in_features, seed=m)
        want = packed_linear(x, p, bias, backend="triton-a8")
        assert torch.equal(bound(x), want)
        with torch.no_grad():
            assert torch.equal(layer(x), want)
    with pytest.raises(ValueError, match="in_features"):
        bound(_x(1, p.in_features + 16))
    x = _x(1, p.in_features)
    before = packed_linear(x, p, backend="triton-a8")
    p.scale.mul_(2)  # in place: the op's cached layout must be rebuilt
    torch.testing.assert_close(packed_linear(x, p, backend="triton-a8"), 2 * before, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- sm_90
SM90_COMPILE = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gqsa.ops import gpu_a8

case = json.loads(sys.argv[1])
kernel = gpu_a8._kernels().sliced_gemv_kernel
pointers = {"xw_ptr": "*i32", "xsc_ptr": "*fp32", "words_ptr": "*i32", "slices_ptr": "*i32", "rows_ptr": "*i32",
            "bias_ptr": "*fp16", "y_ptr": "*fp16"}
rows = gpu_a8.rows_per_slice(case["in_features"])
block_s, warps = gpu_a8.launch_config(case["in_features"], case["block_m"], rows)
constexprs = dict(BITS=case["bits"], GS=case["group_size"], R=rows, HAS_BIAS=True, BLOCK_M=case["block_m"],
                  BLOCK_S=block_s, ASM=True)
signature = {p.name: "constexpr" if p.name in constexprs else pointers.get(p.name, "i32") for p in kernel.params}
aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if p.name in pointers}
src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
ptx = compiled.asm["ptx"]
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
    f.write(ptx)
arch = re.search(r"\\.target\\s+(sm_\\w+)", ptx).group(1)
report = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
os.unlink(f.name)
weight_loads = re.findall(r"ld\\.global\\.L1::evict_first[\\w:.]*", ptx)
print(json.dumps(dict(report=report.stderr, rc=report.returncode, weight_loads=weight_loads,
                      dp4a=ptx.count("dp4a.u32.s32"), elements=rows * block_s // (32 * warps))))
"""
REGISTER_CEILING = 128  # W4 g16, every batch (measured with triton 3.8: 30-128)


@pytest.mark.parametrize("case", ["w4g16-k4096-m1", "w4g16-k11008-m1", "w4g16-k4096-m2", "w4g16-k4096-m4",
                                  "w4g16-k4096-m16", "w4g16-k11008-m16", "w2g64-k4096-m8", "w8g128-k4096-m16"])
def test_decode_kernel_compiles_for_sm90(case):
    """The memory design, checked from the generated code without a GPU (Triton's own ptxas): the weight planes
    are read with 128-bit loads wherever a thread holds 4 slots, nothing spills, and registers stay under the
    ceiling for W4 g16."""
    ptxas = os.path.join(os.path.dirname(pytest.importorskip("triton").__file__), "backends", "nvidia", "bin",
                         "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    fmt, k, m = case.split("-")
    bits, group_size = map(int, re.match(r"w(\d+)g(\d+)", fmt).groups())
    spec = dict(bits=bits, group_size=group_size, in_features=int(k[1:]), block_m=int(m[1:]))
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SM90_COMPILE, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0, out["report"]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out["report"])
    assert spills and all(s == ("0", "0") for s in spills), out["report"]
    registers = int(re.search(r"Used (\d+) registers", out["report"]).group(1))
    if (bits, group_size) == (4, 16):
        assert registers <= REGISTER_CEILING, out["report"]
    assert out["dp4a"] >= 4  # the integer dot products are there
    assert out["weight_loads"], "no evict-first loads of the weight planes"
    if out["elements"] >= 4:  # each thread holds 4 consecutive slots of a plane: one 16-byte load
        assert all(".v4." in load for load in out["weight_loads"]), out["weight_loads"]
