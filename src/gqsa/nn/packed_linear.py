"""``PackedLinear``: an inference linear layer holding a packed group-sparse weight as buffers.

``GQSALinear`` is its former name, kept as an alias (the same class) for users' code and pickled models.
"""

from __future__ import annotations

import torch
from torch import nn

from gqsa.format.packed import TENSOR_NAMES, PackedWeight
from gqsa.ops.backends import Backend
from gqsa.ops.direct import BoundLinear, bind_linear


class PackedLinear(nn.Module):
    """Linear layer whose weight is stored in the packed format (docs/FORMAT.md); calls ``gqsa::linear``.

    The format tensors are buffers, so they move with ``.to(device)`` and appear in ``state_dict()`` as
    ``crow_indices``, ``col_indices``, ``values``, ``scale``, ``zero_point`` (asymmetric only) and ``bias``.
    A dtype change (``model.to(torch.bfloat16)``) casts only the bias: the fp16 scales are part of the format.

    ``forward`` calls the registered op whenever autograd, tracing or a tensor subclass is involved. Otherwise
    (plain inference) it calls the same kernel through a function bound once to the buffers
    (``gqsa.ops.direct``), which skips the op's per-call dispatch and checks and gives the same result; the
    binding is redone when a buffer or ``backend`` changes. Under ``torch.compile`` for inference, a layer that
    an eager call has bound to the native CPU kernel emits the internal ``gqsa::linear_direct`` op (checked when
    traced, not per call) instead of ``gqsa::linear``. ``fast_path = False`` turns both off.

    Args:
        in_features, out_features: dense weight is (out_features, in_features).
        bits, group_size, symmetric: the quantization of the kept groups.
        nnz: number of kept groups (fixes the buffer shapes before loading).
        bias: whether the layer has a bias.
        dtype: dtype of the bias (the activations' dtype).
        device: where to create the (empty) buffers; "meta" for a skeleton that a state dict fills.
        backend: "auto", "reference" or a registered kernel name.
    """

    fast_path: bool = True
    _bound: BoundLinear | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        nnz: int,
        symmetric: bool = False,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = Backend.AUTO.value,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.backend = backend
        meta = {
            "out_features": out_features,
            "in_features": in_features,
            "group_size": group_size,
            "bits": bits,
            "symmetric": symmetric,
            "nnz": nnz,
        }
        for name, (shape, tdtype) in PackedWeight.expected_shapes(meta).items():
            self.register_buffer(name, torch.zeros(shape, dtype=tdtype, device=device))
        if symmetric:
            self.zero_point = None
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_packed(
        cls, packed: PackedWeight, bias: torch.Tensor | None = None, backend: str = Backend.AUTO.value
    ) -> PackedLinear:
        """Wrap a PackedWeight (tensors are shared, not copied)."""
        module = cls(
            packed.in_features,
            packed.out_features,
            bits=packed.bits,
            group_size=packed.group_size,
            nnz=packed.nnz,
            symmetric=packed.symmetric,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
            device="meta",
            backend=backend,
        )
        for name, tensor in packed.tensors().items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias = bias.detach()
        return module

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def nnz(self) -> int:
        return int(self.col_indices.numel())

    def packed_weight(self) -> PackedWeight:
        """The layer's weight as a PackedWeight (shares the buffers)."""
        return PackedWeight(
            **{name: getattr(self, name) for name in TENSOR_NAMES},
            out_features=self.out_features,
            in_features=self.in_features,
            group_size=self.group_size,
            bits=self.bits,
        )

    def metadata(self) -> dict:
        """What a loader needs to rebuild this layer empty (see ``PackedWeight.metadata``), plus ``bias``."""
        return {**self.packed_weight().metadata(), "bias": self.bias is not None}

    def _sources(self) -> tuple:
        b = self._buffers
        return (b["crow_indices"], b["col_indices"], b["values"], b["scale"], self.zero_point, self.bias)

    def bound(self) -> BoundLinear:
        """The direct kernel call for the current buffers and backend (bound on first use, then reused)."""
        sources = self._sources()
        if self._bound is None or not self._bound.is_bound_to(sources, self.backend):
            self._bound = bind_linear(*sources, self.out_features, self.in_features, self.group_size, self.bits,
                                      self.backend)
        return self._bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inference = self.fast_path and not (x.requires_grad and torch.is_grad_enabled())
        if torch.compiler.is_compiling():
            bound = self._bound  # bound by an eager call before compiling: its native kernel mode, if any
            if (inference and bound is not None and bound.native_mode is not None and bound.backend == self.backend
                    and x.device.type == "cpu"):
                return torch.ops.gqsa.linear_direct(
                    x, self.crow_indices, self.col_indices, self.values, self.scale, self.zero_point, self.bias,
                    self.out_features, self.in_features, self.group_size, self.bits, bound.native_mode,
                )
        elif inference and type(x) is torch.Tensor:
            return self.bound()(x)
        return torch.ops.gqsa.linear(
            x,
            self.crow_indices,
            self.col_indices,
            self.values,
            self.scale,
            self.zero_point,
            self.bias,
            self.out_features,
            self.in_features,
            self.group_size,
            self.bits,
            self.backend,
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_bound"] = None  # a closure over raw pointers: rebuilt after unpickling
        return state

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the fp16 scales; keep the format's dtype and take only the device move.
        self._bound = None  # buffers are replaced (and may leave the CPU): bind again on the next call
        scale = self._buffers["scale"]
        super()._apply(fn, recurse)
        moved = self._buffers["scale"]
        if moved.dtype != torch.float16:
            self._buffers["scale"] = scale.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        sparsity = self.packed_weight().sparsity if self.scale.device.type != "meta" else float("nan")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, nnz={self.nnz}, "
            f"sparsity={sparsity:.3f}, bias={self.bias is not None}, backend={self.backend!r}"
        )


GQSALinear = PackedLinear  # the former name; the same class (checkpoint files record no class name)
