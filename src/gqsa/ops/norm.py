"""RMSNorm with an optional residual add in one native call, for the decode step.

At batch 1 a norm is a few hundred floats: ``torch.nn.functional.rms_norm``'s several small aten calls cost far
more than the arithmetic, and the fused decode step (``gqsa.engine.fused``) makes two norms and two residual
adds per block. :func:`add_rms_norm` does the add and the norm in one call of the native extension
(csrc/kernel_scalar.c ``add_rms_norm``) for float32 CPU tensors (timings: docs/RESULTS.md, "Measurements behind
code constants"). Elsewhere (other dtypes or devices, the extension not built, or under ``torch.compile``, which
can trace and fuse the torch ops) it runs in torch.
Both give transformers' LlamaRMSNorm, ``weight * (x * rsqrt(mean(x^2) + eps))``, up to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqsa.ops import cpu


def _native_ok(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None) -> bool:
    tensors = (x, weight) if delta is None else (x, weight, delta)
    return (not torch.compiler.is_compiling() and all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors)
            and (delta is None or delta.shape == x.shape) and cpu.available())


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``x += delta`` in place (when ``delta`` is given), then the RMSNorm of x over its last dimension.

    Args:
        x: (..., n) activations; updated in place when ``delta`` is given (so it must not need autograd).
        weight: (n,) scale of the norm.
        eps: added to the mean square.
        delta: (..., n) like x, or None.

    Returns:
        (..., n) ``weight * x / sqrt(mean(x^2, -1) + eps)``, a new tensor in x's dtype (float32 on the native
        path; other dtypes normalise in float32 and cast back before scaling, as transformers does).
    """
    native = _native_ok(x, weight, delta)
    if delta is not None and not native:
        x.add_(delta)
        delta = None
        native = _native_ok(x, weight, None)
    if native:
        n = x.shape[-1]
        out = torch.empty_like(x)
        cpu._extension().add_rms_norm(x.data_ptr(), 0 if delta is None else delta.data_ptr(), weight.data_ptr(),
                                      out.data_ptr(), x.numel() // n, n, float(eps))
        return out
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)
