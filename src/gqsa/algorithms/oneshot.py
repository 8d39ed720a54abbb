"""GQSA one-shot: Hessian-aware group masks, then one column sweep that prunes, quantizes and compensates.

The sweep (``gqsa.algorithms.obs_sweep.obs_sweep``) follows SparseGPT/GPTQ: each column's weights are replaced by
their compressed value (0 for pruned groups, the quantized value for kept ones), and the error, scaled by the
inverse Hessian, is pushed onto the columns not yet processed. Quantization parameters of a group are chosen when the sweep reaches the group's first column, from the
weights as updated so far, so they fit what is really quantized.
"""

from __future__ import annotations

import torch

from gqsa.algorithms.obs_sweep import obs_sweep
from gqsa.format.packed import PackedWeight
from gqsa.quant.groups import to_groups
from gqsa.quant.masks import groups_to_prune, select_groups
from gqsa.quant.qparams import group_qparams, symmetric_zero_point
from gqsa.quant.quantize import dequantize, quantize
from gqsa.quant.saliency import group_saliency, obs_scores


def compensated_prune_quantize(
    weight: torch.Tensor,
    hinv_chol: torch.Tensor,
    mask: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    qparam_method: str = "minmax",
    block_size: int = 128,
    adaptive_ratio: float | None = None,
    adaptive_allocation: str = "row",
    static_qparams: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune and quantize with error compensation.

    Args:
        weight: (N, K) float weight.
        hinv_chol: (K, K) upper Cholesky factor of the damped inverse Hessian.
        mask: (N, K // group_size) bool keep-mask; fixed, or with ``adaptive_ratio`` filled in place as the
            sweep goes.
        block_size: columns per lazy update (a power of two; raised to group_size if smaller).
        adaptive_ratio: choose the mask block by block (SparseGPT-style): when the sweep reaches a block of
            columns, prune this fraction of its groups (per row or over the block, ``adaptive_allocation``) by
            their exact OBS saliency on the weights as updated so far, w_G^T ([H_R^-1]_GG)^-1 w_G with
            H_R^-1 = U_RR^T U_RR the inverse Hessian of the columns not yet processed.
        static_qparams: take every group's scale and zero point from the original weights before the sweep
            (as llm-compressor and GPTQ's ``static_groups`` do) instead of from the updated weights when the
            sweep reaches the group.

    Returns:
        codes (N, G, group_size) uint8, scale (N, G) float32 (fp16 values), zero_point (N, G) float32.
        Pruned groups have codes 0 and scale 1 (ignored by ``PackedWeight.pack``).
    """
    n, k = weight.shape
    g = group_size
    block_size = max(block_size, g)
    if block_size % g:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {g}")
    keep = mask.float()  # (N, G)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=weight.device)
    scale = torch.ones(n, k // g, device=weight.device)
    zero = torch.full((n, k // g), float(symmetric_zero_point(bits)), device=weight.device)

    if static_qparams:
        s0, z0 = group_qparams(to_groups(weight.float(), g), bits, symmetric, qparam_method)  # (N, G)
        scale.copy_(s0)
        zero.copy_(z0)

    def compress_column(col: int, i: int, w1: torch.Tensor) -> torch.Tensor:
        grp = col // g
        if col % g == 0 and not static_qparams:  # the group's qparams, from its weights as updated so far
            s, z = group_qparams(w1[:, i : i + g].unsqueeze(1), bits, symmetric, qparam_method)  # (N, 1)
            scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
        c = quantize(w1[:, i : i + 1], scale[:, grp], zero[:, grp], bits)  # (N, 1)
        codes[:, col] = c[:, 0]
        return dequantize(c, scale[:, grp], zero[:, grp])[:, 0] * keep[:, grp]

    def choose_block_mask(b0: int, w1: torch.Tensor, u1: torch.Tensor) -> None:
        groups = w1.shape[1] // g
        cols = u1.reshape(u1.shape[0], groups, g).transpose(0, 1)  # (Gb, B, g): U's columns of each group
        scores = obs_scores(w1.reshape(n, groups, g), cols.transpose(1, 2) @ cols)  # (N, Gb); [H_R^-1]_GG
        # This block's share of what is left to prune (per row, or over the matrix), so the total is exact.
        per = n * groups if adaptive_allocation == "matrix" else groups
        share = min(per, round(budget["prune"] * per / budget["groups"]))
        budget["prune"] -= share
        budget["groups"] -= per
        if share == per:
            chosen = torch.zeros_like(scores, dtype=torch.bool)
        else:
            chosen = select_groups(scores, share / per, adaptive_allocation)
        mask[:, b0 // g : b0 // g + groups] = chosen
        keep[:, b0 // g : b0 // g + groups] = chosen.float()

    total = n * (k // g) if adaptive_allocation == "matrix" else k // g
    budget = {"prune": groups_to_prune(total, adaptive_ratio or 0.0), "groups": total}
    block_start = None if adaptive_ratio is None else choose_block_mask
    obs_sweep(weight, hinv_chol, compress_column, block_size, block_start)
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
    static_qparams: bool = False,
) -> PackedWeight:
    """Compress one linear layer: saliency-based group mask, then the compensated sweep, then pack.

    Args:
        weight: (N, K). hessian: (K, K) H. hinv, hinv_chol: from ``damped_inverse_cholesky``.
        mask: a given (N, G) keep-mask instead of choosing one.

    Returns:
        The PackedWeight.
    """
    adaptive = saliency == "obs_adaptive" and mask is None
    if adaptive:
        mask = torch.ones(weight.shape[0], weight.shape[1] // group_size, dtype=torch.bool, device=weight.device)
    elif mask is None:
        scores = group_saliency(saliency, weight, hessian, hinv, group_size)  # (N, G)
        mask = select_groups(scores, ratio, allocation)
    codes, scale, zero = compensated_prune_quantize(
        weight, hinv_chol, mask, bits, group_size, symmetric, qparam_method, block_size,
        adaptive_ratio=ratio if adaptive else None, adaptive_allocation=allocation, static_qparams=static_qparams,
    )
    return PackedWeight.pack(codes, scale, None if symmetric else zero, mask, bits)
