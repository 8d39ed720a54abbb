"""Perplexity of a causal language model on fixed-length token windows.

Protocol: each window is scored on its own (no context carried over from the previous window); every position
after the first is a target, so a window of ``seq_len`` tokens contributes ``seq_len - 1`` targets; the
perplexity is ``exp`` of the mean negative log-likelihood over all targets of all windows.

The log-softmax runs in float32 over chunks of positions. For the architectures listed in
``_HEAD_ON_HIDDEN_STATES`` the output head itself is applied chunk by chunk to the decoder's hidden states, so a
2048-token window over a 49k-token vocabulary never materialises its full logits (one chunk of at most
``_CHUNK_ELEMENTS`` float32 values at a time); other models are scored from their full ``logits`` output.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["PerplexityResult", "perplexity"]

# Causal LMs whose logits are exactly ``lm_head(last_hidden_state)``, then tanh soft-capped by
# ``config.final_logit_softcapping`` when that is set. For these the head is applied chunk by chunk to the
# decoder's hidden states; any other model is scored from ``model(...).logits``.
# Every entry is checked against ``model(...).logits`` in tests/eval/test_perplexity.py; add a type only with a test.
_HEAD_ON_HIDDEN_STATES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"})

# Float32 logits allowed per chunk (batch x positions x vocab); 2**25 elements is 128 MiB.
_CHUNK_ELEMENTS = 2**25


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a set of windows.

    Attributes:
        ppl: perplexity, ``exp(nll)``.
        nll: mean negative log-likelihood per target token, in nats.
        tokens: number of scored targets, ``windows * (seq_len - 1)``.
        seq_len: window length in tokens.
        windows: number of windows scored.
    """

    ppl: float
    nll: float
    tokens: int
    seq_len: int
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        """The result as a plain dict, ready for JSON."""
        return dataclasses.asdict(self)


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity of a causal LM on independent token windows.

    Runs under ``torch.inference_mode()`` on the device of the model's parameters. For each window of
    ``seq_len`` tokens the tokens at positions ``1 .. seq_len - 1`` are predicted from their prefixes within the
    window; negative log-likelihoods are computed in float32 and summed in float64.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``), in eval mode.
        windows: token ids, shape (n, seq_len), integer dtype, ``seq_len >= 2`` (e.g. from
            :func:`gqsa.data.windows.eval_windows`).
        batch_size: windows per forward pass; does not change the result beyond float rounding.
        progress: show a tqdm progress bar.

    Returns:
        The :class:`PerplexityResult`.

    Raises:
        ValueError: if ``windows`` is not a 2-D integer tensor with at least one window of at least 2 tokens,
            or ``batch_size`` is not positive.
    """
    import torch
    from tqdm.auto import tqdm

    _check_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n_windows, seq_len = windows.shape
    if model.training:
        logger.warning("perplexity: the model is in training mode (dropout is active); call model.eval() first")
    device = next(model.parameters()).device

    total_nll = 0.0  # float64 accumulator
    with torch.inference_mode(), tqdm(
        total=n_windows, desc="perplexity", unit="window", disable=not progress
    ) as bar:
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)  # (B, seq_len)
            total_nll += float(_window_nll_sum(model, batch))
            bar.update(batch.shape[0])

    n_targets = n_windows * (seq_len - 1)
    nll = total_nll / n_targets
    ppl = math.exp(nll) if nll < 700.0 else math.inf
    result = PerplexityResult(ppl=ppl, nll=nll, tokens=n_targets, seq_len=seq_len, windows=n_windows)
    logger.info("perplexity %.4f (nll %.5f) over %d tokens in %d windows", ppl, nll, n_targets, n_windows)
    return result


def _window_nll_sum(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch of windows, as a float64 scalar.

    Args:
        model: a Hugging Face causal LM.
        ids: token ids, shape (B, L), int64, on the model's device.

    Returns:
        Sum over the B * (L - 1) targets of ``-log p(ids[:, t] | ids[:, :t])``, float64 scalar.
    """
    import torch
    import torch.nn.functional as F

    batch, seq_len = ids.shape
    targets = ids[:, 1:]  # (B, L - 1)
    if getattr(model.config, "model_type", None) in _HEAD_ON_HIDDEN_STATES:
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # (B, L - 1, H)
        head = model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        vocab = getattr(head, "out_features", None) or model.config.vocab_size
    else:
        # Unknown head (e.g. scaled logits): trust the model's own logits, still scored chunk by chunk.
        hidden = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, L - 1, V)
        head, softcap, vocab = None, None, hidden.shape[-1]

    chunk = max(1, _CHUNK_ELEMENTS // (batch * vocab))  # positions per chunk
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for pos in range(0, seq_len - 1, chunk):
        part = hidden[:, pos : pos + chunk]  # (B, c, H) or (B, c, V)
        logits = (head(part) if head is not None else part).float()  # (B, c, V)
        if softcap is not None:  # in float32, where Hugging Face caps in the model dtype: same for fp32 models
            logits = torch.tanh(logits / softcap) * softcap
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),  # (B * c, V)
            targets[:, pos : pos + chunk].reshape(-1),  # (B * c,)
            reduction="none",
        )  # (B * c,)
        total += nll.double().sum()
    return total


def _check_windows(windows: torch.Tensor) -> None:
    """Raise ValueError unless ``windows`` is a non-empty (n, seq_len >= 2) integer tensor."""
    from gqsa.data.windows import check_token_ids

    check_token_ids(windows, 2, "windows", "2-D tensor of token ids (n, seq_len)")
    if windows.shape[0] == 0:
        raise ValueError("windows is empty: there is nothing to score")
    if windows.shape[1] < 2:
        raise ValueError(f"windows must have seq_len >= 2 to have a next token to predict, got {windows.shape[1]}")
