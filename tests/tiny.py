"""Tiny random models and a tiny tokenizer for tests (built in-process, seconds, no hub)."""

from __future__ import annotations

import torch

VOCAB_SIZE = 320

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n\n"
    "Group quantization and sparsity make large language models smaller and faster. Each weight row is cut "
    "into groups of consecutive input columns; whole groups are pruned and the rest are quantized.\n\n"
    "Wikipedia is a free online encyclopedia written and maintained by a community of volunteers. "
    "It was launched on January 15, 2001, and has grown into the largest reference work in history.\n\n"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer with VOCAB_SIZE entries, trained on SAMPLE_TEXT in a few milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def tiny_config(arch: str = "llama", **overrides):
    """A 2-layer config of the given architecture: hidden 64, MLP 128, 4 heads (2 KV heads) of dim 16."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM of the given architecture, in fp32 and eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.eval()
