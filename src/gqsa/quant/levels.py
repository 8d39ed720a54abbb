"""The code range of ``bits``-bit quantization: the largest code and the symmetric zero point (docs/FORMAT.md).

The bottom of the quant layer: ``qparams`` (scales and zero points) and ``quantize`` (codes) both build on it.
"""

from __future__ import annotations


def qmax(bits: int) -> int:
    """Largest code value for ``bits``."""
    return (1 << bits) - 1


def symmetric_zero_point(bits: int) -> int:
    """The fixed zero point of symmetric quantization, 2**(bits-1)."""
    return 1 << (bits - 1)
