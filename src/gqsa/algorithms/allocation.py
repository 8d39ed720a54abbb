"""Non-uniform sparsity across layers ("model" allocation): each layer's share set by its measured sensitivity.

A dense calibration pass measures, for every layer l, the OBS saliency s_l(r, G) of every group, normalised by
the layer's output energy tr(W H W^T): the relative output error each group's removal would add. With the
groups of all layers sorted by that normalised saliency, pruning the globally cheapest ones minimises the sum of
the layers' relative output errors (to first order, ignoring interactions within a layer). Each layer's ratio is
kept within ``ratio +- spread`` so no layer is emptied or left dense, and the counts add up exactly to the global
target. Only a fixed number of quantiles of each layer's sorted saliencies is kept, so memory does not grow with
the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gqsa.quant.masks import groups_to_prune

QUANTILES = 4096


@dataclass(frozen=True)
class SensitivityCurve:
    """One layer's sorted normalised group saliencies, subsampled.

    Attributes:
        groups: number of groups in the layer (N * G).
        values: (Q,) ascending; values[j] is the saliency below which a fraction (j + 1) / Q of groups lie.
    """

    groups: int
    values: torch.Tensor

    @classmethod
    def from_scores(cls, scores: torch.Tensor, energy: float, quantiles: int = QUANTILES) -> SensitivityCurve:
        """Curve of (N, G) saliencies ``scores`` of a layer whose output energy tr(W H W^T) is ``energy``."""
        flat = torch.sort(scores.reshape(-1).double().cpu() / max(energy, 1e-30)).values  # (N * G,)
        q = min(quantiles, flat.numel())
        idx = (torch.arange(1, q + 1, dtype=torch.float64) * flat.numel() / q).ceil().long() - 1
        return cls(groups=flat.numel(), values=flat[idx])

    def fraction_below(self, threshold: float) -> float:
        """Fraction of the layer's groups with normalised saliency at most ``threshold`` (to 1/Q)."""
        return float(torch.searchsorted(self.values, torch.tensor([threshold], dtype=torch.float64), right=True)
                     ) / self.values.numel()


def allocate_counts(curves: dict[str, SensitivityCurve], ratio: float, spread: float) -> dict[str, int]:
    """Groups to prune per layer so the total is exactly ``groups_to_prune(sum of groups, ratio)``.

    Each layer prunes the fraction of its groups below one global threshold, clamped to
    [ratio - spread, ratio + spread] (and [0, 1)); the threshold is found by bisection and the last few groups
    of rounding are given to the layers with the most room.

    Raises:
        ValueError: no curves.
    """
    if not curves:
        raise ValueError("allocate_counts: no layers")
    names = list(curves)
    total = sum(c.groups for c in curves.values())
    target = groups_to_prune(total, ratio)
    # Bounds rounded outwards, so the global target stays reachable whatever the rounding (even at spread 0).
    lo = {n: math.floor(max(0.0, ratio - spread) * curves[n].groups) for n in names}
    hi = {n: max(lo[n], min(curves[n].groups - 1, math.ceil(min(1.0, ratio + spread) * curves[n].groups)))
          for n in names}

    def counts_at(threshold: float) -> dict[str, int]:
        return {n: min(hi[n], max(lo[n], round(curves[n].fraction_below(threshold) * curves[n].groups)))
                for n in names}

    values = torch.cat([c.values for c in curves.values()])
    low, high = float(values.min()) * 0.5, float(values.max()) * 2.0 + 1e-30
    for _ in range(200):  # bisection on a monotone step function
        mid = math.sqrt(low * high) if low > 0 else (low + high) / 2
        if sum(counts_at(mid).values()) < target:
            low = mid
        else:
            high = mid
    counts = counts_at(high)
    diff = target - sum(counts.values())
    while diff:
        step = 1 if diff > 0 else -1
        room = {n: (hi[n] - counts[n]) if step > 0 else (counts[n] - lo[n]) for n in names}
        best = max(names, key=lambda n: room[n])
        if room[best] <= 0:
            raise ValueError(f"allocate_counts: ratio {ratio} is not reachable within spread {spread}")
        take = min(abs(diff), room[best])
        counts[best] += step * take
        diff -= step * take
    return counts
