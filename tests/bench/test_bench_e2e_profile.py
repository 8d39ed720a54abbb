"""The decode-step profile of ``gqsa bench e2e --profile``, timed from outside the engine: every linear call of the
fused step goes through the timing wrappers (and only while they are open), the step computes the same logits
through them, and the model's own forward is profiled by hooks that are gone afterwards."""

import contextlib
from collections import defaultdict

import pytest
import torch
from tiny import tiny_model

from benchmarks.bench.e2e_profile import FUSED_REST, MODEL_REST, decode_profile, fused_decode_profile, timed_linears
from gqsa.compress import compress_model
from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
from gqsa.engine.fused import fused_decoder

PROMPT = torch.tensor([[3, 17, 42, 99, 7]])


def _compressed(arch: str = "llama"):
    model = tiny_model(arch)
    config = CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                            sparsity=SparsitySpec(ratio=0.5))
    compress_model(model, config, progress=False)
    return model


class _Counts(dict):
    """Seconds by component (0 where none yet), and how many times each was added to."""

    def __init__(self):
        super().__init__()
        self.calls = defaultdict(int)

    def __missing__(self, key):
        return 0.0

    def __setitem__(self, key, value):
        self.calls[key] += 1
        super().__setitem__(key, value)


def _steps(decoder, steps: int = 3, around=None) -> list[torch.Tensor]:
    """Logits of a prefill and ``steps`` decode steps (fixed tokens), the decode steps inside ``around``."""
    with torch.inference_mode():
        cache = decoder.new_cache(PROMPT.shape[1] + steps)
        out = [decoder.prefill(PROMPT, cache)]
        with around if around is not None else contextlib.nullcontext():
            for i in range(steps):
                out.append(decoder.decode_one_token(torch.tensor([[5 + i]]), PROMPT.shape[1] + i, cache))
    return out


def _callables(decoder) -> list:
    return [decoder.lm_head] + [getattr(b, name) for b in [*decoder.blocks, *decoder.prompt_blocks]
                                for name in ("qkv", "qkv_parts", "o_proj", "gate_up", "gate", "up", "down")]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_timed_linears_time_every_linear_call_and_change_no_logit(packed):
    model = _compressed() if packed else tiny_model("llama")
    decoder = fused_decoder(model)
    before = _callables(decoder)
    want = _steps(decoder)
    totals = _Counts()
    got = _steps(decoder, around=timed_linears(decoder, totals))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    blocks = len(decoder.blocks)
    # seven linear layers per block, fewer calls where q/k/v and gate/up share rows; the prefill is not timed
    expected = 7 * blocks - 2 * sum(b.qkv is not None for b in decoder.blocks) \
        - sum(b.gate_up is not None for b in decoder.blocks)
    assert packed == (expected < 7 * blocks)
    assert dict(totals.calls) == {"linear layers": 3 * expected, "lm head": 3}
    assert all(totals[c] > 0 for c in ("linear layers", "lm head"))
    assert all(a is b for a, b in zip(_callables(decoder), before, strict=True))  # the engine's own callables back


def test_timed_linears_put_the_callables_back_after_an_error():
    decoder = fused_decoder(tiny_model("llama"))
    before = _callables(decoder)
    with pytest.raises(RuntimeError, match="inside"), timed_linears(decoder, defaultdict(float)):
        assert decoder.lm_head is not before[0]
        raise RuntimeError("inside")
    assert all(a is b for a, b in zip(_callables(decoder), before, strict=True))


def test_fused_profile_splits_the_step_into_linear_layers_lm_head_and_the_rest():
    model = _compressed()
    profile = fused_decode_profile(model, PROMPT, steps=2)
    assert profile["step"] == "fused" and profile["steps"] == 2
    assert set(profile["components_ms"]) == {"linear layers", "lm head", FUSED_REST}
    assert profile["step_ms"] > 0 and profile["step_ms_hooked"] > 0
    assert sum(profile["components_ms"].values()) == pytest.approx(profile["step_ms_hooked"])
    assert decode_profile(model, PROMPT, 2, fused=None)["step"] == "fused"  # where the fused step runs


def test_model_forward_profile_uses_hooks_that_are_removed_afterwards():
    model = _compressed()
    profile = decode_profile(model, PROMPT, steps=2, fused=False)
    assert profile["step"] == "model forward"
    assert {"linear layers", "lm head", "norms", MODEL_REST} <= set(profile["components_ms"])
    assert sum(profile["components_ms"].values()) == pytest.approx(profile["step_ms_hooked"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
