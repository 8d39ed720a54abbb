"""The decode loop: ``prefill`` the prompt into a static KV cache, then ``decode_one_token`` until done.

Shaped like gpt-fast's ``generate.py``: small functions, one static cache allocated up front, the LM head applied
to the last prompt position only, and per token nothing but the model step, the choice of the next token and
one host read of it (to stop at end of sequence and to stream).

Two steps compute the same logits. For Llama, Mistral, Qwen2 and Qwen3 the default is the fused step
(``gqsa.engine.fused``: the forward written out with the fewest torch calls, its own KV cache, q/k/v and gate/up
packed layers called once each). Every other model, and any setting the fused step does not implement exactly
(sliding-window attention shorter than the sequence, length-dependent rope, ...), goes through the model's own
``forward`` with transformers' ``StaticCache`` (``prefill`` / ``decode_one_token`` here), so every supported
architecture keeps its own attention code; ``GenerationSpec.fused`` chooses. ``GenerationSpec.compile`` compiles
the decode step with ``torch.compile``; it is off by default because on the CPU it did not pay for itself (see
benchmarks/results/e2e_cpu_*.md).

    model, tokenizer = gqsa.load("out/smollm2-w4s50")
    use_fastest_backend(model)
    ids = encode_prompt(tokenizer, "What is the capital of France?")
    result = generate(model, ids, GenerationSpec(max_new_tokens=32), eos_token_ids(model, tokenizer))
    print(tokenizer.decode(result.tokens))
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from gqsa.engine.sampling import sample

logger = logging.getLogger(__name__)

CACHE_BUCKET = 256


@dataclass(frozen=True)
class GenerationSpec:
    """How to generate.

    Args:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus mass in (0, 1] when sampling.
        seed: seed of the sampling generator (same seed, same tokens).
        stop_at_eos: stop after an end-of-sequence token (False: always ``max_new_tokens``, for benchmarks).
        compile: ``torch.compile`` the decode step (compiles on the first call).
        fused: the fused decode step (``gqsa.engine.fused``): None uses it where the model is supported and
            falls back to the model's own forward (logged) elsewhere, True requires it (an unsupported model is
            an error), False always runs the model's own forward.
        cuda_graph: replay the fused decode step from a CUDA graph (``gqsa.engine.graph_step``): None does so
            on CUDA devices when the fused step runs and ``compile`` is off, True requires it, False never.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    compile: bool = False
    fused: bool | None = None
    cuda_graph: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.fused not in (None, True, False):
            raise ValueError(f"fused must be None (where supported), True or False, got {self.fused!r}")
        if self.cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be None (on CUDA), True or False, got {self.cuda_graph!r}")
        if self.cuda_graph and (self.compile or self.fused is False):
            raise ValueError("cuda_graph replays the fused decode step: it needs fused (not False) and no compile")


@dataclass
class GenerationResult:
    """New tokens and where the time went.

    tokens: (n,) int64, n <= max_new_tokens (ends with the end-of-sequence token if one stopped it).
    prompt_tokens: length of the prompt.
    first_token_s: prompt in, first new token out (prefill + its sampling): the time to first token.
    decode_s: from the first new token to the last (n - 1 decode steps).
    step: which decode step ran: "fused" (``gqsa.engine.fused``), "fused, cuda graph" (replayed from a CUDA
        graph, ``gqsa.engine.graph_step``) or "model" (the model's own forward).
    """

    tokens: torch.Tensor
    prompt_tokens: int
    first_token_s: float
    decode_s: float
    step: str = "model"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.first_token_s

    @property
    def decode_tok_s(self) -> float:
        steps = self.tokens.numel() - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids of ``prompt``: through the tokenizer's chat template (a user turn) when it has one and ``chat``.

    Returns:
        (1, T) int64.

    Raises:
        ValueError: an empty prompt.
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def eos_token_ids(model: nn.Module, tokenizer=None) -> tuple[int, ...]:
    """End-of-sequence ids: the model's generation config's (int or list) and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.extend(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def use_fastest_backend(model: nn.Module, backend: str = "auto") -> str:
    """Point every packed layer at one kernel and return its name: by default the one ``backend="auto"`` picks for
    their device, else ``backend`` (any kernel serving that device, approximate ones such as ``cpu-a8`` included).

    The registry orders kernels by priority (the fastest exact one first); naming it explicitly makes the choice
    visible and saves the lookup. "reference" when no kernel serves the device, "dense" when the model has no
    packed layer.

    Raises:
        ValueError: ``backend`` is not a kernel available for the layers' device (the message lists those that are).
    """
    from gqsa.nn.packed_linear import PackedLinear
    from gqsa.ops import available_backends, reference_linear
    from gqsa.ops.backends import select_kernel

    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not layers:
        logger.info("no packed layer: the model runs on torch's dense kernels")
        return "dense"
    device_type = layers[0].values.device.type
    if backend == "auto":
        auto = select_kernel("auto", device_type, reference_linear)
        names = available_backends(device_type)[2:]  # after "auto" and "reference"
        backend = next((n for n in names if select_kernel(n, device_type, reference_linear) is auto), "reference")
    else:
        usable = available_backends(device_type, approximate=True)
        if backend not in usable:
            raise ValueError(f"backend {backend!r} is not available for {device_type} here; available: "
                             f"{', '.join(usable)}")
    for layer in layers:
        layer.backend = backend
    logger.info("%d packed layers on %s use gqsa backend %r", len(layers), device_type, backend)
    return backend


def new_cache(model: nn.Module, max_len: int):
    """A static KV cache for one sequence of up to ``max_len`` tokens (allocated on the first forward)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def prefill(model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt through the model into ``cache``; the LM head sees the last position only.

    Args:
        input_ids: (1, T) int64.

    Returns:
        (1, vocab) logits of the last position.
    """
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)  # (1, T)
    out = model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1]


def decode_one_token(model: nn.Module, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
    """One decode step.

    Args:
        token: (1, 1) int64, the last token.
        position: (1, 1) int64, its position.

    Returns:
        (1, vocab) logits for the next token.
    """
    out = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


@functools.cache
def _compiled_decode_one_token():
    return torch.compile(decode_one_token, dynamic=False, fullgraph=True)


def cache_length(tokens: int, compiled: bool, limit: int | None) -> int:
    """KV cache slots for ``tokens``: exact, or rounded up to a multiple of 256 when the step is compiled, so
    that prompts and lengths that differ a little reuse one compiled graph (its shapes include the cache's)."""
    if not compiled:
        return tokens
    rounded = -(-tokens // CACHE_BUCKET) * CACHE_BUCKET
    return min(rounded, limit) if limit is not None else rounded


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    spec: GenerationSpec = GenerationSpec(),
    eos_ids: tuple[int, ...] = (),
    streamer=None,
) -> GenerationResult:
    """Generate up to ``spec.max_new_tokens`` tokens after ``input_ids`` (batch 1).

    Args:
        model: a transformers causal LM (dense or with PackedLinear layers), in eval mode.
        input_ids: (1, T) int64 prompt, T >= 1.
        spec: length, sampling and compilation settings.
        eos_ids: end-of-sequence ids (ignored when ``spec.stop_at_eos`` is False).
        streamer: optional object with ``put(ids)`` / ``end()`` (transformers' ``TextStreamer``): it receives the
            prompt, then every new token as it is chosen.

    Returns:
        GenerationResult with the new tokens and the time to first token and of decoding.

    Raises:
        ValueError: input_ids not (1, T) with T >= 1, or prompt plus new tokens longer than the model's context.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (1, T) with T >= 1 (batch 1), got shape {tuple(input_ids.shape)}")
    prompt_len = input_ids.shape[1]
    total = prompt_len + spec.max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and total > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({spec.max_new_tokens}) = {total} exceeds "
                         f"the model's context of {limit} tokens")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    decoder = fused_decoder_for(model, spec, total)
    if spec.cuda_graph and decoder is None:
        raise ValueError("cuda_graph needs the fused decode step, which cannot run this model (see the log)")
    graph = decoder is not None and use_cuda_graph(spec, device)
    cache_len = cache_length(total, spec.compile or graph, limit)  # graphs too are kept per cache length
    step_name = "model" if decoder is None else "fused"
    generator = torch.Generator(device=device).manual_seed(spec.seed) if spec.temperature > 0 else None
    stop = set(eos_ids) if spec.stop_at_eos else set()
    if decoder is None:
        cache = new_cache(model, cache_len)
        hf_step = _compiled_decode_one_token() if spec.compile else decode_one_token

        def first_logits(ids: torch.Tensor) -> torch.Tensor:
            return prefill(model, ids, cache)

        def next_logits(token: torch.Tensor, position: int) -> torch.Tensor:
            return hf_step(model, token.view(1, 1), torch.tensor([[position]], device=device), cache)  # (1, V)
    else:
        if graph:
            graph_step = graph_step_for(decoder, cache_len)  # captured once per decoder and cache length
            cache = graph_step.cache
            step_name = "fused, cuda graph"

            def next_logits(token: torch.Tensor, position: int) -> torch.Tensor:
                return graph_step(token, position)  # (1, V)
        else:
            cache = decoder.new_cache(cache_len)
            fused_step = decoder.compiled_decode_one_token() if spec.compile else decoder.decode_one_token

            def next_logits(token: torch.Tensor, position: int) -> torch.Tensor:
                return fused_step(token.view(1, 1), position, cache)  # (1, V)

        def first_logits(ids: torch.Tensor) -> torch.Tensor:
            return decoder.prefill(ids, cache)
    tokens = torch.empty(spec.max_new_tokens, dtype=torch.long)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with torch.inference_mode():
        start = time.perf_counter()
        token = sample(first_logits(input_ids), spec.temperature, spec.top_p, generator)  # (1,)
        tokens[0] = token_id = int(token)
        first = time.perf_counter()
        n = 1
        if streamer is not None:
            streamer.put(tokens[:1])
        while n < spec.max_new_tokens and token_id not in stop:
            logits = next_logits(token, prompt_len + n - 1)  # (1, V)
            token = sample(logits, spec.temperature, spec.top_p, generator)
            tokens[n] = token_id = int(token)
            n += 1
            if streamer is not None:
                streamer.put(tokens[n - 1:n])
        end = time.perf_counter()
    if streamer is not None:
        streamer.end()
    return GenerationResult(tokens=tokens[:n].clone(), prompt_tokens=prompt_len, first_token_s=first - start,
                            decode_s=end - first, step=step_name)


def generate_text(model: nn.Module, tokenizer, prompt: str, spec: GenerationSpec = GenerationSpec(),
                  chat: bool = True, streamer=None) -> tuple[str, GenerationResult]:
    """The text ``generate`` writes after ``prompt`` (the chat template applied when ``chat`` and the tokenizer
    has one; special tokens dropped from the text), and the GenerationResult."""
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    result = generate(model, ids, spec, eos_token_ids(model, tokenizer), streamer=streamer)
    return tokenizer.decode(result.tokens, skip_special_tokens=True), result


def graph_step_for(decoder, cache_len: int):
    """The decoder's GraphDecodeStep over a KV cache of ``cache_len`` tokens, made (and captured, on its first
    call) once and reused by later generations, as gpt-fast keeps its graph: a new sequence overwrites the cache
    from position 0 and the step masks every position after its own, so nothing needs clearing. Kept on the
    decoder itself, so the graphs and caches go with it (when its model goes)."""
    from gqsa.engine.graph_step import GraphDecodeStep

    steps = decoder.graph_steps
    if cache_len not in steps:
        steps[cache_len] = GraphDecodeStep(decoder, decoder.new_cache(cache_len), capture=True)
    return steps[cache_len]


def use_cuda_graph(spec: GenerationSpec, device: torch.device) -> bool:
    """Whether the fused decode step is replayed from a CUDA graph (``GenerationSpec.cuda_graph``).

    Raises:
        ValueError: ``cuda_graph=True`` on a device that is not CUDA.
    """
    if spec.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device; the model is on {device}")
    return device.type == "cuda" and not spec.compile and spec.cuda_graph is not False


def fused_decoder_for(model: nn.Module, spec: GenerationSpec, tokens: int):
    """The model's FusedDecoder when ``spec.fused`` allows it and the model is supported for a sequence of
    ``tokens`` tokens; None to decode through the model's own forward.

    Raises:
        UnsupportedArchitectureError: ``spec.fused`` is True and the fused step cannot run this model.
    """
    from gqsa.engine.fused import fused_decoder
    from gqsa.models.adapter import UnsupportedArchitectureError

    if spec.fused is False:
        return None
    try:
        decoder = fused_decoder(model)
        decoder.check_length(tokens)
    except UnsupportedArchitectureError as exc:
        if spec.fused:
            raise
        logger.info("decoding through the model's own forward: %s", exc)
        return None
    return decoder
