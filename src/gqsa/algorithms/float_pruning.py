"""Float pruning baselines: SparseGPT, Wanda and magnitude at unstructured or N:M sparsity.

These prune single weights and leave the kept ones in float; they are what GQSA's group sparsity is compared
against (the paper's 2:4 and unstructured 50% rows). All take a (N, K) weight and return the pruned (N, K)
float32 weight and its (N, K) bool keep-mask.

- SparseGPT (Frantar & Alistarh, 2023): the OBS column sweep with adaptive mask selection. Within each block of
  columns the mask is chosen by w^2 / [U]_jj^2 on the weights as updated so far (over the whole block, or per
  row with allocation "row"); N:M masks are chosen per run of M columns when the sweep reaches it. The error
  of every pruned weight is compensated on the columns to its right.
- Wanda (Sun et al., 2023): score |w_ij| * ||x_j||, compared per output row (allocation "row") or per matrix;
  no weight update.
- Magnitude: score |w_ij|; no weight update, no calibration.
"""

from __future__ import annotations

import torch

from gqsa.algorithms.obs_sweep import obs_sweep
from gqsa.quant.masks import nm_mask, select_groups


def _mask(scores: torch.Tensor, ratio: float, nm: tuple[int, int] | None, allocation: str) -> torch.Tensor:
    """(R, C) keep-mask of single weights: N:M runs, or ``ratio`` pruned per row or per matrix."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return select_groups(scores, ratio, allocation)  # one weight per "group"


def magnitude_prune(
    weight: torch.Tensor, ratio: float, nm: tuple[int, int] | None = None, allocation: str = "matrix"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the smallest |w|. weight (N, K) -> (pruned (N, K) float32, keep-mask (N, K) bool)."""
    w = weight.detach().float()
    mask = _mask(w.abs(), ratio, nm, allocation)
    return w * mask, mask


def wanda_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    allocation: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the smallest |w_ij| * ||x_j||; ||x_j|| is read off diag(H) (H = 2/n X^T X).

    weight (N, K), hessian (K, K) -> (pruned (N, K) float32, keep-mask (N, K) bool).
    """
    w = weight.detach().float()
    x_norm = torch.diagonal(hessian).float().clamp_min(0).sqrt()  # (K,) proportional to ||x_j||
    mask = _mask(w.abs() * x_norm, ratio, nm, allocation)
    return w * mask, mask


def sparsegpt_prune(
    weight: torch.Tensor,
    hinv_chol: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    allocation: str = "matrix",
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune with OBS error compensation and masks chosen as the sweep goes.

    Args:
        weight: (N, K). hinv_chol: (K, K) upper Cholesky factor of the damped inverse Hessian.
        ratio: fraction pruned (unstructured; for N:M it is 1 - N/M and the runs decide).
        nm: (N, M) for N:M sparsity, else None.
        allocation: unstructured only: "matrix" (the ratio holds over each block of columns, all rows
            together, as in SparseGPT) or "row" (per row within each block of columns).
        block_size: columns per lazy update and per mask selection; a multiple of M for N:M.

    Returns:
        (pruned (N, K) float32, keep-mask (N, K) bool).
    """
    n, k = weight.shape
    if nm is not None and (block_size % nm[1] or k % nm[1]):
        raise ValueError(f"N:M sparsity with M={nm[1]} needs in_features ({k}) and block_size ({block_size}) "
                         f"divisible by M")
    keep = torch.ones(n, k, dtype=torch.bool, device=weight.device)
    diag = torch.diagonal(hinv_chol)  # (K,)

    def block_start(b0: int, w1: torch.Tensor, u1: torch.Tensor) -> None:
        if nm is None:
            keep[:, b0 : b0 + w1.shape[1]] = select_groups(w1**2 / torch.diagonal(u1) ** 2, ratio, allocation)

    def compress_column(col: int, i: int, w1: torch.Tensor) -> torch.Tensor:
        if nm is not None and col % nm[1] == 0:
            run = slice(col, col + nm[1])
            keep[:, run] = nm_mask(w1[:, i : i + nm[1]] ** 2 / diag[run] ** 2, *nm)
        return w1[:, i] * keep[:, col]

    pruned = obs_sweep(weight, hinv_chol, compress_column, block_size, block_start)
    return pruned, keep
