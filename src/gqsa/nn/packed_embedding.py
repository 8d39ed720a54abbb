"""``PackedEmbedding``: an input embedding table stored in the packed format, rows dequantized on lookup."""

from __future__ import annotations

import torch
from torch import nn

from gqsa.format.packed import TENSOR_NAMES, PackedWeight, concat_rows, quantize_to_packed
from gqsa.ops import cpu

QUANTIZE_ROWS = 4096  # rows of the table quantized at a time


class PackedEmbedding(nn.Module):
    """Token embeddings kept as a packed (vocab, dim) weight at sparsity 0; a lookup dequantizes only its rows.

    An embedding table is read a few rows per step, so it costs memory, not time: SmolLM2-135M's fp32 table is
    108 MiB of its 148 MiB checkpoint, a 2-block Llama-2-7B-shaped model's 500 MiB. Packed at W8 g16 it takes
    9 bits per weight and a lookup returns exactly ``PackedWeight.dequantize()[ids]``
    (``PackedWeight.dequantize_rows``). Checkpoints store it like a packed linear layer, marked
    ``"kind": "embedding"`` in their ``layers`` map (docs/FORMAT.md), so loading never builds the dense table.

    Args:
        packed: the (num_embeddings, embedding_dim) table (its tensors are shared, not copied).
        padding_idx: as ``nn.Embedding``'s (kept for reference; lookups do not treat it specially).
        dtype: dtype of the returned embeddings (the model's activation dtype).
    """

    def __init__(self, packed: PackedWeight, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.out_features, packed.in_features
        self.bits, self.group_size = packed.bits, packed.group_size
        self.padding_idx = padding_idx
        self.dtype = dtype
        for name, tensor in packed.tensors_with_none().items():
            self.register_buffer(name, tensor)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int = 8, group_size: int = 16, symmetric: bool = False,
                       qparam_method: str = "minmax") -> PackedEmbedding:
        """Round ``embedding``'s table to nearest per group of ``group_size`` columns (every group kept).

        Raises:
            ValueError: the quantization is invalid or group_size does not divide the embedding dimension.
        """
        from gqsa.config import QuantSpec

        QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, qparam_method=qparam_method) \
            .check_in_features(embedding.embedding_dim, layer="input embedding")
        weight = embedding.weight.detach()  # (vocab, dim)
        # in slices of rows: quantizing a whole table at once holds several float32 copies of it (docs/RESULTS.md,
        # "Measurements behind code constants")
        parts = []
        for start in range(0, embedding.num_embeddings, QUANTIZE_ROWS):
            rows = weight[start:start + QUANTIZE_ROWS].float()  # (r, dim)
            keep = torch.ones(rows.shape[0], embedding.embedding_dim // group_size, dtype=torch.bool)
            parts.append(quantize_to_packed(rows, keep, bits, group_size, symmetric, qparam_method))
        packed = parts[0] if len(parts) == 1 else concat_rows(parts)
        return cls(packed.to(weight.device), embedding.padding_idx, weight.dtype)

    @classmethod
    def empty(cls, meta: dict, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
              ) -> PackedEmbedding:
        """An embedding with uninitialised buffers shaped by ``meta`` (``metadata()``), for a loader to fill
        (``device="meta"`` for a skeleton)."""
        tensors = {name: torch.empty(shape, dtype=tdtype, device=device)
                   for name, (shape, tdtype) in PackedWeight.expected_shapes(meta).items()}
        zero_point = tensors.pop("zero_point", None)
        packed = PackedWeight(**tensors, zero_point=zero_point,
                              out_features=meta["out_features"], in_features=meta["in_features"],
                              group_size=meta["group_size"], bits=meta["bits"])
        return cls(packed, dtype=dtype)

    def metadata(self) -> dict:
        """What a loader needs to rebuild it empty: the packed weight's metadata, ``"kind": "embedding"`` (the
        checkpoint's ``layers`` map also holds linear layers) and ``"bias": False``."""
        return {**self.packed_weight().metadata(), "bias": False, "kind": "embedding"}

    def packed_weight(self) -> PackedWeight:
        """The table as a PackedWeight (shares the buffers)."""
        return PackedWeight(**{name: getattr(self, name) for name in TENSOR_NAMES},
                            out_features=self.num_embeddings, in_features=self.embedding_dim,
                            group_size=self.group_size, bits=self.bits)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(...) token ids -> (..., embedding_dim) embeddings in ``self.dtype``.

        Raises:
            IndexError: an id outside [0, num_embeddings).
        """
        flat = input_ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        if self.values.is_cpu and all(t is None or t.is_contiguous() for t in self._buffers.values()) \
                and cpu.available():
            rows = cpu.dequantize_rows_native(self.crow_indices, self.col_indices, self.values, self.scale,
                                              self.zero_point, flat, self.embedding_dim, self.group_size,
                                              self.bits)  # (n, dim), one native call per row
        else:
            rows = self.packed_weight().dequantize_rows(flat)  # (n, dim)
        return rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the fp16 scales: keep the format's dtype, take the device move, and let a
        # float dtype change set the dtype of the returned embeddings instead.
        scale = self._buffers["scale"]
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=scale.device)).dtype  # what a float buffer becomes
        super()._apply(fn, recurse)
        moved = self._buffers["scale"]
        if moved.dtype != torch.float16:
            self._buffers["scale"] = scale.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
