"""The packed group-sparse layout: block-sparse rows of 1 x group_size quantized blocks (docs/FORMAT.md).

A weight W of shape (N, K) = (out_features, in_features) is cut into G = K // group_size groups per row.
Kept groups are stored in block-sparse-row order (row-major, increasing column group within a row):

    crow_indices  int32          (N + 1,)    kept groups of row r are entries crow[r] .. crow[r+1]-1
    col_indices   int16 | int32  (nnz,)      column-group index of each kept group (int16 when G <= 32768)
    values        uint8          (nnz, group_size * bits // 8)   codes of each kept group, bit-packed
    scale         float16        (nnz,)      per kept group
    zero_point    uint8          (ceil(nnz * bits / 8),)          per kept group, bit-packed (asymmetric only)

Element c of kept group (r, j) is ``scale * (code - zero_point)`` at W[r, j * group_size + c]; every pruned
group is exactly zero. Symmetric weights store no zero point: it is 2**(bits - 1).

This module holds the layout's constants, its index rules (``check_indices``, which every kernel relies on) and
``dequantize_bsr``, the definition of the weight every kernel is tested against; ``PackedWeight``
(gqsa.format.packed_weight) holds one weight's tensors.
"""

from __future__ import annotations

import torch

from gqsa.format.bitpack import unpack_bits, unpack_bits_padded
from gqsa.quant.qparams import symmetric_zero_point

FORMAT_VERSION = 1
TENSOR_NAMES = ("crow_indices", "col_indices", "values", "scale", "zero_point")
INT16_MAX_GROUPS = 32768


class FormatError(ValueError):
    """A packed weight violates docs/FORMAT.md; the message names the tensor and the rule."""


def col_indices_dtype(num_groups: int) -> torch.dtype:
    """int16 when every column-group index fits, else int32."""
    return torch.int16 if num_groups <= INT16_MAX_GROUPS else torch.int32


def row_indices(crow_indices: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row of each stored entry: (N + 1,) row pointers -> (nnz,) int64."""
    counts = (crow_indices[1:] - crow_indices[:-1]).long()  # (N,)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow_indices.device), counts, output_size=nnz)


def dequantize_bsr(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    out_features: int,
    in_features: int,
    group_size: int,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense (out_features, in_features) weight from the packed tensors, on their device.

    The arithmetic is float32 ``scale * (code - zero_point)``, cast to ``dtype`` at the end. This is the
    definition every kernel is tested against.
    """
    n, g_count, nnz = out_features, in_features // group_size, col_indices.numel()
    device = values.device
    codes = unpack_bits(values, bits, group_size)  # (nnz, g)
    if zero_point is None:
        zero = torch.full((nnz,), float(symmetric_zero_point(bits)), device=device)
    else:
        zero = unpack_bits_padded(zero_point, bits, nnz).float()  # (nnz,)
    kept = (codes.float() - zero[:, None]) * scale.float()[:, None]  # (nnz, g)
    rows = row_indices(crow_indices, nnz)  # (nnz,)
    dense = torch.zeros(n, g_count, group_size, device=device, dtype=torch.float32)
    dense[rows, col_indices.long()] = kept
    return dense.reshape(n, in_features).to(dtype)


def check_indices(crow_indices: torch.Tensor, col_indices: torch.Tensor, num_groups: int,
                  name: str = "weight") -> None:
    """The index rules of docs/FORMAT.md, which every kernel relies on to stay inside its buffers.

    Rows start at 0, never decrease and end at nnz; column-group indices lie in [0, num_groups) and strictly
    increase within each row (so no row holds more than num_groups entries: the kernels size per-row buffers by
    it). Shapes and dtypes are the caller's to check (``PackedWeight.validate``, ``gqsa::linear``'s checks).

    Args:
        crow_indices: (N + 1,) integer row pointers.
        col_indices: (nnz,) integer column-group indices.
        num_groups: G = in_features // group_size.
        name: what the message calls the weight.

    Raises:
        FormatError: naming ``name``, the tensor and the broken rule.
    """
    nnz = col_indices.numel()
    crow = crow_indices.long()
    if crow.numel() < 1:
        raise FormatError(f"{name}.crow_indices: empty (needs out_features + 1 entries)")
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise FormatError(
            f"{name}.crow_indices: must start at 0, end at nnz={nnz} and never decrease "
            f"(starts {int(crow[0])}, ends {int(crow[-1])})"
        )
    if bool(((crow[1:] - crow[:-1]) > num_groups).any()):
        raise FormatError(f"{name}.crow_indices: a row keeps more than G={num_groups} groups")
    if nnz == 0:
        return
    cols = col_indices.long()
    low, high = int(cols.min()), int(cols.max())
    if low < 0 or high >= num_groups:
        raise FormatError(f"{name}.col_indices: values must be in [0, {num_groups}), found {low if low < 0 else high}")
    if nnz > 1:
        same_row = torch.ones(nnz - 1, dtype=torch.bool, device=cols.device)
        starts = crow[1:-1]
        starts = starts[(starts > 0) & (starts < nnz)]
        same_row[starts - 1] = False  # position i compares entries i and i+1; a row starts at i+1
        if bool(((cols[1:] <= cols[:-1]) & same_row).any()):
            raise FormatError(f"{name}.col_indices: must strictly increase within each row")
