"""Native CPU kernels for ``gqsa::linear``: the ``cpu`` (task-centric) and ``cpu-rowsplit`` backends.

The C code is csrc/ (gqsa_cpu.h maps its files), built by setup.py as the optional extension
``gqsa._native_cpu``, imported lazily (first call or availability check), never by ``import gqsa``. Where it
was not built the kernels report themselves unavailable and ``backend="auto"`` falls back to the reference.

Work split over T threads (torch.get_num_threads(), fewer for small matrices: ``MIN_GROUPS_PER_THREAD``):

* ``cpu`` (default): the nnz kept groups cut into T equal ranges whatever the rows; a row cut between two
  threads is summed per thread and the partials added in thread order (deterministic for a given T).
* ``cpu-rowsplit`` (for comparison): rows cut into T equal ranges.
* ``cpu-a8`` (approximate, by name only): task-centric, x quantized to int8 per 16 columns, integer dot
  products for 4-bit weights; its error is the activation quantization's (``gqsa.quant.int8_activations``).

Every kept group is dequantized once per call (``s * (q - z)`` in float32, the reference's weight bit for bit)
and used for all M rows of x. Above ``native_batch_limit`` rows the weight is dequantized densely (natively) and
multiplied by ``torch.matmul``. No module name under ``gqsa`` contains "native"
(``tests/ops/test_ops_lazy_imports.py``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from types import ModuleType

import torch

from gqsa.ops.backends import Kernel, register_kernel
from gqsa.ops.linear import ACTIVATION_DTYPES, check_x
from gqsa.ops.safety import check_kernel_indices

logger = logging.getLogger(__name__)

EXTENSION = "gqsa._native_cpu"
MODE_TASK, MODE_ROWS = 0, 1
# ISA_AUTO: AVX2 where the CPU has it, plus the AVX-512F batch-1 path where the CPU has AVX-512F and the
# environment sets GQSA_CPU_AVX512=1 (opt-in: not yet measured on such a CPU). ISA_AVX2: never AVX-512.
# ISA_AVX512: the AVX-512 path wherever the CPU has it (tests).
ISA_AUTO, ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2, 3
# Above this many rows of x the dense path wins: dense float32 weight (native dequantization) + torch.matmul; see
# native_batch_limit. Large weights (LARGE_WEIGHT) keep the native kernel longer, the dense path's fixed cost
# being the fresh float32 weight. The crossover measurements: docs/RESULTS.md, "Measurements behind code constants".
MAX_NATIVE_BATCH = 96
SMALL_WEIGHT_NATIVE_BATCH = 40
LARGE_WEIGHT = 1 << 24  # weights with at least this many entries (4096 x 4096) use MAX_NATIVE_BATCH
# Fewer kept groups than this per thread: fewer threads (a parallel region costs more than the work it splits).
MIN_GROUPS_PER_THREAD = 2048


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled module, or None when it was not built (imported once, on first use)."""
    try:
        return importlib.import_module(EXTENSION)
    except ImportError as exc:
        logger.info("gqsa: native CPU kernel not available (%s); the reference implementation is used", exc)
        return None


def native_batch_limit(out_features: int, in_features: int) -> int:
    """Most rows of x that the native kernel takes for this weight shape; above, dense dequantization + matmul."""
    return MAX_NATIVE_BATCH if out_features * in_features >= LARGE_WEIGHT else SMALL_WEIGHT_NATIVE_BATCH


def available() -> bool:
    """Whether the native extension imports in this process."""
    return _extension() is not None


def isa() -> str:
    """Instruction set the native kernels use here ("avx512" for the batch-1 path when opted in, "avx2" or
    "scalar"), or "unavailable"."""
    ext = _extension()
    return ext.isa() if ext is not None else "unavailable"


def a8_isa() -> str:
    """Instruction set of ``cpu-a8`` here for 4-bit group-16 weights ("avx512-vnni" where the CPU has AVX-512 VNNI,
    "avx2" or "scalar"), or "unavailable"."""
    ext = _extension()
    return ext.a8_isa() if ext is not None else "unavailable"


def avx512_supported() -> bool:
    """Whether this CPU has what the AVX-512 batch-1 path needs (False without the extension)."""
    ext = _extension()
    return ext is not None and ext.avx512_supported()


def problem_args(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
) -> tuple:
    """Data pointers of the packed tensors, in the extension's argument order (all must be contiguous)."""
    zero_ptr = 0 if zero_point is None else zero_point.data_ptr()
    return (
        crow_indices.data_ptr(),
        col_indices.data_ptr(),
        int(col_indices.dtype == torch.int32),
        values.data_ptr(),
        scale.data_ptr(),
        zero_ptr,
    )


def dequantize_native(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    out_features: int,
    in_features: int,
    group_size: int,
    bits: int,
    isa_: int = ISA_AUTO,
) -> torch.Tensor:
    """Dense (out_features, in_features) float32 weight, equal to ``dequantize_bsr`` (rows split over threads).

    Raises:
        ValueError: indices that break the format's rules (``gqsa.ops.safety``).
    """
    check_kernel_indices(crow_indices, col_indices, in_features, group_size)
    ext = _extension()
    packed = [t.contiguous() for t in (crow_indices, col_indices, values, scale)]
    zero = None if zero_point is None else zero_point.contiguous()
    w = torch.empty(out_features, in_features, dtype=torch.float32)  # (N, K)
    ext.dequantize(0, *problem_args(*packed, zero), w.data_ptr(), 0, out_features, in_features, packed[1].numel(),
                   group_size, bits, torch.get_num_threads(), 0, isa_)
    return w


def dequantize_rows_native(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    rows: torch.Tensor,
    in_features: int,
    group_size: int,
    bits: int,
) -> torch.Tensor:
    """Rows ``rows`` of the dense float32 weight, equal to ``dequantize_bsr(...)[rows]``: one native call per row
    (an embedding lookup; ``PackedWeight.dequantize_rows`` is the torch version). Tensors contiguous, on the CPU.

    Args:
        rows: (R,) row indices in [0, out_features).

    Returns:
        (R, in_features) float32.

    Raises:
        IndexError: a row outside [0, out_features).
        ValueError: indices that break the format's rules (``gqsa.ops.safety``).
    """
    check_kernel_indices(crow_indices, col_indices, in_features, group_size, name="packed embedding")
    n = crow_indices.numel() - 1
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"rows must be in [0, {n}), got [{int(rows.min())}, {int(rows.max())}]")
    ext = _extension()
    problem = problem_args(crow_indices, col_indices, values, scale, zero_point)
    out = torch.empty(rows.numel(), in_features, dtype=torch.float32)  # (R, K)
    nnz, crow, step = col_indices.numel(), problem[0], crow_indices.element_size()
    for i, r in enumerate(rows.tolist()):
        # the row pointers from row r on: a one-row problem whose entries are read at their global positions
        ext.dequantize(0, crow + r * step, *problem[1:], out[i].data_ptr(), 0, 1, in_features, nnz, group_size,
                       bits, 1, 0, ISA_AUTO)
    return out


def native_linear(
    x: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    group_size: int,
    bits: int,
    mode: int = MODE_TASK,
    isa_: int = ISA_AUTO,
    max_native_batch: int | None = None,
    act8: bool = False,
) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with the native kernel; arguments as ``torch.ops.gqsa.linear`` (checked there).

    Args:
        x: (..., in_features) float16/bfloat16/float32 on the CPU; computed in float32.
        mode: MODE_TASK (groups split evenly over threads) or MODE_ROWS (rows split evenly).
        isa_: ISA_AUTO (AVX2 where the CPU has it; AVX-512 at batch 1 when opted in), ISA_SCALAR (the portable
            path), ISA_AVX2 or ISA_AVX512 (for tests).
        max_native_batch: above this many rows of x, dense dequantization + torch.matmul (None:
            ``native_batch_limit`` of the shape).
        act8: quantize x to int8 per 16 columns and use integer dot products (4-bit weights, group a multiple
            of 16, at most ``max_native_batch`` rows; otherwise the exact path). The result is the exact op
            applied to ``gqsa.quant.int8_activations.dequantize_activations(*quantize_activations(x))``.

    Returns:
        (..., out_features) in x's dtype.

    Raises:
        ValueError: indices that break the format's rules (``gqsa.ops.safety``; checked once per index tensors).
    """
    check_kernel_indices(crow_indices, col_indices, in_features, group_size)
    lead = x.shape[:-1]
    packed = [t.contiguous() for t in (crow_indices, col_indices, values, scale)]
    zero = None if zero_point is None else zero_point.contiguous()
    bias32 = None if bias is None else bias.to(torch.float32)
    if max_native_batch is None:
        max_native_batch = native_batch_limit(out_features, in_features)
    if x.numel() // in_features <= max_native_batch:
        return linear_small_batch(x, problem_args(*packed, zero), packed[1].numel(), out_features, in_features,
                                  group_size, bits, mode, isa_, act8, bias32)
    x2 = x.reshape(-1, in_features).to(torch.float32).contiguous()  # (M, K)
    w = dequantize_native(*packed, zero, out_features, in_features, group_size, bits, isa_)  # (N, K)
    y = torch.matmul(x2, w.T)  # (M, N)
    if bias32 is not None:
        y.add_(bias32)
    return y.to(x.dtype).reshape(*lead, out_features)


def linear_small_batch(
    x: torch.Tensor,
    problem: tuple,
    nnz: int,
    out_features: int,
    in_features: int,
    group_size: int,
    bits: int,
    mode: int = MODE_TASK,
    isa_: int = ISA_AUTO,
    act8: bool = False,
    bias32: torch.Tensor | None = None,
) -> torch.Tensor:
    """The native kernel's call itself, for x of at most ``native_batch_limit`` rows (``native_linear`` and the
    bound inference path of ``gqsa.ops.direct`` both end here).

    Args:
        x: (..., in_features) on the CPU, any activation dtype; computed in float32.
        problem: ``problem_args`` of the packed tensors (contiguous); nnz: their number of kept groups.
        mode, isa_, act8: as ``native_linear``; bias32: the (out_features,) bias in float32, or None.

    Returns:
        (..., out_features) in x's dtype.
    """
    m = x.numel() // in_features
    # x (..., K) contiguous is x (M, K) in memory, and y (..., N) is y (M, N): no reshapes needed
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    threads = max(1, min(torch.get_num_threads(), nnz // MIN_GROUPS_PER_THREAD))
    y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)  # (..., N), fully written by the kernel
    ext = _extension()
    kernel = ext.linear_a8 if act8 and bits == 4 and group_size % 16 == 0 else ext.linear
    kernel(xf.data_ptr(), *problem, y.data_ptr(), m, out_features, in_features, nnz, group_size, bits, threads, mode,
           isa_)
    if bias32 is not None:
        y.add_(bias32)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def prepare_native(mode, crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features,
                   group_size, bits, act8: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """A lean closure around the native CPU kernel in ``mode`` (``act8``: int8 activations, as ``cpu-a8``).

    The kernel contract's ``prepare`` of ``cpu``, ``cpu-rowsplit`` and ``cpu-a8`` (gqsa.ops.backends). It ends in the call
    ``native_linear`` ends in (``linear_small_batch``; above ``native_batch_limit``
    rows ``native_linear`` itself), with the pointers and the float32 bias prepared once.
    """
    packed = [t.contiguous() for t in (crow_indices, col_indices, values, scale)]
    zero = None if zero_point is None else zero_point.contiguous()
    problem = problem_args(*packed, zero)
    nnz = packed[1].numel()
    bias32 = None if bias is None else bias.to(torch.float32)
    bias_dtype = None if bias is None else bias.dtype
    cpu_device = values.device
    k = in_features
    limit = native_batch_limit(out_features, in_features)
    weight = (*packed, zero, bias, out_features, in_features, group_size, bits)

    def run(x: torch.Tensor) -> torch.Tensor:
        if (x.shape[-1:] != (k,) or x.dtype not in ACTIVATION_DTYPES or not x.is_cpu
                or (bias_dtype is not None and x.dtype != bias_dtype)):
            check_x(x, k, bias_dtype, cpu_device)
        m = x.numel() // k
        if m > limit or m == 0:
            return native_linear(x, *weight, mode=mode, act8=act8)
        return linear_small_batch(x, problem, nnz, out_features, in_features, group_size, bits, mode,
                                  act8=act8, bias32=bias32)

    return run


def _task_linear(*args) -> torch.Tensor:
    return native_linear(*args, mode=MODE_TASK)


def _rowsplit_linear(*args) -> torch.Tensor:
    return native_linear(*args, mode=MODE_ROWS)


def _a8_linear(*args) -> torch.Tensor:
    return native_linear(*args, mode=MODE_TASK, act8=True)


CPU_KERNEL = Kernel(name="cpu", device_types=frozenset({"cpu"}), fn=_task_linear, available=available, priority=10,
                    prepare=functools.partial(prepare_native, MODE_TASK))
CPU_ROWSPLIT_KERNEL = Kernel(
    name="cpu-rowsplit", device_types=frozenset({"cpu"}), fn=_rowsplit_linear, available=available, priority=5,
    prepare=functools.partial(prepare_native, MODE_ROWS),
)
# int8 activations (approximate: never chosen by "auto"; ask for backend="cpu-a8")
CPU_A8_KERNEL = Kernel(name="cpu-a8", device_types=frozenset({"cpu"}), fn=_a8_linear, available=available,
                       priority=1, exact=False, prepare=functools.partial(prepare_native, MODE_TASK, act8=True))
register_kernel(CPU_KERNEL)
register_kernel(CPU_ROWSPLIT_KERNEL)
register_kernel(CPU_A8_KERNEL)
