"""Quantize, dequantize and fake-quantize (straight-through) with per-group scale and zero point.

Shapes: ``w`` is (..., g); ``scale`` and ``zero_point`` are (...) and broadcast over the last dimension.
"""

from __future__ import annotations

import torch

from gqsa.quant.levels import qmax


def quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero_point, 0, 2**bits - 1)`` as uint8, shape of ``w``."""
    q = w.float() / scale.unsqueeze(-1).float()  # the one float intermediate; the rest in place
    return q.round_().add_(zero_point.unsqueeze(-1).float()).clamp_(0, qmax(bits)).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Float32 weights ``scale * (codes - zero_point)``, shape of ``codes``."""
    return (codes.float() - zero_point.unsqueeze(-1).float()) * scale.unsqueeze(-1).float()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize, differentiable in ``w``, ``scale`` and ``zero_point``.

    Rounding uses the straight-through estimator; clamping passes gradient only inside the code range, so
    clipped weights give their gradient to the scale (as in LSQ / OmniQuant / EfficientQAT). The zero point
    is rounded with the straight-through estimator too, so it stays an integer in the forward pass.

    Returns:
        Tensor of the shape and dtype of ``w``.
    """
    s = scale.unsqueeze(-1)
    z = round_ste(zero_point.unsqueeze(-1))
    q = torch.clamp(round_ste(w / s) + z, 0, qmax(bits))
    return ((q - z) * s).to(w.dtype)
