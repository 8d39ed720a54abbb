"""Distillation from the dense model: its next-token distributions on the calibration windows, kept as top-k, and
the divergence of a student's logits from them.

The teacher is the dense model before compression. One forward pass per window keeps, per position, the k most
likely tokens' log-probabilities and the log of the mass left over (the "rest" bucket), so the vocabulary-wide
distribution is never stored: (windows, seq_len, k) int32 token ids and fp32 log-probabilities, 8 bytes per kept
entry (32 x 512 windows at k 64: 8 MiB; 128 x 2048: 128 MiB).

The divergence is the exact KL between the teacher's and the student's distributions coarsened to k + 1 outcomes
(the teacher's k tokens and "any other token"): it is zero only where the student puts the teacher's mass on
each of the k tokens and on the rest, and it equals the full KL as k grows to the vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class TeacherTopK:
    """The teacher's next-token distributions on the calibration windows, as top-k plus the rest.

    Attributes:
        indices: (n, L, k) int32 token ids, the k most likely at each position.
        logprobs: (n, L, k) fp32 their log-probabilities.
        rest: (n, L) fp32 log of the probability of every other token (-inf where nothing is left).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor

    def window(self, i: int, device: torch.device | str) -> TeacherTopK:
        """Window i (as a batch of one) on ``device``."""
        return TeacherTopK(self.indices[i : i + 1].to(device), self.logprobs[i : i + 1].to(device),
                           self.rest[i : i + 1].to(device))


def _log_rest(logits: torch.Tensor, indices: torch.Tensor, log_total: torch.Tensor) -> torch.Tensor:
    """(..., V) logits, (..., k) kept token ids, (...) logsumexp of the logits -> (...) log mass of the others."""
    others = logits.scatter(-1, indices, float("-inf"))
    return torch.logsumexp(others, dim=-1) - log_total


@torch.no_grad()
def teacher_top_k(model: nn.Module, calib_ids: torch.Tensor, k: int, device: torch.device | str | None = None,
                  progress: bool = False) -> TeacherTopK:
    """The dense model's top-k next-token distributions on each calibration window.

    Args:
        model: the dense causal LM (not modified); it runs where it is, or on ``device`` for the pass.
        calib_ids: (n, L) token windows.
        k: tokens kept per position (at most the vocabulary size).
        device: where the forward passes run (default: the model's device).

    Raises:
        ValueError: k outside [1, vocabulary size], or a window whose logits hold NaN or Inf.
    """
    home = next(model.parameters()).device
    device = torch.device(home if device is None else device)
    was_training = model.training
    model.to(device).eval()
    n, length = calib_ids.shape
    try:
        indices = logprobs = rest = None
        for i in tqdm(range(n), desc="teacher top-k", disable=not progress):
            logits = model(input_ids=calib_ids[i : i + 1].to(device), use_cache=False).logits[0].float()  # (L, V)
            vocab = logits.shape[-1]
            if not 1 <= k <= vocab:
                raise ValueError(f"distillation top-k must be in [1, {vocab}] (the vocabulary), got {k}")
            if not torch.isfinite(logits).all():
                raise ValueError(f"the dense model's logits on calibration window {i} hold NaN or Inf")
            if indices is None:
                indices = torch.empty(n, length, k, dtype=torch.int32)
                logprobs = torch.empty(n, length, k)
                rest = torch.empty(n, length)
            log_total = torch.logsumexp(logits, dim=-1)  # (L,)
            top, idx = logits.topk(k, dim=-1)  # (L, k)
            indices[i] = idx.to(torch.int32).cpu()
            logprobs[i] = (top - log_total[:, None]).cpu()
            rest[i] = _log_rest(logits, idx, log_total).cpu()
    finally:
        model.to(home).train(was_training)
    return TeacherTopK(indices, logprobs, rest)


def top_k_kl(logits: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's k tokens plus the rest.

    Args:
        logits: (B, L, V) student logits.
        teacher: the teacher's (B, L, k) top-k and (B, L) rest for the same windows.

    Returns:
        A scalar (nats per position), differentiable in ``logits``.
    """
    logits = logits.float()
    idx = teacher.indices.long()
    log_total = torch.logsumexp(logits, dim=-1)  # (B, L)
    student_top = logits.gather(-1, idx) - log_total[..., None]  # (B, L, k) student log q of the teacher's tokens
    # (B, L); bounded below so that a rest the student's float range cannot hold costs a large, finite loss
    student_rest = _log_rest(logits, idx, log_total).clamp_min(-100.0)
    p_top, p_rest = teacher.logprobs.exp(), teacher.rest.exp()
    kl_top = (p_top * (teacher.logprobs - student_top)).sum(-1)
    # p log(p / q) is 0 where p is 0, whatever q: a teacher with no mass left contributes nothing for the rest
    kl_rest = torch.where(p_rest > 0, p_rest * (teacher.rest - student_rest), torch.zeros_like(p_rest))
    return (kl_top + kl_rest).mean()
