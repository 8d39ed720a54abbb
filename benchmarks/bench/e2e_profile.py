"""The decode-step profile of ``gqsa bench e2e --profile``: milliseconds per decode step by component.

The engine is measured from outside, as it runs for a user: the model's own forward through torch's forward hooks
on its modules, the fused step (``gqsa.engine.fused``) by replacing, on its ``FusedDecoder`` instance and only
while the profiled steps run, the linear callables its step reads (each block's and the LM head) by timed
wrappers. Each profile runs its steps three times: a warm-up, then untimed (``step_ms``), then instrumented
(``step_ms_hooked``: the timing costs time itself). The prompt is prefilled first, never instrumented.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from benchmarks.bench.e2e_memory import is_dynamic_int8

PROFILE_METHOD = ("model forward step: forward hooks on its modules; fused step: its linear and LM head calls timed, "
                  "the rest by difference")
MODEL_REST = "loop, sampling and the rest"
FUSED_REST = "norms, rotary, KV cache, attention, residuals, sampling (torch ops) and the loop"
# The linear layers of a FusedDecoder block as its step calls them: a callable each (q/k/v as a tuple of three
# where they are not one shared-rows call), None where the block has none (gqsa.engine.fused).
BLOCK_LINEARS = ("qkv", "qkv_parts", "o_proj", "gate_up", "gate", "up", "down")

Step = Callable[[torch.Tensor, object], torch.Tensor]  # (token (1, 1), position) -> (1, vocab) logits


def component_of(model: nn.Module, module: nn.Module) -> str | None:
    """Which part of a decode step a module's own time (without its hooked children) is counted in."""
    from gqsa.nn import GQSALinear

    if module is model.get_output_embeddings():
        return "lm head"
    if isinstance(module, (nn.Linear, GQSALinear)) or is_dynamic_int8(module):
        return "linear layers"
    if isinstance(module, nn.Embedding):
        return "embedding"
    cls = type(module).__name__
    for key, component in (("Norm", "norms"), ("Attention", "attention (rotary, KV cache, SDPA)"),
                           ("MLP", "MLP activation"), ("Rotary", "rotary tables"),
                           ("DecoderLayer", "residual adds (decoder layer glue)")):
        if key in cls:
            return component
    if module is model.get_decoder():
        return "mask and model glue"
    if module is model:
        return "LM wrapper"
    return None


@contextlib.contextmanager
def forward_hooks(model: nn.Module, totals: dict[str, float]) -> Iterator[None]:
    """While open, forward hooks on every module :func:`component_of` names add its own seconds (its total less
    its hooked children's) to ``totals[component]``."""
    stack: list[list[float]] = []  # per open call: its start and its hooked children's seconds

    def pre(module, args) -> None:
        stack.append([time.perf_counter(), 0.0])

    def post(component: str):
        def hook(module, args, output) -> None:
            start, children = stack.pop()
            took = time.perf_counter() - start
            totals[component] += took - children
            if stack:
                stack[-1][1] += took
        return hook

    handles = []
    try:
        for module in model.modules():
            component = component_of(model, module)
            if component is not None:
                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post(component))]
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def timed_linears(decoder, totals: dict[str, float]) -> Iterator[None]:
    """While open, the ``FusedDecoder`` instance ``decoder`` calls its linear layers (component "linear layers")
    and its LM head ("lm head") through wrappers that add their seconds to ``totals[component]``.

    Instance attributes only: the step reads ``decoder.lm_head`` and each block of ``decoder.blocks`` (and
    ``decoder.prompt_blocks``, which the step picks for longer inputs) at every call; the originals are put back
    on exit, whatever happens.
    """
    def timed(component: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        def call(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = fn(x)
            totals[component] += time.perf_counter() - start
            return y
        return call

    blocks = list({id(b): b for b in [*decoder.blocks, *decoder.prompt_blocks]}.values())
    saved = [(decoder, "lm_head", decoder.lm_head)]
    saved += [(b, name, getattr(b, name)) for b in blocks for name in BLOCK_LINEARS if getattr(b, name) is not None]
    try:
        decoder.lm_head = timed("lm head", decoder.lm_head)
        for block, name, fn in saved[1:]:
            setattr(block, name, tuple(timed("linear layers", f) for f in fn) if isinstance(fn, tuple)
                    else timed("linear layers", fn))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _profile(start: Callable[[], tuple[torch.Tensor, Step]], positions: Sequence, instrument, totals: dict,
             step: str, rest: str) -> dict:
    """Warm-up, untimed and ``instrument``-ed runs of one decode step per position; the profile.

    ``start()`` prefills a new cache and returns the prompt's logits and the step on that cache; ``instrument``
    (a context manager, entered once) fills ``totals`` with seconds by component; ``rest`` is the step time they
    leave.
    """
    from gqsa.engine.sampling import sample

    def run(around) -> float:
        logits, step_fn = start()
        token = sample(logits).view(1, 1)
        elapsed = 0.0
        with around:
            for position in positions:
                begin = time.perf_counter()
                token = sample(step_fn(token, position)).view(1, 1)
                int(token)
                elapsed += time.perf_counter() - begin
        return elapsed

    with torch.inference_mode():
        run(contextlib.nullcontext())  # warm-up
        plain = run(contextlib.nullcontext())
        timed = run(instrument)
    steps = len(positions)
    per_step = {k: 1e3 * v / steps for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    per_step[rest] = 1e3 * timed / steps - sum(per_step.values())
    return {"steps": steps, "step": step, "step_ms": 1e3 * plain / steps, "step_ms_hooked": 1e3 * timed / steps,
            "components_ms": per_step}


def decode_profile(model: nn.Module, prompt: torch.Tensor, steps: int, fused: bool | None = False) -> dict:
    """Milliseconds per decode step by component, through gqsa's decode loop, eager.

    ``fused`` as ``GenerationSpec.fused``: where the fused step runs, see :func:`fused_decode_profile`; else the
    model's own forward: every hooked module's own time (its total minus its hooked children's) goes to its
    component; "loop, sampling and the rest" is the step time minus all hooked time.

    Args:
        prompt: (1, T) prompt ids, prefilled first (not profiled).
        steps: decode steps measured.
    """
    from gqsa.engine.generate import GenerationSpec, decode_one_token, fused_decoder_for, new_cache, prefill

    length = prompt.shape[1] + steps + 1
    if fused_decoder_for(model, GenerationSpec(fused=fused), length) is not None:
        return fused_decode_profile(model, prompt, steps)

    def start() -> tuple[torch.Tensor, Step]:
        cache = new_cache(model, length)
        return prefill(model, prompt, cache), lambda token, position: decode_one_token(model, token, position, cache)

    totals: dict[str, float] = defaultdict(float)
    positions = [torch.tensor([[prompt.shape[1] + i]]) for i in range(steps)]
    return _profile(start, positions, forward_hooks(model, totals), totals, "model forward", MODEL_REST)


def fused_decode_profile(model: nn.Module, prompt: torch.Tensor, steps: int) -> dict:
    """Milliseconds per step of the fused decode step (``gqsa.engine.fused``) by component.

    The linear layers and the LM head are timed around their calls (:func:`timed_linears`); everything else
    (norms, rotary, KV cache writes, attention, residual adds, the MLP activation: a few torch calls each, plus
    sampling and the loop) is the step time minus those.

    Args:
        prompt: (1, T) prompt ids, prefilled first (not profiled).
        steps: decode steps measured.
    """
    from gqsa.engine.fused import fused_decoder

    decoder = fused_decoder(model)

    def start() -> tuple[torch.Tensor, Step]:
        cache = decoder.new_cache(prompt.shape[1] + steps + 1)
        return decoder.prefill(prompt, cache), lambda token, position: decoder.decode_one_token(token, position,
                                                                                                  cache)

    totals: dict[str, float] = defaultdict(float)
    positions = range(prompt.shape[1], prompt.shape[1] + steps)
    return _profile(start, positions, timed_linears(decoder, totals), totals, "fused", FUSED_REST)
