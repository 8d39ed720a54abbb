"""Building packed weights and combining them: ``quantize_to_packed`` (a dense weight and a keep-mask),
``concat_rows`` (weights that read the same input, as one), ``summarize_layers`` (totals over packed layers).
"""

from __future__ import annotations

import torch

from gqsa.format.bitpack import pack_bits_padded, unpack_bits_padded
from gqsa.format.packed_weight import PackedWeight
from gqsa.quant.groups import to_groups
from gqsa.quant.qparams import group_qparams
from gqsa.quant.quantize import quantize


def quantize_to_packed(
    weight: torch.Tensor,
    mask: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    qparam_method: str = "minmax",
) -> PackedWeight:
    """Quantize the kept groups of a dense weight (round to nearest) and pack them.

    Args:
        weight: (N, K) float weight.
        mask: (N, K // group_size) bool keep-mask.
        qparam_method: "minmax" or "mse".

    Returns:
        PackedWeight whose ``dequantize()`` is the quantized, pruned weight.
    """
    groups = to_groups(weight.float(), group_size)  # (N, G, g)
    scale, zero = group_qparams(groups, bits, symmetric, qparam_method)  # (N, G) each
    codes = quantize(groups, scale, zero, bits)  # (N, G, g)
    return PackedWeight.pack(codes, scale, None if symmetric else zero, mask, bits)


def concat_rows(weights: list[PackedWeight]) -> PackedWeight:
    """Stack packed weights that read the same input into one: rows of ``weights[0]``, then ``weights[1]``, ...

    The result's ``dequantize()`` is ``torch.cat([w.dequantize() for w in weights])`` exactly: the kept groups,
    their codes and scales are copied unchanged. ``crow_indices`` of each part are shifted by the kept groups
    before it; the zero points are a bit stream that starts mid-byte after a part whose ``nnz * bits`` is not a
    multiple of 8, so they are unpacked and packed again.

    Args:
        weights: one or more PackedWeights with equal ``in_features``, ``group_size``, ``bits`` and symmetry,
            on one device.

    Returns:
        A new PackedWeight of ``sum(out_features)`` rows (its tensors are new; the parts are not modified).

    Raises:
        ValueError: no weight, or parts that differ in in_features, group_size, bits, symmetry or device.
    """
    if not weights:
        raise ValueError("concat_rows needs at least one weight")
    first = weights[0]
    for i, w in enumerate(weights[1:], start=1):
        for name in ("in_features", "group_size", "bits", "symmetric"):
            if getattr(w, name) != getattr(first, name):
                raise ValueError(f"concat_rows: weight {i} has {name}={getattr(w, name)!r} but weight 0 has "
                                 f"{getattr(first, name)!r}; only weights with equal {name} can share rows")
        if w.values.device != first.values.device:
            raise ValueError(f"concat_rows: weight {i} is on {w.values.device} but weight 0 is on "
                             f"{first.values.device}")
    offsets = [0]
    for w in weights:
        offsets.append(offsets[-1] + w.nnz)
    crow = torch.cat([weights[0].crow_indices[:1]] + [w.crow_indices[1:] + offset
                                                       for w, offset in zip(weights, offsets)])  # (sum N + 1,)
    zero_point = None
    if not first.symmetric:
        zeros = [unpack_bits_padded(w.zero_point, w.bits, w.nnz) for w in weights]  # [(nnz_i,)]
        zero_point = pack_bits_padded(torch.cat(zeros), first.bits)  # (ceil(nnz * bits / 8),)
    return PackedWeight(
        crow_indices=crow.to(torch.int32),
        col_indices=torch.cat([w.col_indices for w in weights]),  # (nnz,)
        values=torch.cat([w.values for w in weights]),  # (nnz, group_size * bits // 8)
        scale=torch.cat([w.scale for w in weights]),  # (nnz,)
        zero_point=zero_point,
        out_features=sum(w.out_features for w in weights),
        in_features=first.in_features,
        group_size=first.group_size,
        bits=first.bits,
    )


def summarize_layers(layers: list[tuple[dict, int]]) -> dict:
    """Totals over packed layers, each given as (``PackedWeight.metadata()``, stored bytes).

    Returns:
        {"num_layers", "weights_in_packed_layers" (dense weight count), "packed_bytes", "bits_per_weight",
        "sparsity" (fraction of groups pruned)}; the last two are None when there is no layer.
    """
    dense = sum(m["out_features"] * m["in_features"] for m, _ in layers)
    groups = sum(m["out_features"] * (m["in_features"] // m["group_size"]) for m, _ in layers)
    kept = sum(m["nnz"] for m, _ in layers)
    nbytes = sum(b for _, b in layers)
    return {
        "num_layers": len(layers),
        "weights_in_packed_layers": dense,
        "packed_bytes": nbytes,
        "bits_per_weight": 8.0 * nbytes / dense if dense else None,
        "sparsity": 1.0 - kept / groups if groups else None,
    }
