"""Direct kernel calls bound to one packed weight: the inference fast path beside ``torch.ops.gqsa.linear``.

A call of the registered op pays for the dispatcher, the argument checks and the backend lookup on every call,
more than a small layer's kernel itself (docs/RESULTS.md, "CPU kernel"). :func:`bind_linear` does that work once
for a weight and returns a function of ``x`` alone that calls the same kernel with the same arguments, so its
result is bit for bit the op's.

The op stays the public path and the oracle: ``PackedLinear`` uses a bound function only where no autograd, no
tracing and no tensor subclass is involved (see ``PackedLinear.forward``); everything else calls the op. For
graphs that ``torch.compile`` traces for inference, ``gqsa::linear_direct`` is the same native call as an op whose
checks run once, at trace time (internal; its only caller is ``PackedLinear``).

Binding goes through the kernel contract (``Kernel.prepare``, gqsa.ops.backends): a backend with a layout builds it
here, once. The native CPU kernels' ``prepare`` (gqsa.ops.cpu.prepare_native) computes ``problem_args`` once and
calls ``linear_small_batch``, the function that ``native_linear`` itself ends in, so it stays the same call;
tests/ops/test_ops_direct.py compares the two bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gqsa.ops.backends import resolve_kernel
from gqsa.ops.linear import _check_args, check_x, reference_linear
from gqsa.ops.safety import check_kernel_indices
from gqsa.ops.tensor_cache import tensor_version


class BoundLinear:
    """``x -> gqsa::linear(x, W, bias, backend)`` for one packed weight W, without the op's per-call work.

    ``sources`` are the tensors it was bound to (identity and data pointer are checked by ``is_bound_to``, so
    a layer notices moved or replaced buffers, and so are the version counters of the index tensors, so that
    indices edited in place are checked again before a kernel reads them). Call it with x: (..., in_features)
    on the weight's device, in the bias's dtype when there is a bias; returns (..., out_features) in x's dtype.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], sources: tuple, backend: str,
                 in_features: int, native_mode: int | None = None) -> None:
        self._fn = fn
        self.sources = sources
        self.backend = backend
        self.in_features = in_features
        self.native_mode = native_mode  # the native CPU kernel's split mode, None for any other backend
        self._ptrs = tuple(0 if t is None else t.data_ptr() for t in sources)
        self._index_versions = tuple(tensor_version(t) for t in sources[:2])

    def is_bound_to(self, sources: tuple, backend: str) -> bool:
        """Whether this function still computes with exactly these tensors, unchanged indices and this backend."""
        if backend != self.backend:
            return False
        for mine, theirs, ptr in zip(self.sources, sources, self._ptrs):
            if mine is not theirs or (theirs is not None and theirs.data_ptr() != ptr):
                return False
        return tuple(tensor_version(t) for t in sources[:2]) == self._index_versions

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


def bind_linear(
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
    backend: str = "auto",
) -> BoundLinear:
    """Bind ``gqsa::linear`` to one packed weight (arguments as ``torch.ops.gqsa.linear``, checked here once).

    Args:
        crow_indices, col_indices, values, scale, zero_point, bias: the packed tensors (docs/FORMAT.md) and the
            optional (out_features,) bias, all on one device.
        out_features, in_features, group_size, bits: the weight's dimensions and code width.
        backend: "auto", "reference" or a registered kernel name, resolved now for the tensors' device.

    Returns:
        A BoundLinear; calling it gives what the op gives for the same x.

    Raises:
        ValueError: invalid tensors (indices that break the format's rules included), or a backend that is unknown
            or cannot run on this device.
    """
    dtype = bias.dtype if bias is not None else torch.float32
    probe = torch.empty(1, in_features, dtype=dtype, device=values.device)
    weight = (crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features, group_size,
              bits)
    _check_args(probe, *weight)
    check_kernel_indices(crow_indices, col_indices, in_features, group_size)
    kernel = resolve_kernel(backend, values.device.type)
    sources = (crow_indices, col_indices, values, scale, zero_point, bias)
    mode = None if kernel is None else _native_mode(kernel.fn, values.device)
    if kernel is not None and kernel.prepare is not None:
        bound = kernel.prepare(*weight)  # the backend's layout, built once; checks x itself
    else:
        fn = reference_linear if kernel is None else kernel.fn
        bias_dtype = None if bias is None else bias.dtype

        def bound(x: torch.Tensor) -> torch.Tensor:
            check_x(x, in_features, bias_dtype, values.device)
            return fn(x, *weight)
    return BoundLinear(bound, sources, backend, in_features, mode)


def _native_mode(fn, device: torch.device) -> int | None:
    """The native CPU kernel's mode when ``fn`` is one of its backends and the weight is on the CPU, else None."""
    from gqsa.ops import cpu

    if device.type != "cpu":
        return None
    return {cpu.CPU_KERNEL.fn: cpu.MODE_TASK, cpu.CPU_ROWSPLIT_KERNEL.fn: cpu.MODE_ROWS}.get(fn)


@torch.library.custom_op("gqsa::linear_direct", mutates_args=())
def linear_direct(
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
    mode: int,
) -> torch.Tensor:
    """Internal: ``gqsa::linear`` on the native CPU kernel in ``mode``, without per-call checks or backend lookup.

    For graphs compiled for inference (``PackedLinear`` under ``torch.compile`` once it has been bound to a native
    backend): the checks run once, when the graph is traced, in the fake implementation. Arguments as
    ``torch.ops.gqsa.linear`` (all on the CPU, packed tensors contiguous); no autograd. Not a public entry point.
    """
    from gqsa.ops import cpu

    check_kernel_indices(crow_indices, col_indices, in_features, group_size)  # one lookup once checked
    packed = (crow_indices, col_indices, values, scale)
    m = x.numel() // in_features
    if (m > cpu.native_batch_limit(out_features, in_features) or m == 0
            or not all(t.is_contiguous() for t in packed)):
        return cpu.native_linear(x, *packed, zero_point, bias, out_features, in_features, group_size, bits,
                                 mode=mode)
    return cpu.linear_small_batch(x, cpu.problem_args(*packed, zero_point), col_indices.numel(), out_features,
                                  in_features, group_size, bits, mode, bias32=None if bias is None
                                  else bias.to(torch.float32))


@linear_direct.register_fake
def _(x, crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features, group_size, bits,
      mode):
    _check_args(x, crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features,
                group_size, bits)
    return x.new_empty((*x.shape[:-1], out_features))
