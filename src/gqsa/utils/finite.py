"""What is non-finite in a tensor, said in words for error messages (checkpoint loading, model checks)."""

from __future__ import annotations

import torch

# Counted in chunks, so that checking a large embedding table never allocates a mask of its size.
_CHUNK = 1 << 24


def describe_nonfinite(tensor: torch.Tensor) -> str | None:
    """What is non-finite in a floating tensor, or None when every value is finite.

    Args:
        tensor: any floating tensor (other dtypes are always finite).

    Returns:
        None, or a phrase such as "3 non-finite values of 4096 (2 NaN, 1 Inf)".
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)  # (numel,)
    if all(bool(torch.isfinite(part).all()) for part in flat.split(_CHUNK)):
        return None
    nan = sum(int(torch.isnan(part).sum()) for part in flat.split(_CHUNK))
    inf = sum(int(torch.isinf(part).sum()) for part in flat.split(_CHUNK))
    plural = "s" if nan + inf != 1 else ""
    return f"{nan + inf} non-finite value{plural} of {flat.numel()} ({nan} NaN, {inf} Inf)"
