"""The ``triton-a8`` backend: decode on the sliced layout with int8 activations (approximate, by name only).

``prepare_a8`` repacks a packed weight once into gqsa.ops.sliced_layout's layout (on the weight's device) and
returns the function of x that runs on it:

* M <= ``A8_MAX_M`` rows of x: ``quantize_x_kernel`` (x to int8 per 16 inputs, gqsa.quant.int8_activations'
  numbers) then ``sliced_gemv_kernel`` (gqsa.ops.triton_a8_kernels): two launches.
* larger M (prefill) and weights the layout cannot hold (``layout_unsupported``: 3-bit codes, group size 8): the
  exact ``triton`` path (gqsa.ops.gpu), as ``cpu-a8`` falls back to the exact CPU kernel.

Its error is the activation quantization's: the oracle is the reference op applied to
``dequantize_activations(quantize_activations(x))``. Like every approximate kernel it is never picked by
``auto``; on CPU tensors it runs only by name and under the interpreter. It stays named-only on CUDA until a GPU
has measured it faster than the ``triton`` default (``benchmarks/gpu_check.sh``).

The op path (``torch.ops.gqsa.linear(..., backend="triton-a8")``) keeps each weight's layout while its packed
tensors live unchanged (``gqsa.ops.tensor_cache``);
``bind_linear`` and ``PackedLinear`` prepare once through ``Kernel.prepare``. The layout is a second copy of the
weight on the device (12 bytes per kept W4 g16 group) beside the packed buffers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from gqsa.ops.backends import Kernel, register_kernel
from gqsa.ops.gpu import _checked_device, available, interpreting, triton_linear
from gqsa.ops.linear import check_x
from gqsa.ops.tensor_cache import TensorCache
from gqsa.ops.sliced_layout import SlicedLayout, build_sliced_layout, layout_unsupported

KERNELS_MODULE = "gqsa.ops.triton_a8_kernels"
A8_MAX_M = 16  # above: the exact prefill kernel
MAX_BLOCK_S = 128  # slots per step of a program, at most
ELEMENTS_PER_THREAD = 16  # of the (BLOCK_M, rows, BLOCK_S) step tile: no spills at sm_90 (test_ops_triton_a8)
QUANT_BLOCK = 64  # activation groups per program of the quantization kernel
# Rows per slice: 2 up to this many inputs, 1 above (the tuning behind it: docs/RESULTS.md, "Measurements behind
# code constants").
WIDE_INPUT = 8192


def rows_per_slice(in_features: int) -> int:
    """Rows per slice of the layout for a weight with ``in_features`` inputs."""
    return 2 if in_features <= WIDE_INPUT else 1


def launch_config(in_features: int, block_m: int, rows: int) -> tuple[int, int]:
    """(BLOCK_S, num_warps) of the decode kernel: the prototype's best at M = 1 (128 slots; one warp for
    in_features up to 8192, else 4), 4 warps from M = 2, and at most ELEMENTS_PER_THREAD elements of the step tile
    per thread (more spill registers at sm_90)."""
    warps = 1 if in_features <= WIDE_INPUT and block_m == 1 else 4
    budget = ELEMENTS_PER_THREAD * 32 * warps // (block_m * rows)
    block_s = max(16, min(MAX_BLOCK_S, 1 << (budget.bit_length() - 1)))
    return block_s, warps


def _kernels() -> ModuleType:
    """The kernels module, imported (again, if need be) so that it matches ``interpreting()``."""
    module = importlib.import_module(KERNELS_MODULE)
    if module.INTERPRETED != interpreting():
        module = importlib.reload(module)
    return module


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def quantize_x(x2: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) -> (xq (M, K) int8 with each group's bytes permuted for ``bits``-bit codes, xsc (M, K/16, 2)
    float32 (scale, sum of the group's int8 values)): ``gqsa.quant.int8_activations``' numbers."""
    m, k = x2.shape
    groups = k // 16
    xq = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    xsc = torch.empty(m, groups, 2, dtype=torch.float32, device=x2.device)
    _kernels().quantize_x_kernel[(m, -(-groups // QUANT_BLOCK))](
        x2, xq, xsc, groups, x2.stride(0), BITS=bits, BLOCK_A=QUANT_BLOCK, num_warps=4)
    return xq, xsc


def sliced_linear(x2: torch.Tensor, layout: SlicedLayout, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, K) x, M <= A8_MAX_M, contiguous rows -> (M, N) in x's dtype through the two kernels."""
    m, k = x2.shape
    n = layout.out_features
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    if layout.n_slices == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    xq, xsc = quantize_x(x2, layout.bits)
    block_m = _pow2_at_least(m)
    block_s, warps = launch_config(k, block_m, layout.rows_per_slice)
    _kernels().sliced_gemv_kernel[(layout.n_slices,)](
        xq.view(torch.int32), xsc, layout.words, layout.slices, layout.rows, y if bias is None else bias, y,
        m, k // 16, y.stride(0), BITS=layout.bits, GS=layout.group_size, R=layout.rows_per_slice,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_S=block_s, ASM=not interpreting(), num_warps=warps)
    return y


def _run(x: torch.Tensor, layout: SlicedLayout | None, packed: tuple) -> torch.Tensor:
    """x (..., K) -> (..., N): the sliced kernels for M <= A8_MAX_M when there is a layout, else the exact
    ``triton`` path. ``packed``: the op's arguments after x."""
    bias, out_features, in_features = packed[5], packed[6], packed[7]
    check_x(x, in_features, None if bias is None else bias.dtype, packed[2].device)
    _checked_device(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K)
    if layout is None or x2.shape[0] > A8_MAX_M:
        return triton_linear(x, *packed)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return sliced_linear(x2, layout, None if bias is None else bias.contiguous()).reshape(*lead, out_features)


def _layout(packed: tuple) -> SlicedLayout | None:
    crow_indices, col_indices, values, scale, zero_point, _bias, out_features, in_features, group_size, bits = packed
    if layout_unsupported(in_features, group_size, bits):
        return None
    return build_sliced_layout(crow_indices, col_indices, values, scale, zero_point, out_features, in_features,
                               group_size, bits, rows_per_slice(in_features))


def prepare_a8(crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features, group_size,
               bits) -> Callable[[torch.Tensor], torch.Tensor]:
    """``Kernel.prepare`` of ``triton-a8``: the layout built once, and the function of x that runs on it.

    Arguments as ``torch.ops.gqsa.linear`` (already checked). The returned function takes x (..., in_features) on
    the weight's device in the bias's dtype and returns (..., out_features) in x's dtype.
    """
    packed = (crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features, group_size,
              bits)
    layout = _layout(packed)
    return lambda x: _run(x, layout, packed)


# the op path's layouts, one per packed weight while its tensors live unchanged (the bias is not part of one)
_layouts = TensorCache()


def _a8_op(x, *packed) -> torch.Tensor:
    """``fn`` of the kernel (the op path, arguments as the op's): the cached layout of these tensors."""
    _checked_device(x)
    if x.numel() // packed[7] > A8_MAX_M:
        return triton_linear(x, *packed)
    return _run(x, _layouts.get(packed[:5], (), lambda: _layout(packed)), packed)


# Approximate (int8 activations): never "auto"; on CPU tensors only by name under the interpreter.
TRITON_A8_KERNEL = Kernel("triton-a8", frozenset({"cuda", "cpu"}), _a8_op, available, priority=5, exact=False,
                          named_only=frozenset({"cpu"}), prepare=prepare_a8)
register_kernel(TRITON_A8_KERNEL)
