"""Triton kernels for ``gqsa::linear`` on CUDA devices: the ``triton`` (task-centric) and ``triton-rowsplit``
backends. The kernels are in gqsa.ops.triton_kernels, imported lazily (on the first call), never by
``import gqsa``; ``available()`` only looks for the triton package.

* M <= ``DECODE_MAX_M`` rows of x (decoding): ``decode_kernel``, the kept groups cut into P equal ranges
  (``triton``) or the rows into P equal ranges (``triton-rowsplit``, data-centric, for comparison); P is
  ``PROGRAMS_PER_SM`` programs per multiprocessor, at most one per kept group (or row).
* larger M (prefill): ``prefill_kernel``, tiles of dequantized groups into ``tl.dot``, located through a
  (rows, column groups) map of kept-group positions built for the call (``group_positions``: 4 bytes per group
  of the dense matrix, transient);
* from ``PREFILL_DENSE_MIN_M`` rows (long prompts): the dense weight in x's dtype (``dequantize_kernel``, a
  transient out_features x in_features buffer) multiplied by cuBLAS.

With ``TRITON_INTERPRET=1`` in the environment before the first call, the kernels run on CPU tensors through
Triton's interpreter (slow; for tests on small shapes) and both backends also accept the ``cpu`` device type, at
``auto`` never picks them for CPU tensors.

The task-centric decode kernel keeps one int32 arrival counter per output row on each device (zero between calls;
the kernel resets the counters it uses). Calls on one device must therefore not run concurrently on two streams.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from gqsa.ops.backends import Kernel, register_kernel

logger = logging.getLogger(__name__)

KERNELS_MODULE = "gqsa.ops.triton_kernels"
DECODE_MAX_M = 16
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 8  # programs of the decode kernel under the interpreter (no multiprocessors to count)
SEARCH_FAN = 32  # row pointers loaded per step of the decode kernel's search for its first and last row
ROWS_PER_BLOCK = 4  # rows the decode kernel reduces together
DECODE_CODES = 512  # codes per row and step of the decode kernel: BLOCK_G = DECODE_CODES // group_size
PREFILL_BLOCK_N = 64
# From this many rows of x: the dense weight in x's dtype (``dequantize_kernel``, a transient N x K buffer) and
# cuBLAS, which beats the tl.dot prefill kernel used below it at prefill sizes (docs/RESULTS.md, "Measurements
# behind code constants"). The crossover itself is not yet measured; benchmarks/gpu_check.sh's end-to-end step
# times the prefill.
PREFILL_DENSE_MIN_M = 64
DEQUANT_BLOCK_R = 16
DEQUANT_CODES = 1024  # codes per row and program of dequantize_kernel: BLOCK_G = DEQUANT_CODES // group_size
PREFILL_MIN_K = 32  # the prefill kernel's k step (a multiple of group_size) is at least this


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels() -> ModuleType:
    """The kernels module, imported (again, if need be) so that it matches ``interpreting()``: ``triton.jit``
    decides between compiled and interpreted functions when the module is imported."""
    module = importlib.import_module(KERNELS_MODULE)
    if module.INTERPRETED != interpreting():
        module = importlib.reload(module)
    return module


def available() -> bool:
    """Whether the Triton kernels can run here: triton installed, and a CUDA device or the interpreter."""
    return _triton_installed() and (interpreting() or torch.cuda.is_available())


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_programs(device: torch.device) -> int:
    """Programs of the decode kernel on ``device`` before capping by the work: PROGRAMS_PER_SM per multiprocessor."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _multiprocessors(device.index if device.index is not None else
                                                  torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


_counters: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device, rows: int) -> torch.Tensor:
    """At least ``rows`` zeroed int32 counters on ``device``, kept across calls (the kernel leaves them zero)."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < rows:
        buf = torch.zeros(max(rows, 2 * (0 if buf is None else buf.numel())), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def group_positions(crow_indices: torch.Tensor, col_indices: torch.Tensor, out_features: int,
                    num_groups: int) -> torch.Tensor:
    """(out_features, num_groups) int32: the index of kept group (row, column group) in the packed tensors, -1
    where the group is pruned. Built on the weight's device without a host synchronisation."""
    from gqsa.format.packed import row_indices

    nnz = col_indices.numel()
    positions = torch.full((out_features, num_groups), -1, dtype=torch.int32, device=col_indices.device)
    rows = row_indices(crow_indices, nnz)  # (nnz,)
    positions[rows, col_indices.long()] = torch.arange(nnz, dtype=torch.int32, device=col_indices.device)
    return positions


def reads_words(bits: int, group_size: int, values: torch.Tensor) -> bool:
    """Whether the decode kernel reads ``values`` as int32 words: codes never straddle words (2, 4, 8 bits),
    each group fills whole words, and the tensor starts on a 4-byte boundary (a view into a larger buffer may
    not). Fewer, wider loads than one byte per code."""
    return bits in (2, 4, 8) and (group_size * bits) % 32 == 0 and values.data_ptr() % 4 == 0


def triton_linear(
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
    *,
    task: bool = True,
    num_programs: int | None = None,
    decode_max_m: int = DECODE_MAX_M,
) -> torch.Tensor:
    """``gqsa::linear`` through the Triton kernels (arguments as the op's, already checked by it).

    Args:
        task: decode kernel split: equal ranges of kept groups (True) or of rows (False).
        num_programs: programs of the decode kernel (default ``default_programs``), capped at nnz (task) or
            out_features (rows).
        decode_max_m: largest M that takes the decode kernel (at most 16); above, the prefill kernel.

    Returns:
        (..., out_features) in x's dtype.
    """
    if not 1 <= decode_max_m <= DECODE_MAX_M:
        raise ValueError(f"decode_max_m must be in [1, {DECODE_MAX_M}], got {decode_max_m}")
    k = _kernels()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, nnz = x2.shape[0], out_features, col_indices.numel()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # (M, N)
    if m == 0 or nnz == 0:
        y.zero_()
        if bias is not None and m:
            y += bias
        return y.reshape(*lead, n)
    crow, col, values, scale = (t.contiguous() for t in (crow_indices, col_indices, values, scale))
    zero = scale if zero_point is None else zero_point.contiguous()  # any pointer when symmetric
    zero_nbytes = 0 if zero_point is None else zero_point.numel()
    bias_arg = y if bias is None else bias.contiguous()
    common = dict(BITS=bits, GS=group_size, HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None)
    if m >= PREFILL_DENSE_MIN_M and m > decode_max_m:
        weight = dequantize_dense(crow, col, values, scale, zero_point, n, in_features, group_size, bits, x.dtype)
        return torch.nn.functional.linear(x2, weight, bias).reshape(*lead, n)
    if m <= decode_max_m:
        block_m = _pow2_at_least(m)
        programs = max(1, min(num_programs or default_programs(x.device), nnz if task else n))
        partial = torch.empty(programs * 2 * block_m if task else 1, dtype=torch.float32, device=x.device)
        counters = _arrival_counters(x.device, n) if task else partial
        words = reads_words(bits, group_size, values)
        k.decode_kernel[(programs,)](
            x2, y, bias_arg, crow, col, values.view(torch.int32) if words else values, scale, zero, partial,
            counters, m, n, nnz, zero_nbytes, x2.stride(0), y.stride(0), WORDS=words, TASK=task, BLOCK_M=block_m, BLOCK_R=ROWS_PER_BLOCK,
            BLOCK_G=max(1, DECODE_CODES // group_size), FAN=SEARCH_FAN, **common)
    else:
        block_m = 64 if m >= 64 else max(16, _pow2_at_least(m))
        block_n = PREFILL_BLOCK_N
        if x.dtype == torch.float32:  # exact float32 tl.dot holds its tiles in registers: smaller tiles
            block_m, block_n = min(block_m, 32), 32
        grid = (triton_cdiv(m, block_m), triton_cdiv(n, block_n))
        positions = group_positions(crow, col, n, in_features // group_size)
        k.prefill_kernel[grid](
            x2, y, bias_arg, positions, values, scale, zero, m, n, in_features, zero_nbytes, x2.stride(0),
            y.stride(0), GPS=max(1, PREFILL_MIN_K // group_size), BLOCK_M=block_m, BLOCK_N=block_n,
            IEEE=x.dtype == torch.float32, **common)
    return y.reshape(*lead, n)


def dequantize_dense(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                     scale: torch.Tensor, zero_point: torch.Tensor | None, out_features: int, in_features: int,
                     group_size: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(out_features, in_features) weight in ``dtype`` on the packed tensors' device: ``dequantize_bsr`` bit for
    bit, in one Triton kernel over a (rows, column groups) map of kept-group positions (contiguous tensors)."""
    n, g_count = out_features, in_features // group_size
    weight = torch.empty(n, in_features, dtype=dtype, device=values.device)
    positions = group_positions(crow_indices, col_indices, n, g_count)
    block_g = max(1, min(_pow2_at_least(g_count), DEQUANT_CODES // group_size))
    grid = (triton_cdiv(n, DEQUANT_BLOCK_R), triton_cdiv(g_count, block_g))
    zero = scale if zero_point is None else zero_point.contiguous()  # any pointer when symmetric
    _kernels().dequantize_kernel[grid](
        weight, positions, values.contiguous(), scale.contiguous(), zero, n, in_features,
        0 if zero_point is None else zero_point.numel(), BITS=bits, GS=group_size, HAS_ZERO=zero_point is not None,
        BLOCK_R=DEQUANT_BLOCK_R, BLOCK_G=block_g)
    return weight


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _checked_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton backends run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
                         f"got a tensor on {x.device}")


def _task(x: torch.Tensor, *args) -> torch.Tensor:
    _checked_device(x)
    return triton_linear(x, *args, task=True)


def _rows(x: torch.Tensor, *args) -> torch.Tensor:
    _checked_device(x)
    return triton_linear(x, *args, task=False)


# On CPU tensors only by name, and only under the interpreter: "auto" keeps the native CPU kernels there.
TRITON_KERNEL = Kernel("triton", frozenset({"cuda", "cpu"}), _task, available, priority=20,
                       named_only=frozenset({"cpu"}))
TRITON_ROWSPLIT_KERNEL = Kernel("triton-rowsplit", frozenset({"cuda", "cpu"}), _rows, available, priority=10,
                                named_only=frozenset({"cpu"}))
register_kernel(TRITON_KERNEL)
register_kernel(TRITON_ROWSPLIT_KERNEL)
