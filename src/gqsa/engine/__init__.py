"""Inference engine: load a (compressed) model, decode with a static KV cache, stream, time it."""

from gqsa.engine.fused import FusedDecoder, KVCache, fused_decoder
from gqsa.engine.generate import (
    GenerationResult,
    GenerationSpec,
    decode_one_token,
    encode_prompt,
    eos_token_ids,
    generate,
    generate_text,
    new_cache,
    prefill,
    use_fastest_backend,
)
from gqsa.engine.sampling import logits_to_probs, sample

__all__ = [
    "FusedDecoder",
    "GenerationResult",
    "GenerationSpec",
    "decode_one_token",
    "encode_prompt",
    "eos_token_ids",
    "fused_decoder",
    "generate",
    "generate_text",
    "KVCache",
    "logits_to_probs",
    "new_cache",
    "prefill",
    "sample",
    "use_fastest_backend",
]
