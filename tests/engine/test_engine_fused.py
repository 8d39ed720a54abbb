"""The fused decode step on tiny models: the model's own logits (prompt, then every decode position) for llama,
mistral, qwen2 (q/k/v biases) and qwen3 (q/k norms), dense and packed on every exact backend; shared-rows layers
equal to their parts; transformers' greedy tokens from ``generate``; unsupported models fall back (or raise when
the fused step is required); one decoder per model, rebuilt when the model changes."""

import logging
from dataclasses import replace

import pytest
import torch
from tiny import tiny_model

from gqsa.compress import compress_model
from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
from gqsa.engine import GenerationSpec, generate
from gqsa.engine.fused import FusedDecoder, _shared_rows, fused_decoder
from gqsa.format import PackedWeight
from gqsa.models.adapter import UnsupportedArchitectureError, capture_block_inputs
from gqsa.models.llama_parts import rotary_tables
from gqsa.nn import PackedLinear
from gqsa.ops import cpu

BACKENDS = ["reference"] + (["cpu"] if cpu.available() else [])
IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64, 12, 5, 77, 180, 9, 33]])
PROMPT = 9  # the rest of IDS is fed one token at a time
GREEDY = GenerationSpec(max_new_tokens=12, stop_at_eos=False)
ATOL = 1e-5


def _compress(model):
    config = CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                            sparsity=SparsitySpec(ratio=0.5))
    compress_model(model, config, progress=False)
    return model


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.backend = backend
    return model


def _fused_logits(model, ids=IDS, prompt=PROMPT):
    """(T - prompt + 1, V): the prefill's last-position logits, then each decode step's."""
    decoder = FusedDecoder(model)
    with torch.inference_mode():
        cache = decoder.new_cache(ids.shape[1])
        out = [decoder.prefill(ids[:, :prompt], cache)]
        for p in range(prompt, ids.shape[1]):
            out.append(decoder.decode_one_token(ids[:, p:p + 1], p, cache))
    return torch.cat(out)


def _model_logits(model, ids=IDS, prompt=PROMPT):
    with torch.inference_mode():
        return model(ids).logits[0, prompt - 1:]


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8, "rope_theta": 10000.0}
ARCHS = [("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}), ("mistral", {}), ("qwen2", {}),
         ("qwen3", {}), ("llama", {"num_key_value_heads": 4}), ("llama", {"rope_parameters": LLAMA3_ROPE})]
ARCH_IDS = ["llama", "llama-biases", "mistral", "qwen2", "qwen3", "llama-mha", "llama3-rope"]


@pytest.mark.parametrize("arch,overrides", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("backend", [None, *BACKENDS], ids=lambda b: "dense" if b is None else b)
def test_fused_logits_are_the_models_at_every_position(arch, overrides, backend):
    model = tiny_model(arch, **overrides)
    if backend is not None:
        _set_backend(_compress(model), backend)
    decoder = FusedDecoder(model)
    assert decoder.fused_linears == (0 if backend is None else 2 * len(decoder.blocks))
    got, want = _fused_logits(model), _model_logits(model)
    assert got.shape == want.shape == (IDS.shape[1] - PROMPT + 1, model.config.vocab_size)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_prompt_runs_the_packed_layers_one_by_one_with_the_same_logits(backend):
    model = _set_backend(_compress(tiny_model("qwen2")), backend)
    decoder = FusedDecoder(model)
    assert decoder.prompt_blocks is not decoder.blocks
    n = decoder.shared_rows_max_tokens + 8  # a prompt of n - 2 tokens, then 2 decode steps
    ids = torch.randint(1, 300, (1, n), generator=torch.Generator().manual_seed(0))
    got, want = _fused_logits(model, ids, n - 2), _model_logits(model, ids, n - 2)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {}), ("llama", {"rope_parameters": LLAMA3_ROPE})],
                         ids=["llama", "qwen3", "llama3-rope"])
def test_rotary_tables_are_what_the_model_gives_its_layers(arch, overrides):
    model = tiny_model(arch, **overrides)
    _, kwargs = capture_block_inputs(model, IDS)
    cos, sin = kwargs[0]["position_embeddings"]  # (1, T, head_dim) each
    table_cos, table_sin = rotary_tables(model.model.rotary_emb, 32, torch.float32)  # (32, head_dim) each
    assert torch.equal(table_cos[: IDS.shape[1]], cos[0]) and torch.equal(table_sin[: IDS.shape[1]], sin[0])


def test_a_wrong_position_breaks_the_equality():
    # the tolerance above is tight enough to see one position of rotary error (or a cache slot off by one)
    model = tiny_model("llama")
    decoder = FusedDecoder(model)
    with torch.inference_mode():
        cache = decoder.new_cache(IDS.shape[1] + 1)
        decoder.prefill(IDS[:, :PROMPT], cache)
        shifted = decoder.forward(IDS[:, PROMPT:PROMPT + 1], PROMPT + 1, cache)  # skips a position
    want = _model_logits(model, IDS[:, :PROMPT + 1], PROMPT + 1)
    assert (shifted - want).abs().max() > 100 * ATOL


def test_a_prompt_chunk_after_the_start_is_masked_causally():
    model = tiny_model("qwen2")
    decoder = FusedDecoder(model)
    with torch.inference_mode():
        cache = decoder.new_cache(IDS.shape[1])
        decoder.prefill(IDS[:, :4], cache)
        chunk = decoder.forward(IDS[:, 4:PROMPT], 4, cache)  # 5 tokens at positions 4..8
    torch.testing.assert_close(chunk, _model_logits(model)[:1], atol=ATOL, rtol=0)


def test_half_precision_follows_the_model():
    model = tiny_model("qwen3").to(torch.bfloat16)
    got, want = _fused_logits(model).float(), _model_logits(model).float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


# ---- shared rows -------------------------------------------------------------------------------------------


def _layer(rows, seed, keep=0.5, bias=True, odd=False):
    """A packed PackedLinear with 64 inputs (groups of 16) and a random bias; ``odd``: an odd number of kept groups."""
    for s in range(seed, seed + 200):
        gen = torch.Generator().manual_seed(s)
        codes = torch.randint(0, 16, (rows, 4, 16), generator=gen, dtype=torch.uint8)
        scale = (torch.rand(rows, 4, generator=gen) + 0.05).half().float()
        zero = torch.randint(0, 16, (rows, 4), generator=gen).float()
        mask = torch.rand(rows, 4, generator=gen) < keep
        packed = PackedWeight.pack(codes, scale, zero, mask, 4)
        if packed.nnz % 2 == int(odd):
            return PackedLinear.from_packed(packed, torch.randn(rows, generator=gen) if bias else None)
    raise AssertionError("no weight with the asked parity")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("odd", [False, True], ids=["even-offsets", "odd-offset"])
@pytest.mark.parametrize("rows_x", [1, 5])
def test_shared_rows_layer_gives_its_parts_outputs(backend, odd, rows_x):
    parts = [_layer(48, 1, odd=odd), _layer(16, 2), _layer(16, 3, keep=1.0)]
    for p in parts:
        p.backend = backend
    fused = _shared_rows(parts)
    assert fused is not None and fused.out_features == 80 and fused.backend == backend
    x = torch.randn(1, rows_x, 64, generator=torch.Generator().manual_seed(rows_x))
    with torch.inference_mode():
        got = fused.bound()(x)
        want = torch.cat([p.bound()(x) for p in parts], dim=-1)
    if backend == "cpu" and rows_x == 1 and not odd:
        # the native batch-1 kernel sums a row's kept groups in pairs from even entries: with even offsets (and
        # one thread, which so few kept groups always get) a row's sum does not depend on the rows around it
        assert torch.equal(got, want)
    else:  # the same products summed in another order
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_layers_that_cannot_share_rows_stay_separate():
    a, b = _layer(16, 1), _layer(16, 2)
    assert _shared_rows([a, b]) is not None
    assert _shared_rows([a, _layer(16, 3, bias=False)]) is None  # bias on some parts only
    b.backend = "reference"
    assert _shared_rows([a, b]) is None  # different backends
    b.backend = a.backend
    b.fast_path = False
    assert _shared_rows([a, b]) is None  # the op path was asked for
    assert _shared_rows([a, torch.nn.Linear(64, 16)]) is None
    b.fast_path = True
    total = a.packed_weight().nbytes() + b.packed_weight().nbytes()
    assert _shared_rows([a, b], max_bytes=total) is not None
    assert _shared_rows([a, b], max_bytes=total - 1) is None  # large layers: no copy of the packed tensors


# ---- generate ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {}), ("llama", {"num_key_value_heads": 4})],
                         ids=["llama-gqa", "qwen3-gqa", "llama-mha"])
@pytest.mark.parametrize("prompt", [IDS, IDS[:, :1]], ids=["prompt-14", "prompt-1"])
def test_generate_with_the_fused_step_gives_the_models_greedy_tokens(arch, overrides, prompt):
    model = _compress(tiny_model(arch, **overrides))
    fused = generate(model, prompt, replace(GREEDY, fused=True))
    hf = generate(model, prompt, replace(GREEDY, fused=False))
    assert (fused.step, hf.step) == ("fused", "model")
    assert torch.equal(fused.tokens, hf.tokens)
    assert generate(model, prompt, GREEDY).step == "fused"  # the default where supported


@pytest.mark.parametrize("arch,overrides,reason", [
    ("gemma3_text", {}, "gemma3_text"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, "sliding-window"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope type"),
], ids=["gemma3", "qwen2-sliding-window", "dynamic-rope"])
def test_unsupported_models_fall_back_with_a_log_or_raise_when_required(arch, overrides, reason, caplog):
    model = tiny_model(arch, **overrides)
    with caplog.at_level(logging.INFO, logger="gqsa.engine.generate"):
        result = generate(model, IDS, GREEDY)
    assert result.step == "model"
    assert any("own forward" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        generate(model, IDS, replace(GREEDY, fused=True))
    assert torch.equal(result.tokens, generate(model, IDS, replace(GREEDY, fused=False)).tokens)


def test_a_sliding_window_longer_than_the_sequence_is_exact():
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=IDS.shape[1], max_window_layers=0)
    assert FusedDecoder(model).sliding_window == IDS.shape[1]
    torch.testing.assert_close(_fused_logits(model), _model_logits(model), atol=ATOL, rtol=0)
    assert generate(model, IDS[:, :2], replace(GREEDY, max_new_tokens=IDS.shape[1] - 2)).step == "fused"


def test_a_model_in_training_mode_is_refused():
    model = tiny_model("llama").train()
    with pytest.raises(UnsupportedArchitectureError, match="training mode"):
        FusedDecoder(model)


def test_one_decoder_per_model_rebuilt_when_the_model_changes():
    model = _compress(tiny_model("llama"))
    first = fused_decoder(model)
    assert fused_decoder(model) is first
    _set_backend(model, "reference")
    second = fused_decoder(model)
    assert second is not first and fused_decoder(model) is second
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # changed in place: the decoder's tensors are the model's own anyway
    assert fused_decoder(model) is not second


def test_compiled_fused_step_gives_the_same_tokens():
    from gqsa.models.packing import pack_embedding

    model = _compress(tiny_model("llama", num_hidden_layers=1))
    pack_embedding(model, bits=8)  # its lookup stays outside the compiled graph
    spec = replace(GREEDY, max_new_tokens=6, fused=True)
    compiled = generate(model, IDS, replace(spec, compile=True))
    assert compiled.step == "fused"
    assert torch.equal(compiled.tokens, generate(model, IDS, spec).tokens)
