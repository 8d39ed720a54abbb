"""The OBS column sweep shared by GQSA, GPTQ and SparseGPT.

Columns are processed left to right. Each column is replaced by its compressed value (chosen by the caller:
quantized, pruned or both) and the error, scaled by the upper Cholesky factor U of the inverse Hessian
(H^-1 = U^T U), is pushed onto the columns not yet processed. Updates inside a block of columns are applied at
once per column; the rest of the matrix is updated lazily once per block (one matmul), as in GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (first column b0, block weights w1 (N, B) as updated so far, U over the block (B, B)) -> None.
BlockStartFn = Callable[[int, torch.Tensor, torch.Tensor], None]
# (column index, i within the block, block weights w1 (N, B) as updated so far) -> compressed column (N,).
ColumnFn = Callable[[int, int, torch.Tensor], torch.Tensor]


def obs_sweep(
    weight: torch.Tensor,
    hinv_chol: torch.Tensor,
    compress_column: ColumnFn,
    block_size: int = 128,
    block_start: BlockStartFn | None = None,
) -> torch.Tensor:
    """Compress ``weight`` column by column with error compensation.

    Args:
        weight: (N, K) float weight (not modified).
        hinv_chol: (K, K) upper Cholesky factor U of the damped inverse Hessian.
        compress_column: returns the compressed value of one column given the weights updated so far; it may
            look ahead within the block (e.g. to choose a group's quantization parameters).
        block_size: columns per lazy update.
        block_start: called before each block (e.g. to choose that block's pruning mask, as SparseGPT does).

    Returns:
        (N, K) float32 compressed weight: exactly the values ``compress_column`` returned.
    """
    n, k = weight.shape
    w = weight.detach().clone().float()
    out = torch.empty_like(w)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1 = w[:, b0:b1].clone()  # (N, B)
        err1 = torch.empty_like(w1)
        u1 = hinv_chol[b0:b1, b0:b1]  # (B, B)
        if block_start is not None:
            block_start(b0, w1, u1)
        for i in range(b1 - b0):
            q = compress_column(b0 + i, i, w1)  # (N,)
            out[:, b0 + i] = q
            e = (w1[:, i] - q) / u1[i, i]  # (N,)
            w1[:, i + 1 :].addr_(e, u1[i, i + 1 :], alpha=-1.0)
            err1[:, i] = e
        if b1 < k:
            w[:, b1:].addmm_(err1, hinv_chol[b0:b1, b1:], alpha=-1.0)
    return out
