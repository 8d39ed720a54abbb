"""Choosing which groups survive: scores per group in, boolean keep-masks out."""

from __future__ import annotations

import math

import torch

from gqsa.quant.groups import to_groups


def group_l2_norms(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Magnitude score of each group: its L2 norm. (N, K) -> (N, K // group_size) float32."""
    return to_groups(weight.float(), group_size).norm(dim=-1)


def groups_to_prune(total: int, ratio: float) -> int:
    """How many of ``total`` groups a pruning ``ratio`` removes (rounded to nearest, ties down)."""
    return min(total, max(0, math.floor(ratio * total + 0.5 - 1e-9)))


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask over the flat ``scores`` keeping the ``keep`` largest (ties: lower index first)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        order = torch.argsort(-flat.float(), stable=True)
        mask[order[:keep]] = True
    return mask.reshape(scores.shape)


def select_groups(scores: torch.Tensor, ratio: float, allocation: str = "row") -> torch.Tensor:
    """Keep-mask of the highest-scoring groups of one matrix.

    Args:
        scores: (N, G) importance of each group (higher = more important).
        ratio: fraction of groups to prune, in [0, 1).
        allocation: "row" prunes the same number of groups in every row; "matrix" prunes the lowest scores
            of the whole matrix, so rows may keep different numbers.

    Returns:
        (N, G) bool, True where the group is kept.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    n, g = scores.shape
    if allocation == "row":
        keep = g - groups_to_prune(g, ratio)
        order = torch.argsort(-scores.float(), dim=1, stable=True)  # (N, G)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(1, order[:, :keep], True)
        return mask
    if allocation == "matrix":
        return _keep_top(scores, n * g - groups_to_prune(n * g, ratio))
    raise ValueError(f"allocation must be 'row' or 'matrix' for one matrix, got {allocation!r}")


def select_groups_across(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Keep-masks for several matrices that together prune ``ratio`` of all their groups.

    One threshold over all scores: matrices whose groups score lower lose more. Scores must be comparable
    across matrices (e.g. an output-error saliency); raw magnitudes favour layers with large weights.

    Args:
        scores: name -> (N_i, G_i) scores.

    Returns:
        name -> (N_i, G_i) bool keep-mask.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    names = list(scores)
    flat = torch.cat([scores[k].reshape(-1).float().cpu() for k in names])
    keep = _keep_top(flat, flat.numel() - groups_to_prune(flat.numel(), ratio))
    out, start = {}, 0
    for k in names:
        size = scores[k].numel()
        out[k] = keep[start : start + size].reshape(scores[k].shape).to(scores[k].device)
        start += size
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores in every ``m`` consecutive columns of each row (N:M sparsity).

    Args:
        scores: (R, C) importance of single weights, C a multiple of ``m``.

    Returns:
        (R, C) bool, exactly ``n`` True in every aligned run of ``m`` columns (ties: lower index first).
    """
    r, c = scores.shape
    if c % m:
        raise ValueError(f"N:M sparsity needs a column count divisible by M={m}, got {c}")
    s = scores.float().reshape(r, c // m, m)  # (R, C/M, M)
    order = torch.argsort(-s, dim=-1, stable=True)
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(r, c)
