"""gqsa's decode loop on tiny models: transformers' greedy tokens, the same tokens after save/load, seeded sampling
that reproduces, end of sequence, streaming, backend choice, and bad arguments named."""

from dataclasses import replace

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import gqsa
from gqsa.compress import compress_model
from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
from gqsa.engine import GenerationSpec, encode_prompt, eos_token_ids, generate, use_fastest_backend
from gqsa.models.packing import pack_lm_head
from gqsa.ops import available_backends, reference_linear
from gqsa.ops.backends import select_kernel

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64, 12, 5]])
GREEDY = GenerationSpec(max_new_tokens=16, stop_at_eos=False)


def _compressed(arch="llama", seed=0):
    model = tiny_model(arch, seed=seed)
    config = CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                            sparsity=SparsitySpec(ratio=0.5))
    compress_model(model, config, progress=False)
    return model


@pytest.fixture(scope="module")
def model():
    return _compressed()


def _hf_greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("packed", [True, False], ids=["compressed", "dense"])
@pytest.mark.parametrize("fused", [None, False], ids=["default-step", "model-forward"])
def test_static_cache_loop_gives_transformers_greedy_tokens(arch, packed, fused):
    model = _compressed(arch) if packed else tiny_model(arch)
    result = generate(model, IDS, replace(GREEDY, fused=fused))
    assert torch.equal(result.tokens, _hf_greedy(model, IDS, GREEDY.max_new_tokens))
    assert result.prompt_tokens == IDS.shape[1] and result.first_token_s > 0 and result.decode_s > 0
    assert result.step == ("fused" if fused is None and arch != "gemma3_text" else "model")


def test_packed_lm_head_loop_gives_transformers_greedy_tokens():
    model = _compressed("gemma3_text")  # its LM head is tied to the embeddings
    pack_lm_head(model, bits=8)
    assert torch.equal(generate(model, IDS, GREEDY).tokens, _hf_greedy(model, IDS, GREEDY.max_new_tokens))


@pytest.mark.parametrize("lm_head_bits", [None, 4])
def test_greedy_tokens_survive_save_and_load(tmp_path, lm_head_bits):
    model = _compressed()
    if lm_head_bits:
        pack_lm_head(model, bits=lm_head_bits)
    before = generate(model, IDS, GREEDY).tokens
    gqsa.save(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, _ = gqsa.load(tmp_path / "ckpt")
    backend = use_fastest_backend(loaded)  # what "auto" runs, named
    assert select_kernel(backend, "cpu", reference_linear) is select_kernel("auto", "cpu", reference_linear)
    assert backend == "reference" or backend in available_backends("cpu")[2:]
    assert torch.equal(generate(loaded, IDS, GREEDY).tokens, before)


def test_seeded_sampling_reproduces(model):
    spec = GenerationSpec(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3, stop_at_eos=False)
    first = generate(model, IDS, spec).tokens
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(generate(model, IDS, spec).tokens, first)
    assert not torch.equal(generate(model, IDS, replace(spec, seed=4)).tokens, first)
    assert not torch.equal(first, generate(model, IDS, GREEDY).tokens[:12])


def test_generation_stops_after_an_end_of_sequence_token(model):
    tokens = generate(model, IDS, GREEDY).tokens
    eos = int(tokens[3])
    first = int((tokens == eos).nonzero()[0])
    stopped = generate(model, IDS, replace(GREEDY, stop_at_eos=True), eos_ids=(eos,)).tokens
    assert torch.equal(stopped, tokens[: first + 1])
    assert torch.equal(generate(model, IDS, GREEDY, eos_ids=(eos,)).tokens, tokens)  # stop_at_eos=False


def test_streamer_receives_the_prompt_then_every_token(model):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended += 1

    rec = Recorder()
    result = generate(model, IDS, replace(GREEDY, max_new_tokens=5), streamer=rec)
    assert torch.equal(rec.puts[0], IDS) and rec.ended == 1
    assert torch.equal(torch.cat(rec.puts[1:]), result.tokens) and len(rec.puts) == 6


def test_prompt_encoding_and_end_of_sequence_ids():
    tok = tiny_tokenizer()
    assert torch.equal(encode_prompt(tok, "hello world"), tok("hello world", return_tensors="pt")["input_ids"])
    model = tiny_model()
    assert eos_token_ids(model, tok) == (0,)
    model.generation_config.eos_token_id = [5, 0]
    assert eos_token_ids(model, tok) == (5, 0)


def test_dense_model_has_no_backend_to_choose():
    assert use_fastest_backend(tiny_model()) == "dense"


@pytest.mark.parametrize("fields,message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"fused": "yes"}, "fused"),
])
def test_bad_generation_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationSpec(**fields)


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        generate(model, IDS[0], GREEDY)
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        generate(model, IDS.repeat(2, 1), GREEDY)
    with pytest.raises(ValueError, match="context of 512"):
        generate(model, IDS, GenerationSpec(max_new_tokens=600))
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(tiny_tokenizer(), "")


def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny_model("llama", num_hidden_layers=1)
    compress_model(model, CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                                         sparsity=SparsitySpec(ratio=0.5)), progress=False)
    spec = replace(GREEDY, max_new_tokens=6, fused=False)  # the model's own forward (the fused step: test_engine_fused)
    compiled = generate(model, IDS, replace(spec, compile=True)).tokens
    assert torch.equal(compiled, generate(model, IDS, spec).tokens)


@pytest.mark.skipif("cpu-a8" not in available_backends("cpu", approximate=True), reason="native kernel not built")
def test_a_named_backend_runs_every_packed_layer(monkeypatch):
    """``use_fastest_backend(model, "cpu-a8")``: every packed layer calls the int8-activation kernel (counted), the
    greedy tokens come out; an unknown or unavailable name is refused with the names that are available."""
    from gqsa.nn.packed_linear import PackedLinear
    from gqsa.ops import cpu as cpu_kernels

    model = _compressed()
    calls = []
    original = cpu_kernels.linear_small_batch

    def counting(*args, **kwargs):
        calls.append(kwargs.get("act8", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "linear_small_batch", counting)
    assert use_fastest_backend(model, "cpu-a8") == "cpu-a8"
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.backend == "cpu-a8" for m in layers)
    tokens = generate(model, IDS, replace(GREEDY, max_new_tokens=3)).tokens
    assert tokens.numel() >= 1 and calls and all(calls)
    with pytest.raises(ValueError, match="not available for cpu here; available: auto, reference"):
        use_fastest_backend(model, "triton-a8x")
