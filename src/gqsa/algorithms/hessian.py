"""Calibration statistics of a linear layer's input: H = 2/n X^T X, and its damped inverse."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``H = 2/n sum_t x_t x_t^T`` over every token seen, in float32 (the GPTQ convention).

    Args:
        in_features: K.
        device: where H lives.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` of shape (..., K)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)  # (T, K)
        t = x.shape[0]
        if t == 0:
            return
        self.hessian.mul_(self.tokens / (self.tokens + t))
        self.tokens += t
        x = x * (2.0 / self.tokens) ** 0.5
        self.hessian.addmm_(x.T, x)


class SingularHessianError(RuntimeError):
    """The calibration Hessian stays not positive definite even after heavy dampening."""


def damped_inverse_cholesky(
    hessian: torch.Tensor, damp: float = 0.01, max_tries: int = 6, layer: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dampen H, invert it, and return the upper Cholesky factor of H^-1 (as GPTQ/SparseGPT use it).

    Input columns that never saw a non-zero activation (H_jj = 0) get H_jj = 1 so they can be handled (their
    weights do not affect the output). ``damp`` times the mean diagonal is added to the diagonal; if the
    Cholesky factorisation still fails, the dampening is multiplied by 10, up to ``max_tries`` times.

    Args:
        hessian: (K, K) symmetric positive semi-definite.
        damp: relative dampening.

    Returns:
        (hinv (K, K) = (H + lambda I)^-1, hinv_chol (K, K) upper triangular with hinv = U^T U, dead (K,) bool).

    Raises:
        SingularHessianError: naming ``layer``, when no dampening makes H positive definite (e.g. NaN inputs).
    """
    # Peak memory: three (K, K) matrices besides ``hessian`` (1.4 GiB for Llama-2-7B's down_proj, K = 11008):
    # the dampening goes onto a copy's diagonal in place, and each intermediate is released once used.
    dead = torch.diagonal(hessian) == 0

    def undamped_copy() -> tuple[torch.Tensor, torch.Tensor]:  # H in float32 with dead columns set to 1, its diagonal
        h = hessian.to(torch.float32, copy=True)
        diag = torch.diagonal(h)
        diag[dead] = 1.0
        return h, diag

    h, diag = undamped_copy()
    if not torch.isfinite(h).all():
        raise SingularHessianError(f"{layer}: the calibration Hessian has NaN/inf entries (check the model inputs)")
    undamped = diag.clone()
    mean_diag = undamped.mean()
    lam = damp
    for attempt in range(max_tries):
        diag.copy_(undamped + lam * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h, diag
            # H^-1 = L^-T L^-1 through one triangular solve: torch.cholesky_inverse is much slower on the CPU
            # (docs/RESULTS.md, "Measurements behind code constants").
            eye = torch.eye(chol.shape[0], device=chol.device, dtype=chol.dtype)
            linv = torch.linalg.solve_triangular(chol, eye, upper=False)
            del eye, chol
            hinv = linv.T @ linv
            del linv
            hinv_chol, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                if attempt:
                    logger.warning("%s: Hessian needed dampening %.3g (asked %.3g)", layer, lam, damp)
                return hinv, hinv_chol, dead
            del hinv, hinv_chol
            h, diag = undamped_copy()  # released above: rebuilt for the next try
        lam *= 10.0
    raise SingularHessianError(
        f"{layer}: the calibration Hessian is not positive definite even with dampening {lam / 10:.3g}; "
        "use more calibration samples or a larger --damp"
    )
