"""Reshaping between weight matrices and their groups of ``group_size`` consecutive input columns."""

from __future__ import annotations

import torch


def to_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a (N, K) weight as (N, K // group_size, group_size) groups.

    Raises:
        ValueError: ``group_size`` does not divide K.
    """
    n, k = weight.shape
    if k % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide in_features {k}")
    return weight.reshape(n, k // group_size, group_size)  # (N, G, g)


def from_groups(groups: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_groups``: (N, G, g) -> (N, G * g)."""
    n, g_count, g = groups.shape
    return groups.reshape(n, g_count * g)


def expand_group_mask(mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """A (N, G) group mask as a (N, G * group_size) element mask."""
    return mask.repeat_interleave(group_size, dim=-1)
