"""Modules: the packed inference linear layer (and, later, the trainable fake-quantized one)."""

from gqsa.nn.packed_linear import GQSALinear

__all__ = ["GQSALinear"]
