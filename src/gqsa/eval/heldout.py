"""The documented perplexity protocol on held-out text.

Protocol: take the held-out part of the corpus (the last 20% of its documents, never used for calibration),
tokenize it without special tokens, cut the first ``max_tokens`` tokens into non-overlapping windows of
``seq_len`` tokens, score each window independently (every token after the first of a window is predicted),
and report exp(mean negative log-likelihood) over all predicted tokens.
"""

from __future__ import annotations

from gqsa.data.corpora import load_text
from gqsa.data.windows import eval_windows, tokenize_text
from gqsa.eval.perplexity import perplexity
from gqsa.models.checks import check_context_length

HELDOUT_FRACTION = 0.2


def heldout_windows(model, tokenizer, source: str, seq_len: int = 2048, max_tokens: int | None = 16384):
    """The protocol's token windows of ``source`` for ``model`` (its config only: a lazily loaded model's blocks
    may still be on the meta device), with every check ``heldout_perplexity`` makes before it scores.

    Returns:
        (n_windows, seq_len) token ids.

    Raises:
        ValueError: ``seq_len`` exceeds the model's context (checked before the text is read), a source that
            cannot be read, or a text too short for one window.
    """
    check_context_length(model, seq_len, "the evaluation window length (seq_len; --seq-len, --eval-seq-len)")
    text = load_text(source, "heldout", heldout_fraction=HELDOUT_FRACTION)
    return eval_windows(tokenize_text(tokenizer, text), seq_len, max_tokens)


def heldout_perplexity(
    model,
    tokenizer,
    source: str,
    seq_len: int = 2048,
    max_tokens: int | None = 16384,
    batch_size: int = 1,
    progress: bool = True,
    windows=None,
) -> dict:
    """Perplexity of ``model`` on the held-out part of ``source`` (a corpus name or a text/jsonl path).

    ``windows``: ``heldout_windows``' result for the same source and settings when it is already built (a model
    measured before and after compressing); None builds it here.

    Returns:
        {"ppl", "nll", "tokens" (predicted tokens scored), "seq_len", "windows", "dataset", "max_tokens",
        "heldout_fraction"}.

    Raises:
        ValueError: ``seq_len`` exceeds the model's context (checked before the text is read), or the text is
            too short for one window.
    """
    if windows is None:
        windows = heldout_windows(model, tokenizer, source, seq_len, max_tokens)
    result = perplexity(model, windows, batch_size=batch_size, progress=progress)
    return {
        **result.to_dict(),
        "dataset": str(source),
        "max_tokens": max_tokens,
        "heldout_fraction": HELDOUT_FRACTION,
    }
