"""A trainable linear layer with a fixed weight mask: block-wise weight reconstruction of the float pruning
baselines (SparseGPT / Wanda at 2:4 or unstructured), so they get the same training budget as GQSA's BQPO."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MaskedLinear(nn.Module):
    """``y = x (W * mask)^T + b`` with W trainable and the mask fixed (pruned weights stay exactly zero).

    Args:
        linear: the pruned nn.Linear; its zero weights define the mask.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.register_buffer("mask", w != 0)  # (N, K) bool
        self.weight = nn.Parameter(w.clone().float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._dtype = w.dtype

    def masked_weight(self) -> torch.Tensor:
        """(N, K) weight as the forward pass uses it."""
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the masked weight."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self._dtype)
        out.weight.copy_(self.masked_weight().to(self._dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out
