"""A trainable fake-quantized stand-in for GQSALinear, used by BQPO and E2E-OQP.

The group mask is fixed: pruned groups contribute exact zeros in every forward pass and get no gradient.
Two modes:

- ``"weights"`` (BQPO): the float weight, the per-group scales and the zero points are trainable; the forward
  pass fake-quantizes the weight with straight-through rounding (``gqsa.quant.quantize.fake_quantize``).
- ``"qparams"`` (E2E-OQP): the integer codes are frozen; only the scales (and, if asked, the zero points)
  train. The forward pass computes ``scale * (codes - zero_point)``.

``to_packed`` freezes the layer back into the packed format (scales rounded to fp16 first, then codes taken
against the rounded scales, so the packed layer computes what the fake-quantized one did up to that rounding).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gqsa.format.packed import PackedWeight
from gqsa.quant.groups import to_groups
from gqsa.quant.qparams import qmax, round_scale_fp16, symmetric_zero_point
from gqsa.quant.quantize import dequantize, fake_quantize, quantize, round_ste

MODES = ("weights", "qparams")
_MIN_SCALE = 2.0**-24


class FakeQuantLinear(nn.Module):
    """Trainable group-quantized, group-pruned linear layer.

    Args:
        packed: the starting point (e.g. GQSA one-shot's result).
        bias: optional (N,) bias (kept frozen).
        mode: "weights" or "qparams" (see the module docstring).
        train_zero_point: in mode "qparams", also train the zero points (asymmetric layers only).
    """

    def __init__(
        self, packed: PackedWeight, bias: torch.Tensor | None = None, mode: str = "weights",
        train_zero_point: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"FakeQuantLinear mode must be one of {MODES}, got {mode!r}")
        u = packed.unpack()
        self.mode = mode
        self.bits, self.group_size = packed.bits, packed.group_size
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.symmetric = packed.symmetric
        self.register_buffer("mask", u.mask.clone())  # (N, G) bool
        scale = torch.where(u.mask, u.scale.float(), torch.ones_like(u.scale, dtype=torch.float32))
        self.scale = nn.Parameter(scale)  # (N, G)
        zero = (torch.full_like(scale, float(symmetric_zero_point(self.bits))) if u.zero_point is None
                else u.zero_point.float())
        if self.symmetric:
            self.register_buffer("zero_point", zero)
        elif mode == "weights" or train_zero_point:
            self.zero_point = nn.Parameter(zero)
        else:
            self.register_buffer("zero_point", zero)
        if mode == "weights":
            w = dequantize(u.codes, scale, zero) * u.mask.unsqueeze(-1)  # (N, G, g)
            self.weight = nn.Parameter(w.reshape(self.out_features, self.in_features))
            self.register_buffer("codes", None)
        else:
            self.register_buffer("codes", u.codes.clone())  # (N, G, g) uint8, frozen
            self.weight = None
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_module(cls, module, mode: str = "weights", train_zero_point: bool = False) -> FakeQuantLinear:
        """From a GQSALinear (its packed weight and bias)."""
        return cls(module.packed_weight(), module.bias, mode, train_zero_point).to(module.scale.device)

    def _scale(self) -> torch.Tensor:
        return self.scale.clamp_min(_MIN_SCALE)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float32 weight as the forward pass uses it; pruned groups are exactly zero."""
        keep = self.mask.unsqueeze(-1).float()  # (N, G, 1)
        if self.mode == "weights":
            w = to_groups(self.weight, self.group_size)  # (N, G, g)
            wq = fake_quantize(w, self._scale(), self.zero_point, self.bits)
        else:
            z = round_ste(self.zero_point).unsqueeze(-1)
            wq = (self.codes.float() - z) * self._scale().unsqueeze(-1)
        return (wq * keep).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_packed(self) -> PackedWeight:
        """Freeze into the packed format: fp16 scales, integer zero points, codes against them."""
        scale = torch.where(self.mask, round_scale_fp16(self._scale().detach()), torch.ones_like(self.scale))
        zero = self.zero_point.detach().round().clamp(0, qmax(self.bits))
        if self.mode == "weights":
            codes = quantize(to_groups(self.weight.detach(), self.group_size), scale, zero, self.bits)
        else:
            codes = self.codes
        codes = codes * self.mask.unsqueeze(-1)
        return PackedWeight.pack(codes, scale, None if self.symmetric else zero, self.mask, self.bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, mode={self.mode}")
