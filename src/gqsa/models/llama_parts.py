"""The Llama family as the fused decode step sees it (``gqsa.engine.fused``).

``gqsa.engine.fused`` computes a decode step of Llama, Mistral, Qwen2 and Qwen3 itself instead of calling the
model's ``forward``. :func:`llama_family_parts` hands it the model's own tensors and modules (which attribute holds
what) and refuses, with an :class:`UnsupportedArchitectureError` that names the reason, every model whose forward
does something that step does not (see its docstring); :func:`rotary_tables` runs the model's own rotary module.
The rest of gqsa's architecture assumptions are in ``gqsa.models.adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gqsa.models.adapter import (
    UnsupportedArchitectureError,
    _model_type,
    block_projections,
    check_supported,
    decoder_layers,
    final_norm,
)

# Model types whose forward is: embedding; per block x += o(attn(norm(x))), x += down(silu(gate(n)) * up(n)) with
# n = norm(x); final norm; LM head. Qwen2 adds q/k/v biases (ordinary linear biases), Qwen3 an RMSNorm over each
# head of q and k before the rotary embedding.
FUSED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
_RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# Rope types whose frequencies depend on the sequence length seen so far (transformers' dynamic_rope_update):
# a table computed once for all positions would differ from what the model computes step by step.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class RMSNormParts:
    """An RMSNorm ``weight * x / sqrt(mean(x**2) + eps)`` over the last dimension: weight (D,), the model's own."""

    weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class BlockParts:
    """One decoder block: its norms and linear modules (``nn.Linear``, ``PackedLinear``, ...), the model's own.

    ``q_norm`` / ``k_norm`` (Qwen3) normalise each head of q and k (weight (head_dim,)) before the rotary
    embedding; None elsewhere. ``scaling`` multiplies q k^T (the attention module's own).
    """

    input_norm: RMSNormParts
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: RMSNormParts | None
    k_norm: RMSNormParts | None
    scaling: float
    post_attention_norm: RMSNormParts
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module


@dataclass(frozen=True)
class DecoderParts:
    """What a Llama-family causal LM computes with, as :func:`llama_family_parts` found it.

    embedding: the input embedding module (not scaled): an ``nn.Embedding`` or a ``gqsa.nn.PackedEmbedding``.
    rotary: the model's rotary module (see
    :func:`rotary_tables`). sliding_window: the smallest attention window of any block, None when every block
    attends to the whole sequence (the step is exact while the sequence is no longer than the window).
    """

    model_type: str
    embedding: nn.Module
    rotary: nn.Module
    blocks: tuple[BlockParts, ...]
    final_norm: RMSNormParts
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None


def _rms_norm_parts(module: nn.Module, where: str, model: nn.Module) -> RMSNormParts:
    if type(module).__name__ not in _RMS_NORM_CLASSES or not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise _unsupported_fused(model, f"{where} is a {type(module).__name__}, not one of the RMSNorms "
                                        f"{sorted(_RMS_NORM_CLASSES)}")
    return RMSNormParts(module.weight, float(module.variance_epsilon))


def _unsupported_fused(model: nn.Module, why: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"the fused decode step does not implement {type(model).__name__} (model_type={_model_type(model)!r}): "
        f"{why}; it implements {', '.join(FUSED_MODEL_TYPES)} with full (or long enough sliding-window) "
        "attention, SiLU MLPs and rotary embeddings whose tables do not depend on the sequence length"
    )


def llama_family_parts(model: nn.Module) -> DecoderParts:
    """The tensors and modules a Llama-family model computes with, for a forward pass written outside the model.

    Checks that the model's own forward is exactly: embedding (unscaled); in every block
    ``x += o_proj(sdpa(rope(q), rope(k), v))`` on ``input_norm(x)`` and ``x += down_proj(silu(gate_proj(n)) *
    up_proj(n))`` on ``n = post_attention_norm(x)``; final norm; LM head; no logit or attention soft-capping.

    Args:
        model: a Hugging Face causal LM in eval mode.

    Returns:
        DecoderParts holding the model's own tensors and modules (nothing is copied).

    Raises:
        UnsupportedArchitectureError: a model type other than :data:`FUSED_MODEL_TYPES` (Gemma 3 scales its
            embeddings, has four norms per block, GELU MLPs and per-kind rotary tables), a model in training mode
            (attention dropout), an activation other than SiLU, a rope type whose tables depend on the sequence
            length (``dynamic``, ``longrope``), soft-capping, or a module that is not where or what it should be.
    """
    model_type = check_supported(model)
    if model_type not in FUSED_MODEL_TYPES:
        raise _unsupported_fused(model, "its model type has its own forward")
    config = model.config
    if model.training:
        raise _unsupported_fused(model, "the model is in training mode (attention dropout); call model.eval()")
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        raise _unsupported_fused(model, f"hidden_act={getattr(config, 'hidden_act', None)!r} is not SiLU")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise _unsupported_fused(model, f"{name}={getattr(config, name)}")
    from gqsa.nn.packed_embedding import PackedEmbedding

    embedding = model.get_input_embeddings()
    if type(embedding) not in (nn.Embedding, PackedEmbedding):
        raise _unsupported_fused(model, f"its input embedding is a {type(embedding).__name__}, not an nn.Embedding "
                                        "or a PackedEmbedding")
    try:
        rotary = model.get_submodule("model.rotary_emb")
    except AttributeError:
        raise _unsupported_fused(model, "it has no model.rotary_emb") from None
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type in _LENGTH_DEPENDENT_ROPE:
        raise _unsupported_fused(model, f"rope type {rope_type!r} (its tables depend on the sequence length)")
    inv_freq = getattr(rotary, "inv_freq", None)
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    blocks, head_dims, windows = [], set(), []
    for i, layer in enumerate(decoder_layers(model)[: config.num_hidden_layers]):
        try:
            attn, mlp = layer.self_attn, layer.mlp
            projections = block_projections(layer)
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
        except AttributeError as exc:
            raise _unsupported_fused(model, f"decoder block {i}: {exc}") from None
        head_dim = attn.head_dim
        head_dims.add(head_dim)
        q_norm = k_norm = None
        if model_type == "qwen3":
            q_norm = _rms_norm_parts(attn.q_norm, f"block {i} self_attn.q_norm", model)
            k_norm = _rms_norm_parts(attn.k_norm, f"block {i} self_attn.k_norm", model)
        elif hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise _unsupported_fused(model, f"block {i} normalises q/k, which {model_type} does not")
        if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
            raise _unsupported_fused(model, f"block {i} mlp.act_fn is a {type(mlp.act_fn).__name__}")
        # Mistral's attention reads config.sliding_window; Qwen2/3 set attn.sliding_window on sliding layers only
        window = getattr(config, "sliding_window", None) if model_type == "mistral" else \
            getattr(attn, "sliding_window", None)
        if window is not None:
            windows.append(int(window))
        for name in ("q_proj", "k_proj", "v_proj"):
            heads = num_heads if name == "q_proj" else num_kv_heads
            if getattr(projections[f"self_attn.{name}"], "out_features", None) != heads * head_dim:
                raise _unsupported_fused(model, f"block {i} self_attn.{name} does not give {heads} heads of "
                                                f"{head_dim}")
        blocks.append(BlockParts(
            input_norm=_rms_norm_parts(norms[0], f"block {i} input_layernorm", model),
            q_proj=projections["self_attn.q_proj"], k_proj=projections["self_attn.k_proj"],
            v_proj=projections["self_attn.v_proj"], o_proj=projections["self_attn.o_proj"],
            q_norm=q_norm, k_norm=k_norm, scaling=float(attn.scaling),
            post_attention_norm=_rms_norm_parts(norms[1], f"block {i} post_attention_layernorm", model),
            gate_proj=projections["mlp.gate_proj"], up_proj=projections["mlp.up_proj"],
            down_proj=projections["mlp.down_proj"],
        ))
    if len(head_dims) != 1:
        raise _unsupported_fused(model, f"its blocks have different head dimensions {sorted(head_dims)}")
    head_dim = next(iter(head_dims))
    if not isinstance(inv_freq, torch.Tensor) or 2 * inv_freq.numel() != head_dim:
        raise _unsupported_fused(model, "its rotary embedding does not rotate the whole head (partial rotary)")
    return DecoderParts(
        model_type=model_type, embedding=embedding, rotary=rotary, blocks=tuple(blocks),
        final_norm=_rms_norm_parts(final_norm(model), "the final norm", model), lm_head=model.get_output_embeddings(),
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        sliding_window=min(windows) if windows else None,
    )


def rotary_tables(rotary: nn.Module, length: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary embedding at positions ``0 .. length - 1``, computed by the model's rotary module.

    Position p's rows are what the model's forward uses at position p (for rope types whose tables do not
    depend on the sequence length; :func:`llama_family_parts` refuses the others), attention scaling included.

    Args:
        rotary: the model's rotary module (``DecoderParts.rotary``).
        length: number of positions.
        dtype: the activations' dtype (the model casts the tables to it).

    Returns:
        ``(cos, sin)``, each (length, head_dim) in ``dtype``; the forward computes ``x * cos + rotate_half(x) *
        sin`` with ``rotate_half(x) = cat(-x[..., half:], x[..., :half])``.
    """
    positions = torch.arange(length, device=device).unsqueeze(0)  # (1, L)
    with torch.no_grad():
        cos, sin = rotary(torch.empty(1, dtype=dtype, device=device), positions)  # (1, L, head_dim) each
    return cos[0], sin[0]
