"""Every Hugging Face architecture assumption gqsa makes, in one place.

The block-wise compression driver, the evaluation code and the checkpoint code reach into a model only through
these functions: where the decoder blocks are, which linear layers of a block are compressed (and in which order
they run), which of them read the same input, and what a block needs to be called on its own.

Supported (transformers 5.x): ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``Gemma3ForCausalLM`` (``gemma3_text``) and the language model of the multimodal
``Gemma3ForConditionalGeneration`` (``gemma3``; its vision tower and projector are left alone).

Calling a block on its own: the model's ``forward`` builds, once for the stack, what each decoder layer needs
besides the hidden states and passes it as keywords (``attention_mask``: the 4D mask of that layer's attention
kind, or ``None`` on the causal fast path; ``position_embeddings``: the rotary ``(cos, sin)``, each
``(1 or B, T, head_dim)``; ``position_ids``, ``past_key_values``, ``use_cache``). Models that mix
``sliding_attention`` and ``full_attention`` layers (``config.layer_types``: Gemma 3, Qwen2/3 with
``use_sliding_window``) build one mask, and Gemma 3 one rotary table, per kind. :func:`capture_block_inputs`
rebuilds none of this: it runs the model's own ``forward`` with every decoder layer swapped for a recorder.

The fused decode step's view of a Llama-family block is ``gqsa.models.llama_parts``.
"""

from __future__ import annotations

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
