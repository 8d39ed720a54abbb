"""The architecture adapter: block layout, linears, input groups, and block-by-block replay of the forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gqsa.models.adapter import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    block_linears,
    block_prefix,
    capture_block_inputs,
    check_supported,
    compressible_linears,
    decoder_layers,
    final_norm,
    input_groups,
    logits_from_hidden_states,
)
from tiny import ARCHITECTURES, VOCAB_SIZE, tiny_config, tiny_model

EXPECTED_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]

# Variants whose layers get different kwargs: sliding-window layers mixed with full-attention ones (Gemma 3 also
# uses a different rope base per kind). T=12 > window 4, so a wrong mask or rotary table changes the output.
MIXED_LAYER_VARIANTS = {
    "gemma3_text-mixed": ("gemma3_text", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3-sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
}
ALL_VARIANTS = {arch: (arch, {}) for arch in ARCHITECTURES} | MIXED_LAYER_VARIANTS | {
    "mistral-sliding": ("mistral", dict(sliding_window=4)),
}


def tiny_gemma3_multimodal(seed: int = 0):
    """A tiny Gemma3ForConditionalGeneration: the tiny Gemma 3 text model plus a one-layer SigLIP vision tower."""
    import transformers

    text = tiny_config("gemma3_text", layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=4,
        ),
        mm_tokens_per_image=4,
        image_token_index=VOCAB_SIZE - 3,
        boi_token_index=VOCAB_SIZE - 2,
        eoi_token_index=VOCAB_SIZE - 1,
    )
    torch.manual_seed(seed)
    return transformers.Gemma3ForConditionalGeneration(config).eval()


def build(variant: str):
    if variant == "gemma3-multimodal":
        return tiny_gemma3_multimodal()
    arch, overrides = ALL_VARIANTS[variant]
    return tiny_model(arch, **overrides)


def token_batch(seed: int = 0, batch: int = 2, seq_len: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB_SIZE - 3, (batch, seq_len), generator=generator)


def replay(model, hidden, block_kwargs):
    for i, block in enumerate(decoder_layers(model)):
        hidden = block(hidden, **block_kwargs[i])
    return logits_from_hidden_states(model, hidden)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_linears_in_execution_order(arch):
    model = tiny_model(arch)
    config = model.config
    for block in decoder_layers(model):
        linears = block_linears(block)
        assert list(linears) == EXPECTED_LINEARS
        assert all(type(m) is nn.Linear for m in linears.values())
        assert linears["self_attn.q_proj"].out_features == config.num_attention_heads * config.head_dim
        assert linears["self_attn.k_proj"].out_features == config.num_key_value_heads * config.head_dim
        assert linears["mlp.down_proj"].in_features == config.intermediate_size
        assert linears["self_attn.q_proj"] is block.self_attn.q_proj


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_input_groups(arch):
    block = decoder_layers(tiny_model(arch))[0]
    groups = input_groups(block)
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    linears = block_linears(block)
    for group in groups:  # linears of one group really read inputs of the same width
        assert len({linears[name].in_features for name in group}) == 1
    groups[0].append("mutated")
    assert input_groups(block)[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("variant", [*ARCHITECTURES, "gemma3-multimodal"])
def test_compressible_linears_are_every_block_linear_and_nothing_else(variant):
    model = build(variant)
    linears = compressible_linears(model)
    modules = dict(model.named_modules())
    n_blocks = len(decoder_layers(model))
    assert len(linears) == 7 * n_blocks
    for name, module in linears.items():
        assert modules[name] is module
    assert model.get_output_embeddings() not in linears.values()
    assert not any("lm_head" in name or "embed" in name or "vision" in name for name in linears)
    # completeness: every linear of the language model except the LM head is compressible
    text_linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head" and "vision_tower" not in name
        and "multi_modal_projector" not in name
    }
    assert set(linears) == text_linears
    assert list(linears)[:7] == [f"{block_prefix(model, 0)}.{name}" for name in EXPECTED_LINEARS]


@pytest.mark.parametrize("variant", [*ARCHITECTURES, "gemma3-multimodal"])
def test_block_prefix_names_the_block(variant):
    model = build(variant)
    modules = dict(model.named_modules())
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    for i, block in enumerate(layers):
        assert modules[block_prefix(model, i)] is block
    expected = "model.language_model.layers.1" if variant == "gemma3-multimodal" else "model.layers.1"
    assert block_prefix(model, 1) == expected
    with pytest.raises(IndexError, match="out of range"):
        block_prefix(model, 2)
    assert final_norm(model) is modules[expected.replace("layers.1", "norm")]


@pytest.mark.parametrize("variant", [*ALL_VARIANTS, "gemma3-multimodal"])
def test_block_by_block_replay_reproduces_the_forward(variant):
    model = build(variant)
    input_ids = token_batch()
    hidden, block_kwargs = capture_block_inputs(model, input_ids)
    assert hidden.shape == (2, 12, 64)
    assert len(block_kwargs) == len(decoder_layers(model))
    for kwargs in block_kwargs:
        assert "position_embeddings" in kwargs and "hidden_states" not in kwargs
    with torch.no_grad():
        expected = model(input_ids).logits
        got = replay(model, hidden, block_kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["llama", "gemma3_text-mixed", "qwen2-sliding"])
def test_replay_with_padding_mask(variant):
    model = build(variant)
    input_ids = token_batch(seed=1)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding in the first sequence
    hidden, block_kwargs = capture_block_inputs(model, input_ids, attention_mask)
    assert all(kwargs["attention_mask"] is not None for kwargs in block_kwargs)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        got = replay(model, hidden, block_kwargs)
    # padded query rows are not meaningful; compare the real tokens
    keep = attention_mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(MIXED_LAYER_VARIANTS))
def test_layer_kinds_get_their_own_kwargs(variant):
    model = build(variant)
    input_ids = token_batch()
    hidden, block_kwargs = capture_block_inputs(model, input_ids)
    assert block_kwargs[0] is not block_kwargs[1]
    # The first block's kwargs are wrong for the second block: the replay would catch an adapter that reused them.
    with torch.no_grad():
        expected = model(input_ids).logits
        wrong = replay(model, hidden, [block_kwargs[0]] * len(block_kwargs))
    assert (wrong - expected).abs().max() > 1e-3


def test_gemma3_layer_kinds_use_different_rotary_tables():
    model = build("gemma3_text-mixed")
    _, block_kwargs = capture_block_inputs(model, token_batch())
    cos_local, _ = block_kwargs[0]["position_embeddings"]
    cos_global, _ = block_kwargs[1]["position_embeddings"]
    assert not torch.allclose(cos_local, cos_global)


def test_blocks_of_one_kind_share_kwargs():
    model = tiny_model("llama", num_hidden_layers=3)
    _, block_kwargs = capture_block_inputs(model, token_batch())
    assert block_kwargs[0] is block_kwargs[1] is block_kwargs[2]


def test_capture_restores_layers_and_returns_embeddings():
    model = tiny_model("llama")
    originals = list(decoder_layers(model))
    input_ids = token_batch()
    hidden, _ = capture_block_inputs(model, input_ids)
    assert [a is b for a, b in zip(decoder_layers(model), originals)] == [True, True]
    torch.testing.assert_close(hidden, model.get_input_embeddings()(input_ids), atol=0, rtol=0)
    assert not hidden.requires_grad

    with pytest.raises(IndexError):  # a token id past the vocabulary fails inside the forward
        capture_block_inputs(model, torch.full((1, 4), VOCAB_SIZE + 10))
    assert [a is b for a, b in zip(decoder_layers(model), originals)] == [True, True]


def test_gemma3_capture_includes_the_embedding_scale():
    model = tiny_model("gemma3_text")
    input_ids = token_batch()
    hidden, _ = capture_block_inputs(model, input_ids)
    raw = nn.functional.embedding(input_ids, model.get_input_embeddings().weight)
    torch.testing.assert_close(hidden, raw * model.config.hidden_size**0.5)


def test_capture_rejects_non_batched_input():
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        capture_block_inputs(tiny_model("llama"), torch.arange(8))


def test_unsupported_architecture_names_itself():
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB_SIZE, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    for fn in (check_supported, decoder_layers, compressible_linears):
        with pytest.raises(UnsupportedArchitectureError) as info:
            fn(model)
        message = str(info.value)
        assert "GPT2LMHeadModel" in message and "'gpt2'" in message
        assert all(model_type in message for model_type in SUPPORTED_MODEL_TYPES)
    with pytest.raises(UnsupportedArchitectureError):
        capture_block_inputs(model, token_batch())
    assert issubclass(UnsupportedArchitectureError, ValueError)


def test_model_without_lm_head_is_rejected():
    bare = tiny_model("llama").model  # LlamaModel: model_type llama but no `model.layers` path
    with pytest.raises(UnsupportedArchitectureError, match="LlamaModel"):
        decoder_layers(bare)


def test_block_linears_rejects_replaced_linears():
    block = decoder_layers(tiny_model("llama"))[0]
    block.mlp.up_proj = nn.Identity()
    with pytest.raises(TypeError, match="mlp.up_proj"):
        block_linears(block)
    del block.mlp.up_proj
    with pytest.raises(UnsupportedArchitectureError, match="mlp.up_proj"):
        block_linears(block)


def test_supported_model_types():
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3"}
    for arch in ARCHITECTURES:
        assert check_supported(tiny_model(arch)) == arch
