"""``PackedWeight``: one weight matrix in the packed layout (gqsa.format.layout, docs/FORMAT.md) and its metadata.

``PackedWeight.pack`` / ``unpack`` convert exactly between the packed tensors and per-group codes, scales, zero
points and mask (``UnpackedWeight``); ``validate`` checks every rule of docs/FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from gqsa.format.bitpack import pack_bits, pack_bits_padded, packed_nbytes, unpack_bits, unpack_bits_padded
from gqsa.format.layout import TENSOR_NAMES, FormatError, check_indices, col_indices_dtype, dequantize_bsr, row_indices
from gqsa.quant.qparams import qmax, symmetric_zero_point


class UnpackedWeight(NamedTuple):
    """Dense per-group view of a packed weight (pruned groups hold zeros).

    codes: (N, G, group_size) uint8; scale: (N, G) float16; zero_point: (N, G) uint8 or None (symmetric);
    mask: (N, G) bool, True where the group is kept.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    mask: torch.Tensor


@dataclass
class PackedWeight:
    """One packed weight matrix and the metadata needed to read it (layout: gqsa.format.layout)."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    out_features: int
    in_features: int
    group_size: int
    bits: int

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def num_groups(self) -> int:
        """Groups per row, G = in_features // group_size."""
        return self.in_features // self.group_size

    @property
    def nnz(self) -> int:
        """Number of kept groups."""
        return int(self.col_indices.numel())

    @property
    def sparsity(self) -> float:
        """Fraction of groups pruned."""
        total = self.out_features * self.num_groups
        return 1.0 - self.nnz / total if total else 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (no ``zero_point`` when symmetric)."""
        out = {name: getattr(self, name) for name in TENSOR_NAMES}
        if out["zero_point"] is None:
            del out["zero_point"]
        return out

    def nbytes(self) -> int:
        """Bytes of every stored tensor, metadata included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        """Stored bits per weight of the dense matrix, counting indices, scales and zero points."""
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def metadata(self) -> dict:
        """JSON-serialisable description (what a loader needs to build empty buffers of the right shapes)."""
        return {
            "out_features": self.out_features,
            "in_features": self.in_features,
            "group_size": self.group_size,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "nnz": self.nnz,
        }

    def to(self, device: torch.device | str) -> PackedWeight:
        moved = {name: None if t is None else t.to(device) for name, t in self.tensors_with_none().items()}
        return PackedWeight(**moved, **_dims(self))

    # ---- pack / unpack -------------------------------------------------------------------------------
    @classmethod
    def pack(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        mask: torch.Tensor,
        bits: int,
    ) -> PackedWeight:
        """Pack per-group codes and quantization parameters of the kept groups.

        Args:
            codes: (N, G, group_size) uint8 codes in [0, 2**bits - 1] (values of pruned groups are ignored).
            scale: (N, G) float, positive and representable in fp16 for kept groups (stored as fp16).
            zero_point: (N, G) integer-valued zero points in [0, 2**bits - 1], or None for symmetric.
            mask: (N, G) bool, True where the group is kept.
            bits: code width.

        Returns:
            The PackedWeight; ``unpack`` gives back exactly the kept codes, scales and zero points.
        """
        if codes.dim() != 3:
            raise FormatError(f"codes must be (N, G, group_size), got shape {tuple(codes.shape)}")
        if codes.dtype != torch.uint8:
            raise FormatError(f"codes must be uint8, got {codes.dtype}")
        n, g_count, group_size = codes.shape
        if mask.shape != (n, g_count) or scale.shape != (n, g_count):
            raise FormatError(
                f"mask {tuple(mask.shape)} and scale {tuple(scale.shape)} must both be (N, G) = {(n, g_count)}"
            )
        mask = mask.to(torch.bool)
        counts = mask.sum(dim=1)  # (N,)
        crow = torch.zeros(n + 1, dtype=torch.int32, device=codes.device)
        crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major, increasing column within a row
        kept_scale = scale[rows, cols].float()
        if not torch.isfinite(kept_scale).all() or (kept_scale <= 0).any():
            raise FormatError("scale: kept groups need finite positive scales")
        fp16_scale = kept_scale.to(torch.float16)
        if not torch.equal(fp16_scale.float(), kept_scale):
            raise FormatError("scale: values are not representable in float16; round them first (round_scale_fp16)")
        if zero_point is None:
            packed_zero = None
        else:
            if zero_point.shape != (n, g_count):
                raise FormatError(f"zero_point must be (N, G) = {(n, g_count)}, got {tuple(zero_point.shape)}")
            z = zero_point[rows, cols].float()
            if not torch.equal(z, z.round()) or (z < 0).any() or (z > qmax(bits)).any():
                raise FormatError(f"zero_point: kept groups need integers in [0, {qmax(bits)}]")
            packed_zero = pack_bits_padded(z.to(torch.uint8), bits)
        return cls(
            crow_indices=crow,
            col_indices=cols.to(col_indices_dtype(g_count)),
            values=pack_bits(codes[rows, cols], bits),  # (nnz, g * bits / 8)
            scale=fp16_scale,
            zero_point=packed_zero,
            out_features=n,
            in_features=g_count * group_size,
            group_size=group_size,
            bits=bits,
        )

    def unpack(self) -> UnpackedWeight:
        """Per-group codes, scales, zero points and mask; exact inverse of ``pack`` on kept groups."""
        n, g_count, device = self.out_features, self.num_groups, self.values.device
        rows = row_indices(self.crow_indices, self.nnz)  # (nnz,)
        cols = self.col_indices.long()
        codes = torch.zeros(n, g_count, self.group_size, dtype=torch.uint8, device=device)
        codes[rows, cols] = unpack_bits(self.values, self.bits, self.group_size)
        scale = torch.zeros(n, g_count, dtype=torch.float16, device=device)
        scale[rows, cols] = self.scale
        mask = torch.zeros(n, g_count, dtype=torch.bool, device=device)
        mask[rows, cols] = True
        zero = None
        if self.zero_point is not None:
            zero = torch.zeros(n, g_count, dtype=torch.uint8, device=device)
            zero[rows, cols] = unpack_bits_padded(self.zero_point, self.bits, self.nnz)
        return UnpackedWeight(codes, scale, zero, mask)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) weight; pruned groups are exactly zero."""
        return dequantize_bsr(**self.tensors_with_none(), **_dims(self), dtype=dtype)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of ``dequantize()``, reading only their kept groups (an embedding lookup).

        Args:
            rows: (R,) integer row indices in [0, out_features), any order, repeats allowed.

        Returns:
            (R, in_features) float32, equal to ``self.dequantize()[rows]`` bit for bit.
        """
        rows = rows.long()
        starts = self.crow_indices[rows].long()  # (R,)
        counts = self.crow_indices[rows + 1].long() - starts  # (R,)
        total = int(counts.sum())
        owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts,
                                        output_size=total)  # (E,) output row of each read entry
        first = torch.cumsum(counts, 0) - counts  # (R,) position of a row's first entry among the E
        entries = starts[owner] + torch.arange(total, device=rows.device) - first[owner]  # (E,)
        codes = unpack_bits(self.values[entries], self.bits, self.group_size)  # (E, g)
        if self.zero_point is None:
            zero = torch.full((total,), float(symmetric_zero_point(self.bits)), device=rows.device)
        else:  # code `entry` of the zero-point bit stream, which may straddle two bytes (3 bits)
            stream = self.zero_point.int()
            bit = entries * self.bits  # (E,)
            byte = bit >> 3
            word = stream[byte] | (stream[(byte + 1).clamp(max=stream.numel() - 1)] << 8)
            zero = ((word >> (bit & 7)) & ((1 << self.bits) - 1)).float()  # (E,)
        kept = (codes.float() - zero[:, None]) * self.scale[entries].float()[:, None]  # (E, g)
        dense = torch.zeros(rows.numel(), self.num_groups, self.group_size, device=rows.device)
        dense[owner, self.col_indices[entries].long()] = kept
        return dense.reshape(rows.numel(), self.in_features)

    def tensors_with_none(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    # ---- validation ----------------------------------------------------------------------------------
    @staticmethod
    def expected_shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each stored tensor for the metadata of ``metadata()``."""
        n, k, g, bits, nnz = (meta[key] for key in ("out_features", "in_features", "group_size", "bits", "nnz"))
        out = {
            "crow_indices": ((n + 1,), torch.int32),
            "col_indices": ((nnz,), col_indices_dtype(k // g)),
            "values": ((nnz, g * bits // 8), torch.uint8),
            "scale": ((nnz,), torch.float16),
        }
        if not meta["symmetric"]:
            out["zero_point"] = ((packed_nbytes(nnz, bits),), torch.uint8)
        return out

    def validate(self, name: str = "weight") -> None:
        """Check every rule of docs/FORMAT.md.

        Raises:
            FormatError: naming ``name`` and the offending tensor.
        """
        from gqsa.config import QuantSpec

        try:
            QuantSpec(bits=self.bits, group_size=self.group_size)
        except ValueError as exc:
            raise FormatError(f"{name}: {exc}") from exc
        if self.in_features % self.group_size or self.out_features < 1:
            raise FormatError(
                f"{name}: in_features {self.in_features} must be a positive multiple of group_size "
                f"{self.group_size} and out_features {self.out_features} positive"
            )
        nnz = self.nnz
        for tname, (shape, dtype) in self.expected_shapes({**self.metadata(), "nnz": nnz}).items():
            t = getattr(self, tname)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise FormatError(f"{name}.{tname}: expected shape {shape} dtype {dtype}, got {got}")
        check_indices(self.crow_indices, self.col_indices, self.num_groups, name)
        s = self.scale.float()
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise FormatError(f"{name}.scale: every kept group needs a finite positive scale")
        if self.zero_point is not None and (nnz * self.bits) % 8:
            used = (nnz * self.bits) % 8
            if int(self.zero_point[-1]) >> used:
                raise FormatError(f"{name}.zero_point: padding bits after the last zero point must be 0")


def _dims(p: PackedWeight) -> dict:
    return {
        "out_features": p.out_features,
        "in_features": p.in_features,
        "group_size": p.group_size,
        "bits": p.bits,
    }
