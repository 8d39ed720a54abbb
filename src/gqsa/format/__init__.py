"""The packed block-sparse group-quantized format and its checkpoints."""

from gqsa.format.bitpack import pack_bits, unpack_bits
from gqsa.format.packed import (
    FORMAT_VERSION,
    FormatError,
    PackedWeight,
    UnpackedWeight,
    concat_rows,
    dequantize_bsr,
    quantize_to_packed,
)

__all__ = [
    "FORMAT_VERSION",
    "FormatError",
    "PackedWeight",
    "UnpackedWeight",
    "concat_rows",
    "dequantize_bsr",
    "pack_bits",
    "quantize_to_packed",
    "unpack_bits",
]
