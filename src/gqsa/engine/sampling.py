"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling, as pure functions."""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution: softmax of ``logits / temperature``, restricted to the top-p nucleus.

    The nucleus is the smallest set of most probable tokens whose probabilities sum to at least ``top_p`` (the
    most probable token is always kept); the rest get probability 0 and the kept ones are renormalised.

    Args:
        logits: (..., vocab) float logits.
        temperature: > 0.
        top_p: in (0, 1]; 1 keeps every token.

    Returns:
        (..., vocab) float32 probabilities summing to 1 over the last dimension.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (..., V)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (..., V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (..., V) probability of the more probable tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``logits``: argmax when ``temperature`` is 0, else a draw from ``logits_to_probs``.

    Args:
        logits: (batch, vocab) logits of the last position.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus mass in (0, 1] (sampling only).
        generator: the random source of the draws (a seeded one makes sampling reproducible).

    Returns:
        (batch,) int64 token ids.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_p)  # (batch, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
