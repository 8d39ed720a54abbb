"""Dynamic int8 quantization of activations, per group of 16 columns (the ``cpu-a8`` kernel's input).

For every row of x and every 16 consecutive columns: ``xs = amax / 127`` and ``xq = round_half_even(x * (127 /
amax))`` (0 where the group is all zero), all in float32. The native kernel (csrc/kernel_a8.c, ``quantize_x``)
computes the same numbers bit for bit; ``dequantize_activations(quantize_activations(x))`` is what the kernel
multiplies, so the reference op applied to it is the kernel's oracle.
"""

from __future__ import annotations

import torch

ACT_GROUP = 16


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> (xq (M, K) int8, xs (M, K / 16) float32).

    Raises:
        ValueError: K is not a multiple of 16.
    """
    m, k = x.shape
    if k % ACT_GROUP:
        raise ValueError(f"int8 activations come in groups of {ACT_GROUP} columns; in_features {k} is not a multiple")
    g = x.to(torch.float32).reshape(m, k // ACT_GROUP, ACT_GROUP)  # (M, K/16, 16)
    amax = g.abs().amax(dim=-1, keepdim=True)  # (M, K/16, 1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(g * inv).to(torch.int8).reshape(m, k)
    return xq, (amax / 127.0).squeeze(-1)


def dequantize_activations(xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(xq (M, K) int8, xs (M, K / 16)) -> (M, K) float32, xs * xq per group."""
    m, k = xq.shape
    return (xq.to(torch.float32).reshape(m, k // ACT_GROUP, ACT_GROUP) * xs.unsqueeze(-1)).reshape(m, k)
