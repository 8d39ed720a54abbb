"""The GPU decode kernel's runtime layout: the packed weight repacked once into sorted, sliced rows (SELL).

The checkpoint format (docs/FORMAT.md) stays the interchange format; ``build_sliced_layout`` turns it, on the
weight's device and without a host round trip per group, into what ``gqsa.ops.triton_a8_kernels`` streams:

* **Rows sorted by kept-group count** (longest first, stable) and cut into slices of ``rows_per_slice`` rows
  (the last slice padded with empty rows). A slice's width is its longest row's count rounded up to a multiple of
  ``SLOT_QUANTUM`` slots; shorter rows are padded with empty slots (scale 0, codes 0: they add exactly 0). With
  rows sorted, neighbours differ by little, so the padding is a few percent even when rows are uneven, and the
  longest slices are launched first.
* **One int32 word stream** (``words``): slice after slice, each slice holds ``WPG`` code planes and one meta
  plane, every plane (rows_per_slice, width) row-major: plane p of slice s starts at
  ``offset[s] + p * rows_per_slice * width[s]``; kept group j of the slice's row l is element ``l * width + j``.
  A program reads each plane with 16-byte loads along the slots.
* **Code words**: a kept group's ``group_size * bits / 32`` words, exactly the packed bytes read as
  little-endian int32 (code i of the group is bits ``[i * bits, (i + 1) * bits)`` of its byte stream).
* **Meta word** per kept group: ``column group | zero point << (16 - bits) | fp16 scale bits << 16``: 12 bytes
  per kept W4 g16 group in two aligned streams (the packed format's 12.5 bytes in five).
* ``slices`` (n_slices, 2) int32: word offset and width / ``SLOT_QUANTUM``; ``rows`` (n_slices * rows_per_slice,)
  int32: the output row of each slice row, -1 for padding rows.

Limits: bits 2, 4 or 8 with ``group_size * bits`` a multiple of 32 (whole words per group; ``group_size`` a
multiple of 16), column groups below ``2 ** (16 - bits)`` (W4: in_features up to 65,536 at group size 16), and
fewer than 2**31 words. ``layout_unsupported`` says why a weight does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gqsa.format.bitpack import unpack_bits_padded
from gqsa.quant.int8_activations import ACT_GROUP
from gqsa.quant.qparams import symmetric_zero_point

SLOT_QUANTUM = 4  # slice widths are multiples of this many slots: 16-byte loads of every plane
LAYOUT_BITS = (2, 4, 8)


@dataclass(frozen=True)
class SlicedLayout:
    """A packed weight in the GPU decode kernel's layout (module docstring). All tensors on the weight's device."""

    words: torch.Tensor  # (total_words,) int32: code and meta planes, slice after slice
    slices: torch.Tensor  # (n_slices, 2) int32: word offset, width // SLOT_QUANTUM
    rows: torch.Tensor  # (n_slices * rows_per_slice,) int32: output row, -1 for padding
    rows_per_slice: int
    out_features: int
    in_features: int
    group_size: int
    bits: int

    @property
    def words_per_group(self) -> int:
        return self.group_size * self.bits // 32

    @property
    def n_slices(self) -> int:
        return self.slices.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.slices, self.rows))


def layout_unsupported(in_features: int, group_size: int, bits: int) -> str | None:
    """Why a weight of this shape cannot take the sliced layout, or None when it can."""
    if bits not in LAYOUT_BITS:
        return f"the sliced layout holds {LAYOUT_BITS}-bit codes, not {bits}-bit"
    if group_size % ACT_GROUP or (group_size * bits) % 32:
        return f"the sliced layout needs group sizes that are multiples of {ACT_GROUP}, got {group_size}"
    col_bits = 16 - bits
    if in_features // group_size > 1 << col_bits:
        return (f"the sliced layout's meta word holds {col_bits}-bit column groups: at most {1 << col_bits} "
                f"groups of {group_size} ({(1 << col_bits) * group_size} inputs), got {in_features // group_size}")
    return None


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same 32 bits."""
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def build_sliced_layout(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                        scale: torch.Tensor, zero_point: torch.Tensor | None, out_features: int, in_features: int,
                        group_size: int, bits: int, rows_per_slice: int) -> SlicedLayout:
    """Repack checked packed tensors (``gqsa::linear``'s arguments, indices already validated) once.

    Raises:
        ValueError: a weight the layout cannot hold (``layout_unsupported``), or more than 2**31 words.
    """
    why = layout_unsupported(in_features, group_size, bits)
    if why:
        raise ValueError(why)
    if rows_per_slice < 1:
        raise ValueError(f"rows_per_slice must be positive, got {rows_per_slice}")
    device, n, r = values.device, out_features, rows_per_slice
    nnz, wpg = col_indices.numel(), group_size * bits // 32
    counts = (crow_indices[1:] - crow_indices[:-1]).long()  # (N,)
    order = torch.sort(counts, descending=True, stable=True).indices  # (N,) rows, longest first
    n_slices = -(-n // r)
    padded = n_slices * r
    slice_rows = torch.full((padded,), -1, dtype=torch.int64, device=device)
    slice_rows[:n] = order
    sorted_counts = torch.zeros(padded, dtype=torch.int64, device=device)
    sorted_counts[:n] = counts[order]
    width = sorted_counts.reshape(n_slices, r).amax(dim=1)  # (n_slices,) longest row of each slice
    width = -(-width // SLOT_QUANTUM) * SLOT_QUANTUM
    size = (wpg + 1) * r * width  # (n_slices,) words
    offset = torch.cumsum(size, 0) - size
    total = int(size.sum())  # one host synchronisation per weight, at preparation
    if total >= 1 << 31:
        raise ValueError(f"the sliced layout holds fewer than 2**31 words; this weight needs {total}")

    # where each kept group goes: its row's slice and lane, and its position in the row
    position = torch.empty(n, dtype=torch.int64, device=device)
    position[order] = torch.arange(n, device=device)  # (N,) place of each row in sorted order
    group_row = torch.repeat_interleave(torch.arange(n, device=device), counts, output_size=nnz)  # (nnz,)
    slot = torch.arange(nnz, device=device) - crow_indices.long()[group_row]  # (nnz,) index within the row
    place = position[group_row]
    g_slice, lane = place // r, place % r
    g_width = width[g_slice]
    plane0 = offset[g_slice] + lane * g_width + slot  # (nnz,) element in plane 0
    plane_size = r * g_width  # (nnz,)

    words = torch.zeros(total, dtype=torch.int32, device=device)
    code_bytes = values.reshape(nnz, wpg, 4).to(torch.int64)  # (nnz, WPG, 4) little-endian bytes
    code_words = _as_int32((code_bytes << torch.arange(0, 32, 8, device=device)).sum(-1))  # (nnz, WPG)
    for p in range(wpg):
        words[plane0 + p * plane_size] = code_words[:, p]
    if zero_point is None:
        zero = torch.full((nnz,), symmetric_zero_point(bits), dtype=torch.int64, device=device)
    else:
        zero = unpack_bits_padded(zero_point, bits, nnz).to(torch.int64)
    scale_bits = scale.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    meta = col_indices.to(torch.int64) | (zero << (16 - bits)) | (scale_bits << 16)
    words[plane0 + wpg * plane_size] = _as_int32(meta)

    slices = torch.stack([offset, width // SLOT_QUANTUM], dim=1).to(torch.int32)  # (n_slices, 2)
    return SlicedLayout(words, slices, slice_rows.to(torch.int32), r, out_features, in_features, group_size,
                        bits)


def dense_from_layout(layout: SlicedLayout) -> torch.Tensor:
    """(out_features, in_features) float32 weight read back from the layout: the test oracle that the repack
    loses nothing (``dequantize_bsr`` of the packed tensors must equal it exactly)."""
    r, wpg, bits, gs = layout.rows_per_slice, layout.words_per_group, layout.bits, layout.group_size
    dense = torch.zeros(layout.out_features, layout.in_features // gs, gs, dtype=torch.float32)
    words = layout.words.cpu().to(torch.int64) & 0xFFFFFFFF
    rows = layout.rows.cpu().tolist()
    for s, (offset, quads) in enumerate(layout.slices.cpu().tolist()):
        width = quads * SLOT_QUANTUM
        for lane in range(r):
            row = rows[s * r + lane]
            for j in range(width):
                e = offset + lane * width + j
                meta = int(words[e + wpg * r * width])
                scale = torch.tensor([meta >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16).float()
                if scale.item() == 0.0:
                    continue  # an empty slot (or a kept group whose scale is 0: it adds nothing either way)
                if row < 0:
                    raise AssertionError(f"slice {s} padding row {lane} holds a group")
                col = meta & ((1 << (16 - bits)) - 1)
                zero = (meta >> (16 - bits)) & ((1 << bits) - 1)
                code_words = [int(words[e + p * r * width]) for p in range(wpg)]
                stream = sum(w << (32 * p) for p, w in enumerate(code_words))
                codes = torch.tensor([(stream >> (bits * i)) & ((1 << bits) - 1) for i in range(gs)],
                                     dtype=torch.float32)
                dense[row, col] = (codes - zero) * scale
    return dense.reshape(layout.out_features, layout.in_features)
