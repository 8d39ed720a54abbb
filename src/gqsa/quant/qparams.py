"""Per-group quantization parameters: scale and zero point.

Convention (docs/FORMAT.md): a code q in [0, 2**bits - 1] stands for ``scale * (q - zero_point)``.
Asymmetric groups have their own integer zero point; symmetric groups use the fixed zero point 2**(bits-1).
Scales are rounded to float16 here, before any code is computed, so codes always match the stored scale.
"""

from __future__ import annotations

import torch

from gqsa.quant.levels import qmax, symmetric_zero_point
from gqsa.quant.quantize import dequantize, quantize

__all__ = ["group_qparams", "minmax_qparams", "mse_qparams", "qmax", "range_qparams", "round_scale_fp16",
           "symmetric_zero_point"]

# fp16 range: the smallest positive subnormal and the largest finite value.
_MIN_SCALE = 2.0**-24
_MAX_SCALE = 65504.0


def round_scale_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Clamp to the positive fp16 range and round UP to an fp16 value, returned in float32.

    Rounding up (never down) keeps ``qmax * scale`` at least the range it must cover, so rounding the
    scale to fp16 never clips the group's extreme values by more than half a step.
    """
    s = scale.float().clamp(_MIN_SCALE, _MAX_SCALE)
    s16 = s.to(torch.float16)
    below = s16.float() < s
    # For positive finite fp16 values, the next representable value has the next integer bit pattern.
    bumped = (s16.view(torch.int16) + below.to(torch.int16)).view(torch.float16)
    return bumped.float()


def range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover [lo, hi] (both widened to include 0, so zero is exact).

    Args:
        lo, hi: (...) float range ends per group.
        bits: code width.
        symmetric: fixed zero point 2**(bits-1) and a range symmetric around 0.

    Returns:
        scale (...) float32 holding fp16 values, zero_point (...) float32 holding integers in [0, qmax].
    """
    q = qmax(bits)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        absmax = torch.maximum(-lo, hi)
        scale = round_scale_fp16(2.0 * absmax / q)
        zero = torch.full_like(scale, float(symmetric_zero_point(bits)))
    else:
        scale = round_scale_fp16((hi - lo) / q)
        zero = torch.clamp(torch.round(-lo / scale), 0, q)
    return scale, zero


def minmax_qparams(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from each group's min and max.

    Args:
        groups: (..., g) weights, one group per last-dim row.

    Returns:
        scale (...), zero_point (...), float32 (see ``range_qparams``).
    """
    return range_qparams(groups.amin(dim=-1), groups.amax(dim=-1), bits, symmetric)


def mse_qparams(
    groups: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: int = 80,
    max_shrink: float = 0.8,
    norm: float = 2.0,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point minimising each group's quantization error over shrunken (clipped) ranges.

    Tries the ranges [p * min, p * max] for ``grid`` values of p from 1 down to ``1 - max_shrink`` and keeps,
    per group, the one with the smallest sum of ``weight * |w - fake_quant(w)| ** norm``. p = 1 is min-max, so
    the result is never worse than ``minmax_qparams`` under that error.

    Args:
        groups: (..., g) weights.
        grid: number of shrink factors tried.
        max_shrink: largest fraction of the range removed.
        norm: exponent of the error (2 = squared error).
        weight: optional (..., g) or (g,) non-negative importance of each element (e.g. a Hessian diagonal).

    Returns:
        scale (...), zero_point (...), float32.
    """
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"mse_qparams: need grid >= 1 and 0 <= max_shrink < 1, got {grid}, {max_shrink}")
    g32 = groups.float()
    lo, hi = g32.amin(dim=-1), g32.amax(dim=-1)
    best_scale, best_zero = range_qparams(lo, hi, bits, symmetric)
    best_err = torch.full_like(best_scale, float("inf"))
    for i in range(grid):
        p = 1.0 - max_shrink * i / grid
        scale, zero = range_qparams(p * lo, p * hi, bits, symmetric)
        deq = dequantize(quantize(g32, scale, zero, bits), scale, zero)
        err = (deq - g32).abs().pow(norm)
        if weight is not None:
            err = err * weight
        err = err.sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def group_qparams(
    groups: torch.Tensor, bits: int, symmetric: bool, method: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to ``minmax_qparams`` or ``mse_qparams`` by name."""
    if method == "minmax":
        return minmax_qparams(groups, bits, symmetric)
    if method == "mse":
        return mse_qparams(groups, bits, symmetric)
    raise ValueError(f"unknown qparam method {method!r}; expected 'minmax' or 'mse'")
