"""Checks of a model before any work starts: every weight finite, every window within the model's context.

Both fail with a ValueError that names what is wrong (the tensor and its non-finite values; the window length and
the context), so a bad model or option is refused at once instead of surfacing later as a NaN perplexity, an
all-NaN checkpoint or an attention error deep in a calibration pass.
"""

from __future__ import annotations

from torch import nn

from gqsa.utils.finite import describe_nonfinite

def check_finite_weights(model: nn.Module, source: str = "the model") -> None:
    """Refuse a model with a NaN or Inf in any floating parameter or buffer.

    Args:
        model: any module.
        source: where the model came from (a path), for the message.

    Raises:
        ValueError: naming the first tensor that holds a non-finite value, how many it holds and of which kind.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        problem = describe_nonfinite(tensor)
        if problem is not None:
            raise ValueError(f"{source}: tensor {name} holds {problem}; the weights are corrupted (gqsa needs "
                             "finite weights)")


def max_context_length(model_or_config) -> int | None:
    """The number of positions the model was built for (``max_position_embeddings``), or None when unknown.

    The text config is read too (``config.get_text_config()``), so a multimodal model's language model counts.

    Args:
        model_or_config: a transformers model or its config.

    Returns:
        The smallest ``max_position_embeddings`` among the config and its text config, or None.
    """
    config = getattr(model_or_config, "config", model_or_config)
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    limits = [getattr(c, "max_position_embeddings", None) for c in configs]
    limits = [n for n in limits if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    return min(limits) if limits else None


def check_context_length(model_or_config, seq_len: int, what: str = "the window length (seq_len)") -> None:
    """Refuse windows longer than the model's context.

    Args:
        model_or_config: a transformers model or its config.
        seq_len: tokens per window.
        what: what ``seq_len`` is and which option sets it, for the message.

    Raises:
        ValueError: ``seq_len`` exceeds ``max_position_embeddings``, naming both numbers.
    """
    limit = max_context_length(model_or_config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{what} is {seq_len} tokens, more than the model's context of {limit} tokens "
                         f"(max_position_embeddings); use at most {limit}")
