"""Every Hugging Face architecture assumption gqsa makes, in one place.

The block-wise compression driver, the evaluation code and the checkpoint code reach into a model only through
these functions: where the decoder blocks are, which linear layers of a block are compressed (and in which order
they run), which of them read the same input, and what a block needs to be called on its own.

Supported (transformers 5.x): ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``Gemma3ForCausalLM`` (``gemma3_text``) and the language model of the multimodal
``Gemma3ForConditionalGeneration`` (``gemma3``; its vision tower and projector are left alone).

Calling blocks one at a time (transformers 5.23)
------------------------------------------------
A model's ``forward`` embeds the tokens, then builds, once for the whole stack, what every decoder layer needs
besides the hidden states, and passes it as keyword arguments::

    hidden = layer(hidden, attention_mask=..., position_embeddings=(cos, sin), position_ids=...,
                   past_key_values=..., use_cache=...)

* ``position_embeddings`` is the rotary ``(cos, sin)`` pair, each ``(1 or B, T, head_dim)``, computed by the
  model's ``rotary_emb`` module (layers no longer own one).
* ``attention_mask`` is the already-built 4D mask of that layer's attention kind, or ``None`` when the attention
  implementation can use its causal fast path (SDPA without padding).
* Gemma 3 (and Qwen2/3 with ``use_sliding_window``) mix ``sliding_attention`` and ``full_attention`` layers, listed
  in ``config.layer_types``: the model builds one mask *and* (Gemma 3) one rotary table per kind -- local layers
  use rope base 10k, global ones 1M -- and hands each layer the pair of its kind.

:func:`capture_block_inputs` does not rebuild any of this: it runs the model's own ``forward`` with every decoder
layer temporarily swapped for a recorder, so it gets exactly what the model would pass to each layer.

The Llama family as the fused decode step sees it
-------------------------------------------------
``gqsa.engine.fused`` computes a decode step of Llama, Mistral, Qwen2 and Qwen3 itself instead of calling the
model's ``forward``. :func:`llama_family_parts` hands it the model's own tensors and modules (which attribute holds
what) and refuses, with an :class:`UnsupportedArchitectureError` that names the reason, every model whose forward
does something that step does not (see its docstring); :func:`rotary_tables` runs the model's own rotary module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# model_type -> (path of the decoder ModuleList, path of the final norm), relative to the *ForCausalLM /
# *ForConditionalGeneration model.
_LAYOUT: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "qwen3": ("model.layers", "model.norm"),
    "gemma3_text": ("model.layers", "model.norm"),
    "gemma3": ("model.language_model.layers", "model.language_model.norm"),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_LAYOUT)

# The compressible linears of one decoder block, relative to the block, in execution order.
_BLOCK_LINEARS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# Linears that read the same input tensor: one Hessian / activation statistic per group.
_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class UnsupportedArchitectureError(ValueError):
    """A model whose architecture gqsa does not know how to take apart."""


class _StopForward(Exception):
    """Raised by the last layer recorder to end a capture forward pass early."""


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _unsupported(model: nn.Module, why: str = "") -> UnsupportedArchitectureError:
    detail = f" ({why})" if why else ""
    return UnsupportedArchitectureError(
        f"{type(model).__name__} with model_type={_model_type(model)!r} is not supported by gqsa{detail}; "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} (as *ForCausalLM models, and gemma3 as "
        f"Gemma3ForConditionalGeneration)."
    )


def check_supported(model: nn.Module) -> str:
    """Check that gqsa can take ``model`` apart, and return its model type.

    Args:
        model: a Hugging Face causal LM.

    Returns:
        ``model.config.model_type``, one of :data:`SUPPORTED_MODEL_TYPES`.

    Raises:
        UnsupportedArchitectureError: the model type is not supported, or the model is not laid out as expected
            (for example a bare ``LlamaModel`` without its language-model head).
    """
    model_type = _model_type(model)
    if model_type not in _LAYOUT:
        raise _unsupported(model)
    layers_path, norm_path = _LAYOUT[model_type]
    for path in (layers_path, norm_path):
        try:
            model.get_submodule(path)
        except AttributeError:
            raise _unsupported(model, f"it has no submodule {path!r}") from None
    if not isinstance(model.get_submodule(layers_path), nn.ModuleList):
        raise _unsupported(model, f"{layers_path!r} is not an nn.ModuleList")
    return model_type


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``, in execution order.

    Args:
        model: a supported Hugging Face causal LM.

    Returns:
        The model's own ``nn.ModuleList`` of decoder layers (not a copy: replacing an entry changes the model).

    Raises:
        UnsupportedArchitectureError: see :func:`check_supported`.
    """
    model_type = check_supported(model)
    return model.get_submodule(_LAYOUT[model_type][0])


def block_prefix(model: nn.Module, index: int) -> str:
    """The module name of decoder block ``index``, as in ``model.named_modules()``, e.g. ``"model.layers.3"``.

    Args:
        model: a supported Hugging Face causal LM.
        index: block index, ``0 <= index < num_blocks``.

    Returns:
        The block's full module name.

    Raises:
        UnsupportedArchitectureError: see :func:`check_supported`.
        IndexError: ``index`` is out of range.
    """
    layers = decoder_layers(model)
    if not 0 <= index < len(layers):
        raise IndexError(f"block index {index} is out of range for a model with {len(layers)} decoder blocks")
    return f"{_LAYOUT[_model_type(model)][0]}.{index}"


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the output of the last decoder block, before the LM head.

    Args:
        model: a supported Hugging Face causal LM.

    Returns:
        The model's final norm module.

    Raises:
        UnsupportedArchitectureError: see :func:`check_supported`.
    """
    model_type = check_supported(model)
    return model.get_submodule(_LAYOUT[model_type][1])


def logits_from_hidden_states(model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Finish a forward pass from the output of the last decoder block: final norm, LM head, logit soft-capping.

    Args:
        model: a supported Hugging Face causal LM.
        hidden_states: ``(B, T, D)`` output of the last decoder block, in the model's dtype.

    Returns:
        ``(B, T, vocab_size)`` logits, as the model's own ``forward`` computes them.

    Raises:
        UnsupportedArchitectureError: see :func:`check_supported`.
    """
    logits = model.get_output_embeddings()(final_norm(model)(hidden_states))
    # Gemma3ForCausalLM soft-caps its logits when its config asks for it; the multimodal Gemma3 class never does
    # and its top-level config has no such field, so reading the top-level config matches both.
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def block_projections(block: nn.Module) -> dict[str, nn.Module]:
    """The modules at the linear-layer names of one decoder block, whatever they are now (``nn.Linear``, a packed
    or a trainable compressed layer), in execution order. See :func:`block_linears`."""
    return {name: block.get_submodule(name) for name in _BLOCK_LINEARS}


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The compressible linear layers of one decoder block, in execution order.

    Args:
        block: one decoder layer of a supported model (an element of :func:`decoder_layers`).

    Returns:
        ``{name: module}`` with names relative to the block: ``self_attn.q_proj``, ``self_attn.k_proj``,
        ``self_attn.v_proj``, ``self_attn.o_proj``, ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj``.

    Raises:
        UnsupportedArchitectureError: the block lacks one of these submodules.
        TypeError: one of them is not an ``nn.Linear`` (for example already replaced by a packed layer).
    """
    linears = {}
    for name in _BLOCK_LINEARS:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            raise UnsupportedArchitectureError(
                f"decoder block {type(block).__name__} has no submodule {name!r}; gqsa expects "
                f"{', '.join(_BLOCK_LINEARS)} in every block (supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})"
            ) from None
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"{name} of decoder block {type(block).__name__} is a {type(module).__name__}, not an nn.Linear"
            )
        linears[name] = module
    return linears


def input_groups(block: nn.Module) -> list[list[str]]:
    """The linears of ``block`` grouped by the input tensor they read, in execution order.

    ``q/k/v`` read the normed block input, ``o`` the attention output, ``gate/up`` the normed residual stream and
    ``down`` the gated MLP activation, so one input statistic (e.g. a Hessian ``X^T X``) serves each group.

    Args:
        block: one decoder layer of a supported model.

    Returns:
        A new list of groups of names relative to the block (names as in :func:`block_linears`).

    Raises:
        UnsupportedArchitectureError, TypeError: see :func:`block_linears`.
    """
    block_linears(block)  # validates the block
    return [list(group) for group in _INPUT_GROUPS]


def compressible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """All compressible linears of ``model``: the seven of every decoder block, never the LM head or embeddings.

    Args:
        model: a supported Hugging Face causal LM.

    Returns:
        ``{full_module_name: module}`` (names as in ``model.named_modules()``), block by block in execution order.

    Raises:
        UnsupportedArchitectureError, TypeError: see :func:`check_supported` and :func:`block_linears`.
    """
    linears = {}
    for index, block in enumerate(decoder_layers(model)):
        prefix = block_prefix(model, index)
        for name, module in block_linears(block).items():
            linears[f"{prefix}.{name}"] = module
    return linears


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer during a capture: records its call and passes the hidden states through."""

    def __init__(self, index: int, records: dict[int, tuple[tuple, dict]], stop: bool) -> None:
        super().__init__()
        self.index = index
        self.records = records
        self.stop = stop

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.records[self.index] = (args, kwargs)
        if self.stop:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


def capture_block_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The first block's input hidden states and the keyword arguments each decoder block is called with.

    Runs the model's own ``forward`` (under ``torch.no_grad``, with ``use_cache=False``) with every decoder layer
    temporarily replaced by a recorder that passes its input through; the last recorder raises a private
    exception, so the final norm and LM head never run and no layer computes anything. The layers are put back
    even if the forward fails.

    A block-wise driver then runs the blocks one at a time::

        hidden, block_kwargs = capture_block_inputs(model, input_ids)
        for i, block in enumerate(decoder_layers(model)):
            hidden = block(hidden, **block_kwargs[i])      # (B, T, D)
        logits = logits_from_hidden_states(model, hidden)  # == model(input_ids).logits

    The kwargs are per block because they differ between layer kinds: Gemma 3 (and Qwen2/3 with sliding windows)
    give ``sliding_attention`` and ``full_attention`` layers different masks, and Gemma 3 different rotary tables.
    Blocks of the same kind share the same dict object. Each dict holds ``position_embeddings`` (the ``(cos, sin)``
    rotary pair), ``attention_mask`` (a 4D mask for batch ``B``, or ``None`` for the causal fast path),
    ``position_ids``, ``past_key_values=None`` and (for some models) ``use_cache=False``. The masks are built for
    this batch, so call the blocks with hidden states of the same ``(B, T)``.

    Args:
        model: a supported Hugging Face causal LM, normally in eval mode.
        input_ids: ``(B, T)`` int64 token ids.
        attention_mask: optional ``(B, T)`` 0/1 padding mask, as for the model's ``forward``.

    Returns:
        ``(hidden_states, block_kwargs)``: the ``(B, T, D)`` input of the first block (embeddings, scaled where
        the architecture scales them) and a list with one kwargs dict per decoder block.

    Raises:
        UnsupportedArchitectureError: see :func:`check_supported`.
        ValueError: ``input_ids`` is not a 2D tensor.
        RuntimeError: the forward pass ended without calling every decoder layer.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    layers = decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)

    originals = list(layers)
    records: dict[int, tuple[tuple, dict]] = {}
    for i in range(len(originals)):
        layers[i] = _LayerRecorder(i, records, stop=i == len(originals) - 1)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer

    if len(records) != len(originals):
        raise RuntimeError(
            f"the forward pass of {type(model).__name__} called {len(records)} of its {len(originals)} decoder "
            "layers; cannot capture their inputs"
        )
    args, _ = records[0]
    hidden_states = args[0] if args else records[0][1]["hidden_states"]
    block_kwargs = []
    for i in range(len(originals)):
        args, kwargs = records[i]
        block_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if len(args) > 1:
            raise RuntimeError(
                f"decoder layer {i} of {type(model).__name__} was called with {len(args)} positional arguments; "
                "gqsa expects only the hidden states to be positional"
            )
    return hidden_states, _share_equal_kwargs(block_kwargs)


def _share_equal_kwargs(block_kwargs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Let blocks whose kwargs hold the very same objects share one dict (cheaper to keep, easy to inspect)."""
    shared: list[dict[str, Any]] = []
    result = []
    for kwargs in block_kwargs:
        for candidate in shared:
            if candidate.keys() == kwargs.keys() and all(candidate[k] is kwargs[k] for k in kwargs):
                kwargs = candidate
                break
        else:
            shared.append(kwargs)
        result.append(kwargs)
    return result


# ---- the Llama family, as the fused decode step computes it (gqsa.engine.fused) ---------------------------------

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
    """One decoder block: its norms and linear modules (``nn.Linear``, ``GQSALinear``, ...), the model's own.

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
