"""A trainable fake-quantized stand-in for PackedLinear, used by BQPO and E2E-OQP.

Pruned groups contribute exact zeros in every forward pass. The mask is fixed unless the layer is built with the
dense weight (``dense=``, mode "weights" only): then the pruned groups keep trainable float weights of their own
(starting from the dense ones, with min-max scales), get the gradient they would get if kept (straight-through
mask), and ``reselect_mask`` chooses the kept groups again from the trained weights, keeping each row's count.
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
from gqsa.quant.qparams import minmax_qparams, qmax, round_scale_fp16, symmetric_zero_point
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
        dense: (N, K) the layer's weight before pruning, in mode "weights" only: the mask becomes learnable (see
            the module docstring) and the pruned groups start from these weights.
    """

    def __init__(
        self, packed: PackedWeight, bias: torch.Tensor | None = None, mode: str = "weights",
        train_zero_point: bool = False, dense: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"FakeQuantLinear mode must be one of {MODES}, got {mode!r}")
        if dense is not None and (mode != "weights" or tuple(dense.shape) != (packed.out_features,
                                                                               packed.in_features)):
            raise ValueError(f"a learnable mask needs mode 'weights' and a dense weight of shape "
                             f"{(packed.out_features, packed.in_features)}, got mode {mode!r} and "
                             f"{tuple(dense.shape)}")
        u = packed.unpack()
        self.mode = mode
        self.bits, self.group_size = packed.bits, packed.group_size
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.symmetric = packed.symmetric
        self.learn_mask = dense is not None
        self.register_buffer("mask", u.mask.clone())  # (N, G) bool
        scale = torch.where(u.mask, u.scale.float(), torch.ones_like(u.scale, dtype=torch.float32))
        zero = (torch.full_like(scale, float(symmetric_zero_point(self.bits))) if u.zero_point is None
                else u.zero_point.float())
        if self.learn_mask:  # the pruned groups: their dense weights, quantized min-max
            dense_groups = to_groups(dense.detach().float().to(scale.device), self.group_size)  # (N, G, g)
            s0, z0 = minmax_qparams(dense_groups, self.bits, self.symmetric)
            scale = torch.where(u.mask, scale, s0.clamp_min(_MIN_SCALE))
            zero = torch.where(u.mask, zero, z0)
        self.scale = nn.Parameter(scale)  # (N, G)
        if self.symmetric:
            self.register_buffer("zero_point", zero)
        elif mode == "weights" or train_zero_point:
            self.zero_point = nn.Parameter(zero)
        else:
            self.register_buffer("zero_point", zero)
        if mode == "weights":
            w = dequantize(u.codes, scale, zero) * u.mask.unsqueeze(-1)  # (N, G, g)
            if self.learn_mask:
                w = torch.where(u.mask.unsqueeze(-1), w, dense_groups)
            self.weight = nn.Parameter(w.reshape(self.out_features, self.in_features))
            self.register_buffer("codes", None)
        else:
            self.register_buffer("codes", u.codes.clone())  # (N, G, g) uint8, frozen
            self.weight = None
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_module(cls, module, mode: str = "weights", train_zero_point: bool = False,
                    dense: torch.Tensor | None = None) -> FakeQuantLinear:
        """From a PackedLinear (its packed weight and bias); ``dense`` makes the mask learnable."""
        return cls(module.packed_weight(), module.bias, mode, train_zero_point, dense).to(module.scale.device)

    def _scale(self) -> torch.Tensor:
        return self.scale.clamp_min(_MIN_SCALE)

    def _quantized_groups(self) -> torch.Tensor:
        """(N, G, g) every group fake-quantized, pruned ones included."""
        if self.mode == "weights":
            w = to_groups(self.weight, self.group_size)  # (N, G, g)
            return fake_quantize(w, self._scale(), self.zero_point, self.bits)
        z = round_ste(self.zero_point).unsqueeze(-1)
        return (self.codes.float() - z) * self._scale().unsqueeze(-1)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float32 weight as the forward pass uses it; pruned groups are exactly zero."""
        keep = self.mask.unsqueeze(-1).float()  # (N, G, 1)
        wq = self._quantized_groups()
        if self.learn_mask:  # value wq * keep; gradient of wq everywhere (straight-through mask)
            w = wq * keep + (wq - wq.detach()) * (1 - keep)
        else:
            w = wq * keep
        return w.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def reselect_mask(self, input_sq: torch.Tensor) -> int:
        """Keep, in each row, the groups with the largest ``sum(w_q**2 * input_sq)`` over their columns, as many
        as the row keeps now (``w_q``: the trained weights, fake-quantized).

        Args:
            input_sq: (K,) mean squared input per column (the diagonal of the layer's Hessian statistics).

        Returns:
            The number of groups that changed from pruned to kept (as many changed the other way).
        """
        if not self.learn_mask:
            raise RuntimeError("reselect_mask needs a layer built with its dense weight (dense=...)")
        d = to_groups(input_sq.float().to(self.scale.device).expand(self.out_features, -1), self.group_size)
        score = (self._quantized_groups().square() * d).sum(-1)  # (N, G)
        counts = self.mask.sum(1, keepdim=True)  # (N, 1)
        rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        new = rank < counts
        revived = int((new & ~self.mask).sum())
        self.mask.copy_(new)
        return revived

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
