"""Zero-shot scoring by log-likelihood, the way lm-evaluation-harness scores ``loglikelihood`` requests.

A request is a (context, continuation) pair. Its tokens are those lm-eval's Hugging Face model (``HFLM``, 0.4.x,
default arguments) gives it: trailing whitespace of the context moves to the front of the continuation, the
tokenizer encodes ``context + continuation`` and ``context`` alone (with its own default special tokens), and the
continuation is what the whole encoding has beyond the context's; an empty context is replaced by the BOS (else
EOS) token, and so is an all-whitespace one (on which lm-eval fails). ``context + continuation`` minus its last
token is the input, left-truncated to the model's maximum length, and the log-probabilities of the continuation
tokens are read off the last ``len(continuation)`` positions and summed. Requests are sorted by length (longest
first), right-padded and scored ``batch_size`` at a time with one forward pass per batch (requests with identical
inputs share a row); right padding needs no attention mask in a causal model, so a request's score does not
depend on its batch beyond float rounding. The output head runs only on the positions that are scored.

Metrics, as lm-eval computes them:

* multiple choice: ``acc`` picks the choice with the largest summed log-likelihood; ``acc_norm`` divides each by
  the number of characters of the answer (the continuation without the one space that separates it from the
  context: lm-eval's ``target_delimiter`` is not counted);
* greedy (lambada): ``acc`` counts a document when every continuation token is the argmax of its position, and
  ``ppl`` is ``exp(-mean(log-likelihood of the target))`` over documents;
* standard errors are binomial, ``sqrt(p (1 - p) / (n - 1))`` (lm-eval's sample standard error of a 0/1 mean).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from typing import TYPE_CHECKING, Sequence

from gqsa.eval.tasks import Document, TaskSpec, check_limit, load_documents, parse_tasks

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "TaskResult",
    "binomial_stderr",
    "encode_pair",
    "evaluate_task",
    "evaluate_tasks",
    "loglikelihoods",
    "max_length",
    "task_metrics",
]

DEFAULT_BATCH_SIZE = 16
# lm-eval's fallback context length when neither the config nor the tokenizer gives one.
_DEFAULT_MAX_LENGTH = 2048
_SEQLEN_CONFIG_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")
# Tokenizers without a length limit report this as model_max_length (transformers' VERY_LARGE_INTEGER).
_TOKENIZER_INFINITY = int(1e30)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Zero-shot scores of one task.

    Attributes:
        task: task name.
        n: documents scored.
        acc: accuracy (multiple choice: argmax of summed log-likelihood; greedy: the target is the greedy output).
        stderr: binomial standard error of ``acc`` (None with fewer than 2 documents).
        acc_norm: accuracy of the per-character normalised log-likelihood (multiple choice only).
        acc_norm_stderr: its standard error.
        ppl: ``exp(-mean target log-likelihood)`` over documents (greedy tasks only).
        requests: (context, continuation) pairs scored.
        seconds: wall time of the scoring.
    """

    task: str
    n: int
    acc: float
    stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    ppl: float | None = None
    requests: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float | int | str | None]:
        """The result as a plain dict for JSON; the metrics a task does not define are left out."""
        undefined = {"acc_norm", "acc_norm_stderr"} if self.acc_norm is None else set()
        undefined |= {"ppl"} if self.ppl is None else set()
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in undefined}


def _prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand in for an empty context")
    return token


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens, none if it already starts with BOS."""
    starts_with_prefix = text.startswith(tokenizer.decode(_prefix_token_id(tokenizer)))
    return tokenizer.encode(text, **({"add_special_tokens": False} if starts_with_prefix else {}))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split exactly as lm-eval's ``HFLM`` splits them.

    Args:
        tokenizer: a Hugging Face tokenizer.
        context: the conditioning text (may be empty).
        continuation: the text to score, usually starting with a space.

    Returns:
        ``(context_ids, continuation_ids)``: the model reads ``context_ids + continuation_ids`` without its last
        token (left-truncated to its maximum length) and is scored on ``continuation_ids``.

    Raises:
        ValueError: the continuation has no token of its own.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "A" -> "Answer:" + " A", the way the text is tokenized as one string
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        cont_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        ctx_ids, cont_ids = ([prefix], cont_ids) if cont_ids[:1] != [prefix] else (cont_ids[:1], cont_ids[1:])
    else:
        whole = _encode(tokenizer, context + continuation)
        ctx_ids = _encode(tokenizer, context)
        cont_ids = whole[len(ctx_ids):]
    if not cont_ids:
        raise ValueError(f"continuation {continuation!r} after context {context[-40:]!r} has no token to score")
    return ctx_ids, cont_ids


def max_length(model, tokenizer) -> int:
    """Longest input the model is scored on: its config's context length, else the tokenizer's, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attr in _SEQLEN_CONFIG_ATTRS:
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < _TOKENIZER_INFINITY else _DEFAULT_MAX_LENGTH


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _continuation_logits(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at the given positions only.

    Args:
        model: a Hugging Face causal LM.
        ids: input ids, shape (B, L), int64.
        positions: sorted distinct positions, shape (P,), int64, on the device of ``ids``.

    Returns:
        Logits, shape (B, P, V), in the model's dtype.
    """
    if _accepts_logits_to_keep(model):  # the head runs on P positions instead of L: less time and memory
        return model(input_ids=ids, use_cache=False, logits_to_keep=positions).logits
    return model(input_ids=ids, use_cache=False).logits[:, positions]


def _score_batch(model, inputs: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
    """Summed continuation log-likelihood and greedy match of each request of one right-padded batch.

    Requests with the same input (choices of one token after a shared context, such as boolq's " yes" / " no")
    share one row of the forward pass, as lm-eval's logits cache makes them do.

    Args:
        model: a Hugging Face causal LM, in eval mode.
        inputs: per request, the input ids (``context + continuation`` minus the last token, left-truncated).
        continuations: per request, the continuation ids; they are the last ``len(continuation)`` targets.

    Returns:
        Per request ``(loglikelihood, is_greedy)``: the float64 sum of the float32 log-probabilities of the
        continuation tokens, and whether every one of them is the argmax at its position.
    """
    import torch

    device = next(model.parameters()).device
    unique = list(dict.fromkeys(tuple(row) for row in inputs))  # distinct inputs, in batch order
    row_of = {row: i for i, row in enumerate(unique)}
    ids = torch.zeros((len(unique), max(map(len, unique))), dtype=torch.long)  # (R, L), right-padded with token 0
    for i, row in enumerate(unique):
        ids[i, : len(row)] = torch.tensor(row)
    # Per request, the positions whose logits predict its continuation tokens.
    spans = [torch.arange(len(row) - len(cont), len(row)) for row, cont in zip(inputs, continuations)]
    positions = torch.unique(torch.cat(spans))  # (P,) sorted
    logits = _continuation_logits(model, ids.to(device), positions.to(device))  # (R, P, V)
    results = []
    for row, span, cont in zip(inputs, spans, continuations):
        kept = torch.searchsorted(positions, span).to(device)  # (C,) indices into the kept positions
        logprobs = torch.log_softmax(logits[row_of[tuple(row)], kept].float(), dim=-1)  # (C, V)
        target = torch.tensor(cont, device=device)  # (C,)
        token_lp = logprobs.gather(-1, target[:, None])[:, 0]  # (C,)
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        results.append((float(token_lp.double().sum()), greedy))
    return results


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, and whether it is the greedy output.

    Args:
        model: a Hugging Face causal LM (dense or gqsa-compressed), in eval mode.
        tokenizer: its tokenizer.
        requests: ``(context, continuation)`` pairs.
        batch_size: requests per forward pass; does not change the results beyond float rounding.
        progress: show a tqdm progress bar (in requests).
        desc: the progress bar's label.

    Returns:
        ``(loglikelihood, is_greedy)`` per request, in the order given: the same pair lm-eval's
        ``LM.loglikelihood`` returns.

    Raises:
        ValueError: ``batch_size`` is not positive, or a continuation has no token or is longer than the model's
            maximum length.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if model.training:
        logger.warning("loglikelihoods: the model is in training mode (dropout is active); call model.eval() first")
    limit = max_length(model, tokenizer)
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    too_long = [i for i, (_, cont) in enumerate(encoded) if len(cont) > limit]
    if too_long:
        raise ValueError(f"request {too_long[0]}: continuation longer than the model's {limit} positions")
    # Longest first, then by tokens, as lm-eval does: similar lengths share a batch (and requests with the same
    # input end up side by side), and running out of memory happens at once.
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i][0]) - len(encoded[i][1]),
                                                       encoded[i][0] + encoded[i][1]))
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, unit="req", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = [(encoded[i][0] + encoded[i][1])[-(limit + 1) :][:-1] for i in batch]
            for i, result in zip(batch, _score_batch(model, inputs, [encoded[i][1] for i in batch])):
                results[i] = result
            bar.update(len(batch))
    return results  # type: ignore[return-value]


def binomial_stderr(p: float, n: int) -> float | None:
    """Standard error of a mean of ``n`` 0/1 outcomes with mean ``p``: ``sqrt(p (1 - p) / (n - 1))``.

    Returns:
        The standard error, or None for ``n < 2``.
    """
    return math.sqrt(p * (1 - p) / (n - 1)) if n >= 2 else None


def _answer_chars(continuation: str) -> int:
    """Characters of the answer, without the separating space that lm-eval's acc_norm does not count."""
    return len(continuation) - 1 if continuation.startswith(" ") else len(continuation)


def _argmax(values: Sequence[float]) -> int:
    """Index of the first largest value, as ``numpy.argmax``."""
    return max(range(len(values)), key=values.__getitem__)


def task_metrics(spec: TaskSpec, documents: Sequence[Document], results: Sequence[tuple[float, bool]]) -> TaskResult:
    """The metrics of a task from the scores of its documents' requests.

    Args:
        spec: the task.
        documents: its documents.
        results: ``(loglikelihood, is_greedy)`` per request, documents' requests concatenated in order.

    Returns:
        The :class:`TaskResult` (``seconds`` left at 0).

    Raises:
        ValueError: no document, or the number of results is not the number of requests.
    """
    n = len(documents)
    if n == 0:
        raise ValueError(f"{spec.name}: no document to score")
    if len(results) != sum(len(d.requests) for d in documents):
        raise ValueError(f"{spec.name}: {len(results)} results for {sum(len(d.requests) for d in documents)} requests")
    if spec.kind == "greedy":
        acc = sum(greedy for _, greedy in results) / n
        mean_ll = sum(ll for ll, _ in results) / n
        ppl = math.exp(-mean_ll) if -mean_ll < 700 else math.inf
        return TaskResult(spec.name, n, acc, binomial_stderr(acc, n), ppl=ppl, requests=len(results))
    correct = correct_norm = 0
    offset = 0
    for doc in documents:
        lls = [ll for ll, _ in results[offset : offset + len(doc.requests)]]
        offset += len(doc.requests)
        correct += _argmax(lls) == doc.gold
        norm = [ll / max(_answer_chars(cont), 1) for ll, (_, cont) in zip(lls, doc.requests)]
        correct_norm += _argmax(norm) == doc.gold
    acc, acc_norm = correct / n, correct_norm / n
    return TaskResult(spec.name, n, acc, binomial_stderr(acc, n), acc_norm, binomial_stderr(acc_norm, n),
                      requests=len(results))


def evaluate_task(
    model,
    tokenizer,
    spec: TaskSpec | str,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> TaskResult:
    """Score a model zero-shot on the first ``limit`` documents of a packaged task.

    Args:
        model: a Hugging Face causal LM (dense or gqsa-compressed), in eval mode.
        tokenizer: its tokenizer.
        spec: a :class:`TaskSpec`, a task name (see :data:`gqsa.eval.tasks.TASKS`) or an lm-eval alias of one
            (:data:`gqsa.eval.tasks.ALIASES`).
        limit: documents (not requests) to score, from the start of the file; None for all.
        batch_size: requests per forward pass.
        progress: show a progress bar.

    Returns:
        The :class:`TaskResult`.
    """
    if isinstance(spec, str):
        (spec,) = parse_tasks([spec])
    documents = load_documents(spec, limit)
    start = time.perf_counter()
    requests = [pair for doc in documents for pair in doc.requests]
    results = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress, desc=spec.name)
    result = dataclasses.replace(task_metrics(spec, documents, results), seconds=time.perf_counter() - start)
    logger.info("%s: acc %.4f over %d documents (%d requests) in %.1f s", spec.name, result.acc, result.n,
                result.requests, result.seconds)
    return result


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> list[TaskResult]:
    """Score a model zero-shot on several packaged tasks, one after the other.

    Args:
        tasks: comma-separated names or a list of names, lm-eval aliases accepted (validated before anything is
            scored).
        limit, batch_size, progress, model, tokenizer: see :func:`evaluate_task`.

    Returns:
        One :class:`TaskResult` per task, in the order given.

    Raises:
        ValueError: an unknown task name (the known ones are listed) or a bad ``limit`` / ``batch_size``.
    """
    specs = parse_tasks(tasks)
    check_limit(limit)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [evaluate_task(model, tokenizer, spec, limit, batch_size, progress) for spec in specs]
