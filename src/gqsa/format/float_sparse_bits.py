"""Storage cost of the float pruning baselines (unstructured and N:M sparsity, kept weights in fp16).

The baselines are saved as ordinary dense checkpoints (zeros stored) so any evaluation loads them, but they are
compared by what a deployment format would store:

- N:M (e.g. 2:4, NVIDIA's semi-structured sparsity as cuSPARSELt stores it): the kept fp16 values plus
  ceil(log2(M)) bits of position per kept value; 2:4 costs 0.5 * (16 + 2) = 9 bits per weight.
- unstructured: the kept fp16 values plus a one-bit-per-weight bitmap; 50% costs 0.5 * 16 + 1 = 9 bits per weight.
"""

from __future__ import annotations

import math

from gqsa.config import parse_nm

VALUE_BITS = 16  # fp16 values


def float_sparse_bits_per_weight(density: float, pattern: str) -> float:
    """Bits per original weight of a float sparse matrix keeping a fraction ``density`` of its weights.

    Args:
        density: kept fraction in [0, 1].
        pattern: "unstructured" or "N:M".
    """
    if pattern == "unstructured":
        return density * VALUE_BITS + 1.0
    nm = parse_nm(pattern)
    if nm is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M', got {pattern!r}")
    return density * (VALUE_BITS + math.ceil(math.log2(nm[1])))
