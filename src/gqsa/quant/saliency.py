"""Group saliency: how much the layer's output error grows when a whole group is removed.

With calibration inputs X (tokens x K) and H = 2/n X^T X, removing group G from row r and letting the remaining
weights of the row compensate optimally (OBS) raises the output squared error by

    s(r, G) = w_G^T ([H^-1]_GG)^-1 w_G                                     ("obs")

Ignoring the correlations inside the group gives the diagonal approximation

    s(r, G) = sum_{j in G} w_j^2 / [H^-1]_jj                                ("obs_diag")

and ignoring compensation altogether gives the activation-weighted magnitude (Wanda-style, |w| * ||x||)

    s(r, G) = sum_{j in G} w_j^2 * H_jj                                     ("wanda")

"magnitude" is the plain group L2 norm. All scores are (N, G) float32, higher = more important.
"""

from __future__ import annotations

import torch

from gqsa.quant.groups import to_groups

GROUP_SALIENCIES = ("obs", "obs_diag", "wanda", "magnitude")  # the scores above; gqsa.config.SALIENCIES adds one


def obs_scores(w_groups: torch.Tensor, hinv_blocks: torch.Tensor) -> torch.Tensor:
    """w_G^T ([H^-1]_GG)^-1 w_G per row and group: w_groups (N, G, g), hinv_blocks (G, g, g) -> (N, G)."""
    return torch.einsum("ngi,gij,ngj->ng", w_groups, torch.linalg.inv(hinv_blocks), w_groups)


def obs_group_saliency(weight: torch.Tensor, hinv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Exact OBS saliency of removing each group. weight (N, K), hinv = H^-1 (K, K) -> (N, K // group_size)."""
    n, k = weight.shape
    g_count = k // group_size
    idx = torch.arange(k, device=weight.device).reshape(g_count, group_size)  # (G, g)
    blocks = hinv.float()[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (G, g, g) diagonal blocks of H^-1
    return obs_scores(to_groups(weight.float(), group_size), blocks)


def obs_diag_group_saliency(weight: torch.Tensor, hinv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal OBS approximation. weight (N, K), hinv (K, K) -> (N, K // group_size)."""
    d = torch.diagonal(hinv).float()  # (K,)
    return to_groups(weight.float() ** 2 / d, group_size).sum(-1)


def wanda_group_saliency(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """Activation-weighted magnitude. weight (N, K), hessian H (K, K) -> (N, K // group_size)."""
    d = torch.diagonal(hessian).float()  # (K,) proportional to ||x_j||^2
    return to_groups(weight.float() ** 2 * d, group_size).sum(-1)


def group_saliency(
    kind: str, weight: torch.Tensor, hessian: torch.Tensor, hinv: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Dispatch by name (see the module docstring). ``hinv`` is needed by "obs" and "obs_diag"."""
    if kind == "magnitude":
        return to_groups(weight.float(), group_size).norm(dim=-1)
    if kind == "wanda":
        return wanda_group_saliency(weight, hessian, group_size)
    if kind in ("obs", "obs_diag"):
        if hinv is None:
            raise ValueError(f"saliency {kind!r} needs the inverse Hessian")
        fn = obs_group_saliency if kind == "obs" else obs_diag_group_saliency
        return fn(weight, hinv, group_size)
    raise ValueError(f"unknown saliency {kind!r}; expected one of {GROUP_SALIENCIES}")
