"""GQSA one-shot: Hessian-aware group masks, then one column sweep that prunes, quantizes and compensates.

The sweep follows SparseGPT/GPTQ: columns are processed left to right; each column's weights are replaced by
their compressed value (0 for pruned groups, the quantized value for kept ones), and the error, scaled by the
inverse Hessian, is pushed onto the columns not yet processed. Updates are applied lazily in blocks of columns.
Quantization parameters of a group are chosen when the sweep reaches the group's first column, from the
weights as updated so far, so they fit what is really quantized.
"""

from __future__ import annotations

import torch

from gqsa.format.packed import PackedWeight
from gqsa.quant.groups import to_groups
from gqsa.quant.masks import select_groups
from gqsa.quant.qparams import group_qparams, symmetric_zero_point
from gqsa.quant.quantize import dequantize, quantize
from gqsa.quant.saliency import group_saliency


def compensated_prune_quantize(
    weight: torch.Tensor,
    hinv_chol: torch.Tensor,
    mask: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    qparam_method: str = "minmax",
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune and quantize with error compensation.

    Args:
        weight: (N, K) float weight.
        hinv_chol: (K, K) upper Cholesky factor of the damped inverse Hessian.
        mask: (N, K // group_size) bool keep-mask (fixed).
        block_size: columns per lazy update (a power of two; raised to group_size if smaller).

    Returns:
        codes (N, G, group_size) uint8, scale (N, G) float32 (fp16 values), zero_point (N, G) float32.
        Pruned groups have codes 0 and scale 1 (ignored by ``PackedWeight.pack``).
    """
    n, k = weight.shape
    g = group_size
    block_size = max(block_size, g)
    if block_size % g:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {g}")
    w = weight.detach().clone().float()
    keep = mask.repeat_interleave(g, dim=1).float()  # (N, K)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scale = torch.ones(n, k // g, device=w.device)
    zero = torch.full((n, k // g), float(symmetric_zero_point(bits)), device=w.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1 = w[:, b0:b1].clone()  # (N, B)
        err1 = torch.zeros_like(w1)
        u1 = hinv_chol[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            grp = col // g
            if col % g == 0:
                s, z = group_qparams(w1[:, i : i + g].unsqueeze(1), bits, symmetric, qparam_method)  # (N, 1)
                scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
            c = quantize(w1[:, i : i + 1], scale[:, grp], zero[:, grp], bits)  # (N, 1)
            q = dequantize(c, scale[:, grp], zero[:, grp])[:, 0] * keep[:, col]  # (N,)
            codes[:, col] = c[:, 0]
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv_chol[b0:b1, b1:]
    codes = to_groups(codes, g) * mask.unsqueeze(-1)  # (N, G, g), pruned groups zeroed
    return codes, scale, zero


def gqsa_oneshot_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    hinv: torch.Tensor,
    hinv_chol: torch.Tensor,
    bits: int,
    group_size: int,
    ratio: float,
    allocation: str = "row",
    saliency: str = "obs",
    symmetric: bool = False,
    qparam_method: str = "minmax",
    block_size: int = 128,
    mask: torch.Tensor | None = None,
) -> PackedWeight:
    """Compress one linear layer: saliency-based group mask, then the compensated sweep, then pack.

    Args:
        weight: (N, K). hessian: (K, K) H. hinv, hinv_chol: from ``damped_inverse_cholesky``.
        mask: a given (N, G) keep-mask instead of choosing one.

    Returns:
        The PackedWeight.
    """
    if mask is None:
        scores = group_saliency(saliency, weight, hessian, hinv, group_size)  # (N, G)
        mask = select_groups(scores, ratio, allocation)
    codes, scale, zero = compensated_prune_quantize(
        weight, hinv_chol, mask, bits, group_size, symmetric, qparam_method, block_size
    )
    return PackedWeight.pack(codes, scale, None if symmetric else zero, mask, bits)
