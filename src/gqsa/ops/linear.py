"""The one registered op: ``torch.ops.gqsa.linear`` computes ``y = x @ W.T (+ bias)`` on the packed format.

Every implementation (reference, native CPU, Triton) sits behind this op; ``backend`` picks one explicitly.
The reference implementation (unpack, dequantize to float32, cast to x's dtype, dense matmul) is the oracle.
"""

from __future__ import annotations

import torch

from gqsa.config import MAX_GROUP_SIZE, MIN_GROUP_SIZE
from gqsa.format.bitpack import PACKABLE_BITS, packed_nbytes
from gqsa.format.packed import PackedWeight, col_indices_dtype, dequantize_bsr
from gqsa.ops.backends import select_kernel
from gqsa.ops.safety import check_kernel_indices

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(
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
) -> None:
    """Shape, dtype and device checks shared by every implementation (and the fake one)."""

    def fail(msg: str):
        raise ValueError(f"gqsa::linear: {msg}")

    if x.dtype not in ACTIVATION_DTYPES:
        fail(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        fail(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features}")
    if bits not in PACKABLE_BITS:
        fail(f"bits must be one of {PACKABLE_BITS}, got {bits}")
    if not MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE or group_size & (group_size - 1) or in_features % group_size:
        fail(
            f"group_size {group_size} must be a power of two from {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE} dividing "
            f"in_features {in_features}"
        )
    if out_features < 1:
        fail(f"out_features must be positive, got {out_features}")
    nnz = col_indices.shape[0] if col_indices.dim() == 1 else -1
    expected = {
        "crow_indices": (crow_indices, (out_features + 1,), torch.int32),
        "col_indices": (col_indices, (nnz,), col_indices_dtype(in_features // group_size)),
        "values": (values, (nnz, group_size * bits // 8), torch.uint8),
        "scale": (scale, (nnz,), torch.float16),
    }
    if zero_point is not None:
        expected["zero_point"] = (zero_point, (packed_nbytes(nnz, bits),), torch.uint8)
    if bias is not None:
        expected["bias"] = (bias, (out_features,), x.dtype)
    for name, (t, shape, dtype) in expected.items():
        if tuple(t.shape) != shape or t.dtype != dtype:
            fail(f"{name} must have shape {shape} and dtype {dtype}, got {tuple(t.shape)} {t.dtype}")
        if t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}")


def check_x(x: torch.Tensor, in_features: int, bias_dtype: torch.dtype | None, device: torch.device) -> None:
    """The op's checks that depend on x (the weight's were done at bind time).

    Raises:
        ValueError: x's last dimension is not in_features, its dtype is not an activation dtype (or not the
            bias's), or it is on another device than the weight.
    """
    def fail(msg: str):
        raise ValueError(f"gqsa::linear: {msg}")

    if x.shape[-1:] != (in_features,):
        fail(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features}")
    if x.dtype not in ACTIVATION_DTYPES:
        fail(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if bias_dtype is not None and x.dtype != bias_dtype:
        fail(f"x is {x.dtype} but the bias is {bias_dtype}; they must match")
    if x.device != device:
        fail(f"x is on {x.device} but the weight is on {device}")


def reference_linear(
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
) -> torch.Tensor:
    """Oracle: dense weight from ``dequantize_bsr`` in x's dtype, then ``torch.nn.functional.linear``."""
    weight = dequantize_bsr(
        crow_indices, col_indices, values, scale, zero_point, out_features, in_features, group_size, bits, x.dtype
    )
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("gqsa::linear", mutates_args=())
def gqsa_linear(
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
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` for a packed weight W (docs/FORMAT.md).

    Args:
        x: (..., in_features) float16/bfloat16/float32, any leading shape.
        crow_indices: (out_features + 1,) int32.
        col_indices: (nnz,) int16 when in_features // group_size <= 32768, else int32.
        values: (nnz, group_size * bits // 8) uint8 packed codes.
        scale: (nnz,) float16.
        zero_point: (ceil(nnz * bits / 8),) uint8 packed zero points, or None (symmetric).
        bias: (out_features,) in x's dtype, or None.
        backend: "auto", "reference" or a registered kernel name (gqsa.ops.available_backends()).

    Returns:
        (..., out_features) in x's dtype.

    Raises:
        ValueError: tensors of the wrong shape, dtype or device, an unknown backend, or indices that break the
            format's rules (checked the first time these index tensors reach a kernel: ``gqsa.ops.safety``).
    """
    args = (x, crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features, group_size, bits)
    _check_args(*args)
    check_kernel_indices(crow_indices, col_indices, in_features, group_size)  # once per index tensors (cached)
    fn = select_kernel(backend, x.device.type, reference_linear)
    return fn(*args)


@gqsa_linear.register_fake
def _(x, crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features, group_size, bits,
      backend="auto"):
    _check_args(x, crow_indices, col_indices, values, scale, zero_point, bias, out_features, in_features,
                group_size, bits)
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, crow, col, values, scale, zero, bias, out_features, in_features, group_size, bits, _backend = inputs
    ctx.save_for_backward(crow, col, values, scale, zero)
    ctx.dims = (out_features, in_features, group_size, bits)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    crow, col, values, scale, zero = ctx.saved_tensors
    weight = dequantize_bsr(crow, col, values, scale, zero, *ctx.dims, dtype=grad_out.dtype)  # (N, K)
    grad_x = grad_out @ weight  # (..., K)
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, grad_bias, None, None, None, None, None


gqsa_linear.register_autograd(_backward, setup_context=_setup_context)


def packed_linear(
    x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """``torch.ops.gqsa.linear`` with the packed tensors taken from a PackedWeight."""
    return torch.ops.gqsa.linear(
        x,
        weight.crow_indices,
        weight.col_indices,
        weight.values,
        weight.scale,
        weight.zero_point,
        bias,
        weight.out_features,
        weight.in_features,
        weight.group_size,
        weight.bits,
        backend,
    )
