"""Packing the LM head and the input embedding table of a model (sparsity 0, round to nearest per group)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from gqsa.models.surgery import set_submodule
from gqsa.nn.packed_embedding import PackedEmbedding
from gqsa.nn.packed_linear import PackedLinear

logger = logging.getLogger(__name__)


def _untie_word_embeddings(model: nn.Module) -> None:
    """``tie_word_embeddings = False`` in the model's config and its text config (multimodal models have both)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def pack_lm_head(
    model: nn.Module, bits: int = 4, group_size: int = 16, symmetric: bool = False, qparam_method: str = "minmax"
) -> PackedLinear:
    """Store the LM head in the packed format at sparsity 0: every group kept, rounded to nearest per group.

    A small model's LM head is one of its largest matrices (SmolLM2-135M: 49152 x 576, as many weights as 50 of
    its decoder linear layers) and is read in full for every generated token. A head tied to the input
    embeddings is untied (``config.tie_word_embeddings`` becomes False): the embeddings stay dense for the
    lookup, and the packed head is saved and loaded like any packed layer.

    Args:
        model: a transformers causal LM whose output embedding is an ``nn.Linear``.
        bits, group_size, symmetric, qparam_method: the quantization (``gqsa.QuantSpec``'s meaning).

    Returns:
        The new PackedLinear, already swapped into the model.

    Raises:
        ValueError: the head is already packed or not a linear layer, or the quantization is invalid for it.
    """
    from gqsa.config import QuantSpec
    from gqsa.format.packed import quantize_to_packed

    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, qparam_method=qparam_method)
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if isinstance(head, PackedLinear):
        raise ValueError(f"the LM head {name!r} is already packed")
    if not isinstance(head, nn.Linear) or name is None:
        raise ValueError(f"the LM head must be an nn.Linear, got {type(head).__name__}")
    spec.check_in_features(head.in_features, layer=name)
    weight = head.weight.detach()  # (vocab, hidden)
    keep = torch.ones(head.out_features, head.in_features // group_size, dtype=torch.bool)  # (vocab, G)
    packed = quantize_to_packed(weight, keep, bits, group_size, symmetric, qparam_method).to(weight.device)
    bias = None if head.bias is None else head.bias.detach()
    layer = PackedLinear.from_packed(packed, bias)
    set_submodule(model, name, layer)
    _untie_word_embeddings(model)
    logger.info("LM head %s packed: W%d g%d, %.2f bits per weight", name, spec.bits, spec.group_size,
                packed.bits_per_weight())
    return layer


def pack_embedding(
    model: nn.Module, bits: int = 8, group_size: int = 16, symmetric: bool = False, qparam_method: str = "minmax"
) -> PackedEmbedding:
    """Store the input embedding table in the packed format at sparsity 0 (lookups dequantize their rows).

    Shrinks the model: the dense table is released unless something else still holds it. A head tied to the
    embeddings holds it, so pack the LM head first (``pack_lm_head`` unties it); a dense head that shared the table
    keeps it as its own weight (the model is untied). ``gqsa.save`` stores the packed table, and loading such a
    checkpoint never builds the dense one.

    Args:
        model: a transformers causal LM whose input embedding is a plain ``nn.Embedding``.
        bits, group_size, symmetric, qparam_method: the quantization (``gqsa.QuantSpec``'s meaning).

    Returns:
        The new PackedEmbedding, already set as the model's input embedding.

    Raises:
        ValueError: the embedding is not a plain nn.Embedding (already packed, or scaled as Gemma's), or the
            quantization is invalid for it.
    """
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"the input embedding must be a plain nn.Embedding, got {type(embedding).__name__}")
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        logger.warning("the LM head is tied to the input embedding and keeps the dense table in memory; "
                       "pack the LM head first (pack_lm_head) to release it")
        _untie_word_embeddings(model)
    packed = PackedEmbedding.from_embedding(embedding, bits, group_size, symmetric, qparam_method)
    model.set_input_embeddings(packed)
    logger.info("input embedding packed: W%d g%d, %.2f bits per weight", bits, group_size,
                packed.packed_weight().bits_per_weight())
    return packed
