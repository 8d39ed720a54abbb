"""The registered op ``torch.ops.gqsa.linear`` and its backends.

This package is the only place that may import Triton or the native extension, and only lazily.
"""

from gqsa.ops.backends import Backend, Kernel, available_backends, register_kernel
from gqsa.ops.linear import gqsa_linear, packed_linear, reference_linear
from gqsa.ops import cpu  # noqa: E402,F401  registers the native "cpu" kernels (extension imported lazily)
from gqsa.ops import gpu  # noqa: E402,F401  registers the "triton" kernels (triton imported lazily)
from gqsa.ops import gpu_a8  # noqa: E402,F401  registers "triton-a8" (triton imported lazily)

__all__ = [
    "Backend",
    "Kernel",
    "available_backends",
    "gqsa_linear",
    "packed_linear",
    "reference_linear",
    "register_kernel",
]
