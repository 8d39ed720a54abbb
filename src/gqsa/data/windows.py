"""Token streams and fixed-length windows cut from them, for calibration and perplexity.

Evaluation windows are non-overlapping and taken from the start of the held-out tokens, so a result is
reproducible from (text, tokenizer, seq_len, max_tokens) alone. Calibration windows start at random offsets
drawn from a seeded generator, as in GPTQ-style calibration.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = ["tokenize_text", "eval_windows", "calibration_windows"]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text into one token stream, without special tokens.

    The text is encoded in a single call, never in pieces: tokenizers differ in how they treat a piece's first
    characters (SentencePiece adds a prefix space, and byte-level BPE pre-tokenizers may merge the blank lines
    between documents with what follows), so concatenating per-document encodings does not in general equal
    encoding the text. Fast (Rust) tokenizers encode a few megabytes in seconds, so one call is affordable.
    The "sequence length is longer than the specified maximum" warning is silenced: the stream is cut into
    windows afterwards.

    Args:
        tokenizer: a Hugging Face tokenizer (anything called as ``tokenizer(text, add_special_tokens=False)``
            that returns ``input_ids``).
        text: the text to encode.

    Returns:
        Token ids, shape (T,), dtype int64.

    Raises:
        ValueError: if ``text`` is empty or encodes to no tokens.
    """
    import torch

    if not text:
        raise ValueError("cannot tokenize an empty text")
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    tokens = torch.tensor(encoded["input_ids"], dtype=torch.long)  # (T,)
    if tokens.numel() == 0:
        raise ValueError(f"text of {len(text)} characters encodes to no tokens")
    logger.debug("tokenized %d characters into %d tokens", len(text), tokens.numel())
    return tokens


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of a token stream, for perplexity.

    Window ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len]``. Only full windows are kept: the stream (or
    its first ``max_tokens`` tokens) is cut down to a multiple of ``seq_len``.

    Args:
        tokens: token ids, shape (T,), integer dtype (e.g. held-out text from :func:`tokenize_text`).
        seq_len: window length, at least 1.
        max_tokens: use at most this many tokens from the start, rounded down to a multiple of ``seq_len``;
            None uses every full window.

    Returns:
        Windows, shape (n, seq_len), dtype int64, a copy of the tokens.

    Raises:
        ValueError: if ``tokens`` is not a 1-D integer tensor, ``seq_len`` or ``max_tokens`` is not positive,
            or fewer than ``seq_len`` tokens are available.
    """
    import torch

    _check_tokens(tokens)
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
    available = tokens.numel() if max_tokens is None else min(tokens.numel(), max_tokens)
    n = available // seq_len
    if n == 0:
        limit = "" if max_tokens is None else f" (max_tokens={max_tokens})"
        raise ValueError(
            f"only {available} tokens available{limit}, fewer than one window of seq_len={seq_len}; "
            f"the text has {tokens.numel()} tokens"
        )
    if n * seq_len < tokens.numel():
        logger.debug("eval windows: using %d of %d tokens", n * seq_len, tokens.numel())
    return tokens[: n * seq_len].to(torch.long).reshape(n, seq_len).clone()  # (n, seq_len)


def calibration_windows(tokens: torch.Tensor, n_windows: int, seq_len: int, seed: int) -> torch.Tensor:
    """Windows starting at random offsets of a token stream, for calibration.

    Start offsets are drawn uniformly from ``[0, T - seq_len]`` (with replacement, so windows may overlap)
    by a ``torch.Generator`` seeded with ``seed``: the same arguments always give the same windows.

    Args:
        tokens: token ids, shape (T,), integer dtype (e.g. calibration text from :func:`tokenize_text`).
        n_windows: number of windows, at least 1.
        seq_len: window length, at least 1.
        seed: seed of the generator that draws the start offsets.

    Returns:
        Windows, shape (n_windows, seq_len), dtype int64.

    Raises:
        ValueError: if ``tokens`` is not a 1-D integer tensor, ``n_windows`` or ``seq_len`` is not positive,
            or the stream is shorter than ``seq_len``.
    """
    import torch

    _check_tokens(tokens)
    if n_windows < 1:
        raise ValueError(f"n_windows must be at least 1, got {n_windows}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if tokens.numel() < seq_len:
        raise ValueError(
            f"calibration text has only {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_windows,), generator=generator)  # (n_windows,)
    index = starts[:, None] + torch.arange(seq_len)  # (n_windows, seq_len)
    return tokens.to(torch.long)[index.to(tokens.device)]  # (n_windows, seq_len)


def check_token_ids(t, dim: int, name: str, what: str) -> None:
    """Raise ValueError unless ``t`` is a ``dim``-D integer tensor; ``what`` describes the expected shape."""
    import torch

    if not isinstance(t, torch.Tensor) or t.dim() != dim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {what}, got {shape}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")


def _check_tokens(tokens: torch.Tensor) -> None:
    """Raise ValueError unless ``tokens`` is a 1-D integer tensor."""
    check_token_ids(tokens, 1, "tokens", "1-D tensor of token ids")
