"""Modules: the packed inference linear layer and embedding table."""

from gqsa.nn.packed_embedding import PackedEmbedding
from gqsa.nn.packed_linear import GQSALinear, PackedLinear

__all__ = ["GQSALinear", "PackedEmbedding", "PackedLinear"]
