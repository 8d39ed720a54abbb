"""The static decode step (what a CUDA graph replays) against the fused step and the model.

On the CPU the static step runs eagerly (``GraphDecodeStep(capture=False)``): the position as a device tensor, the
rotary rows and cache slot chosen by index, attention over the whole cache with the later positions masked. With
a GPU the graph itself is captured and replayed and must give the eager step's numbers.
"""

import pytest
import torch
from tiny import tiny_model

from gqsa.compress import compress_model
from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
from gqsa.engine import GenerationSpec, generate
from gqsa.engine.fused import FusedDecoder
from gqsa.engine.graph_step import GraphDecodeStep

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64, 12, 5, 77, 180, 9, 33]])
PROMPT = 5
CUDA = torch.cuda.is_available()


def _packed(model):
    compress_model(model, CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                                         sparsity=SparsitySpec(ratio=0.5)), progress=False)
    return model


def _steps(model, static: bool, capture: bool = False, cache_len: int = 20):
    """(steps, V) logits of the decode steps after the prompt, and the cache after them."""
    decoder = FusedDecoder(model)
    with torch.inference_mode():
        cache = decoder.new_cache(cache_len)
        decoder.prefill(IDS[:, :PROMPT].to(decoder.device), cache)
        step = GraphDecodeStep(decoder, cache, capture=capture)
        out = []
        for p in range(PROMPT, IDS.shape[1]):
            token = IDS[:, p:p + 1].to(decoder.device)
            out.append((step(token, p) if static else decoder.decode_one_token(token, p, cache)).clone())
    return torch.cat(out), cache


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {}), ("llama", {"num_key_value_heads": 4})],
                         ids=["llama-gqa", "qwen3", "llama-mha"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_static_step_is_the_fused_step(arch, overrides, packed):
    model = tiny_model(arch, **overrides)
    if packed:
        _packed(model)
    got, got_cache = _steps(model, static=True)
    want, want_cache = _steps(model, static=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(got_cache.keys + got_cache.values, want_cache.keys + want_cache.values):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # the same slots written, nothing else
    with torch.inference_mode():
        model_logits = model(IDS).logits[0, PROMPT:]
    torch.testing.assert_close(got, model_logits, atol=1e-5, rtol=0)


def test_a_later_position_is_masked_not_attended():
    """Writing garbage into cache slots after the position must not change the logits."""
    model = tiny_model("llama")
    decoder = FusedDecoder(model)
    with torch.inference_mode():
        cache = decoder.new_cache(16)
        decoder.prefill(IDS[:, :PROMPT], cache)
        step = GraphDecodeStep(decoder, cache, capture=False)
        clean = step(IDS[:, PROMPT:PROMPT + 1], PROMPT).clone()
        for k in cache.keys + cache.values:
            k[:, :, PROMPT + 1:] = 1e3
        torch.testing.assert_close(step(IDS[:, PROMPT:PROMPT + 1], PROMPT), clean, atol=0, rtol=0)
        with pytest.raises(ValueError, match="outside the cache"):
            step(IDS[:, :1], 16)


def test_capture_needs_cuda_and_the_spec_is_checked():
    model = tiny_model("llama")
    decoder = FusedDecoder(model)
    cache = decoder.new_cache(8)
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA device"):
            GraphDecodeStep(decoder, cache, capture=True)
        with pytest.raises(ValueError, match="CUDA device"):
            generate(model, IDS[:, :3], GenerationSpec(max_new_tokens=2, cuda_graph=True))
    with pytest.raises(ValueError, match="no compile"):
        GenerationSpec(cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        GenerationSpec(cuda_graph="yes")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "triton-a8"])
def test_cuda_graph_replays_the_eager_step(backend):
    model = _packed(tiny_model("llama")).cuda().half()
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    got, _ = _steps(model, static=True, capture=True)
    want, _ = _steps(model, static=True, capture=False)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    result = generate(model, IDS.cuda(), GenerationSpec(max_new_tokens=6, stop_at_eos=False))
    assert result.step == "fused, cuda graph"
    eager = generate(model, IDS.cuda(), GenerationSpec(max_new_tokens=6, stop_at_eos=False, cuda_graph=False))
    assert torch.equal(result.tokens, eager.tokens)
