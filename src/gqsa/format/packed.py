"""The packed group-sparse weight format (docs/FORMAT.md), one import for all of it.

It is split by concern: gqsa.format.layout (the stored tensors, their index rules, ``dequantize_bsr``),
gqsa.format.packed_weight (``PackedWeight``: one weight, pack / unpack / validate) and gqsa.format.conversions
(``quantize_to_packed``, ``concat_rows``, ``summarize_layers``). Every name stays importable from here.
"""

from gqsa.format.conversions import concat_rows, quantize_to_packed, summarize_layers
from gqsa.format.layout import (
    FORMAT_VERSION,
    INT16_MAX_GROUPS,
    TENSOR_NAMES,
    FormatError,
    check_indices,
    col_indices_dtype,
    dequantize_bsr,
    row_indices,
)
from gqsa.format.packed_weight import PackedWeight, UnpackedWeight

__all__ = [
    "FORMAT_VERSION",
    "INT16_MAX_GROUPS",
    "TENSOR_NAMES",
    "FormatError",
    "PackedWeight",
    "UnpackedWeight",
    "check_indices",
    "col_indices_dtype",
    "concat_rows",
    "dequantize_bsr",
    "quantize_to_packed",
    "row_indices",
    "summarize_layers",
]
