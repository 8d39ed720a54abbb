"""The models ``gqsa bench e2e`` compares: the dense model and its gqsa checkpoint from the command line, compressed
here (data-free) when no checkpoint is given, the Llama-2-7B-shaped stack of ``--shapes 7b``, and the copies with a
packed LM head (and input embedding) of the ``gqsa-lm*`` candidates."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

# Llama-2-7B's shapes (hidden, MLP, heads, vocabulary), with few decoder blocks and random weights.
SHAPES_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096}


def _compress_data_free(model: nn.Module, tokenizer, out: Path) -> Path:
    """Magnitude W4 g16, 50% of groups pruned, saved as a gqsa checkpoint (seconds; speed needs no accuracy)."""
    import gqsa
    from gqsa.compress import compress_model
    from gqsa.config import CompressConfig, QuantSpec, SparsitySpec

    config = CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                            sparsity=SparsitySpec(ratio=0.5))
    compress_model(model, config, progress=False)
    gqsa.save(model, tokenizer, out, compression=config.to_dict())
    return out


def with_packed_lm_head(checkpoint: str, bits: int, scratch: Path, embedding: bool = False) -> str:
    """A copy of ``checkpoint`` whose LM head is stored packed (W``bits`` g16, sparsity 0): the ``gqsa-lm`` rows;
    with ``embedding`` its input embedding table too (the ``gqsa-lmB-embB`` rows)."""
    import gqsa
    from gqsa.models.packing import pack_embedding, pack_lm_head

    model, tokenizer = gqsa.load(checkpoint)
    pack_lm_head(model, bits=bits)
    if embedding:
        pack_embedding(model, bits=bits)
    out = scratch / f"{Path(checkpoint).name}-lm{bits}{f'-emb{bits}' if embedding else ''}"
    gqsa.save(model, tokenizer, out)
    return str(out)


def build_7b_stack(out: Path, layers: int, seed: int = 0) -> tuple[str, str]:
    """A Llama-2-7B-shaped model with ``layers`` blocks and random weights: (dense dir, W4S50 g16 checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **SHAPES_7B)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    dense = out / f"llama2-7b-shaped-{layers}l"
    model.save_pretrained(dense)
    checkpoint = _compress_data_free(model, None, out / f"llama2-7b-shaped-{layers}l-w4s50")
    return str(dense), str(checkpoint)


def resolve_models(args: argparse.Namespace, scratch: Path) -> tuple[str | None, str, str]:
    """(dense model or None for the default, gqsa checkpoint, a label) from the command line."""
    from gqsa.models.loading import COMPRESSED_CONFIG_NAME, load_model

    if args.shapes == "7b":
        if args.model or args.checkpoint:
            raise ValueError("--shapes 7b builds its own model; do not also give MODEL_OR_DIR or --checkpoint")
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
        dense, checkpoint = build_7b_stack(scratch, args.layers, args.seed)
        return dense, checkpoint, f"Llama-2-7B-shaped, {args.layers} blocks, random weights"
    model = args.model
    if model and (Path(model) / COMPRESSED_CONFIG_NAME).is_file():
        if args.checkpoint:
            raise ValueError("MODEL_OR_DIR is a gqsa checkpoint already; give the dense model with --dense")
        return args.dense, model, str(model)
    if args.dense:
        raise ValueError("--dense only applies when MODEL_OR_DIR is a gqsa checkpoint")
    if args.checkpoint:
        if not (Path(args.checkpoint) / COMPRESSED_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a gqsa checkpoint directory")
        return model, args.checkpoint, str(model or "default model (SmolLM2-135M-Instruct)")
    dense_model, tokenizer = load_model(model)
    checkpoint = _compress_data_free(dense_model, tokenizer, scratch / "w4s50-magnitude")
    del dense_model
    return model, str(checkpoint), str(model or "default model (SmolLM2-135M-Instruct)")


def vocab_size(checkpoint: str) -> int:
    """Vocabulary of the compared models, read from the checkpoint's config."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint, local_files_only=True).get_text_config().vocab_size
