"""Pure tensor math: group quantization parameters, (fake-)quantization, group scores and masks."""

from gqsa.quant.groups import expand_group_mask, from_groups, to_groups
from gqsa.quant.masks import group_l2_norms, select_groups, select_groups_across
from gqsa.quant.qparams import group_qparams, minmax_qparams, mse_qparams, qmax, symmetric_zero_point
from gqsa.quant.quantize import dequantize, fake_quantize, quantize, round_ste

__all__ = [
    "dequantize",
    "expand_group_mask",
    "fake_quantize",
    "from_groups",
    "group_l2_norms",
    "group_qparams",
    "minmax_qparams",
    "mse_qparams",
    "qmax",
    "quantize",
    "round_ste",
    "select_groups",
    "select_groups_across",
    "symmetric_zero_point",
    "to_groups",
]
