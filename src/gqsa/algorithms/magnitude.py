"""Data-free baseline: prune the groups with the smallest L2 norm, round the rest to nearest.

This is the simplest compression into the GQSA format and the floor every calibrated method must beat.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gqsa.config import CompressConfig
from gqsa.format.packed import PackedWeight, quantize_to_packed
from gqsa.quant.masks import group_l2_norms, select_groups, select_groups_across

logger = logging.getLogger(__name__)


def magnitude_masks(weights: dict[str, torch.Tensor], config: CompressConfig) -> dict[str, torch.Tensor]:
    """Keep-masks by group L2 norm under the config's sparsity allocation.

    Args:
        weights: layer name -> (N, K) weight.

    Returns:
        layer name -> (N, K // group_size) bool keep-mask.
    """
    scores = {name: group_l2_norms(w, config.layer_quant(name).group_size) for name, w in weights.items()}
    allocation = config.sparsity.allocation
    if allocation == "model":
        return select_groups_across(scores, config.sparsity.ratio)
    return {name: select_groups(s, config.layer_ratio(name), allocation) for name, s in scores.items()}


def magnitude_pack(linears: dict[str, nn.Linear], config: CompressConfig) -> dict[str, PackedWeight]:
    """Prune by magnitude and quantize each linear layer's weight.

    Returns:
        layer name -> PackedWeight.
    """
    weights = {name: m.weight.detach() for name, m in linears.items()}
    masks = magnitude_masks(weights, config)
    out = {}
    for name in weights:
        q = config.layer_quant(name)
        out[name] = quantize_to_packed(weights[name], masks[name], q.bits, q.group_size, q.symmetric, q.qparam_method)
    return out
