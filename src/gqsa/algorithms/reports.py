"""Per-layer reports: how far a compressed weight is from the dense one, and what it costs to store."""

from __future__ import annotations

import torch

from gqsa.format.float_sparse_bits import float_sparse_bits_per_weight
from gqsa.format.packed import PackedWeight


def error_report(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None = None) -> dict:
    """How far ``approx`` is from ``weight``, both (N, K).

    ``relative_error`` is ||W - Wq||_F / ||W||_F; with calibration statistics H, ``output_error`` is the relative
    error of the layer's output on the calibration inputs, tr(D H D^T) / tr(W H W^T) with D = Wq - W.
    """
    w = weight.detach().float()
    diff = approx.detach().float().to(w.device) - w
    report = {"relative_error": float(diff.norm() / w.norm().clamp_min(1e-12))}
    if hessian is not None:  # one (N, K) product at a time, multiplied in place
        num = (diff @ hessian).mul_(diff).sum()
        den = (w @ hessian).mul_(w).sum().clamp_min(1e-12)
        report["output_error"] = float(num / den)
    return report


def layer_report(name: str, weight: torch.Tensor, packed: PackedWeight, hessian: torch.Tensor | None = None) -> dict:
    """Errors (``error_report``) and storage of one layer compressed into the packed format."""
    return {
        "layer": name,
        "shape": [packed.out_features, packed.in_features],
        **error_report(weight, packed.dequantize(), hessian),
        "sparsity": packed.sparsity,
        "bits_per_weight": packed.bits_per_weight(),
    }


def float_layer_report(
    name: str, weight: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor, pattern: str,
    hessian: torch.Tensor | None = None,
) -> dict:
    """Errors and storage (``float_sparse_bits_per_weight``) of one layer pruned in float."""
    density = float(mask.float().mean())
    return {
        "layer": name,
        "shape": list(weight.shape),
        **error_report(weight, pruned, hessian),
        "sparsity": 1.0 - density,
        "bits_per_weight": float_sparse_bits_per_weight(density, pattern),
    }
