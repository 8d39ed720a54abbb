"""heldout_perplexity refuses windows longer than the model's context before it reads any text."""

import pytest

from gqsa.eval.heldout import heldout_perplexity
from tiny import tiny_model, tiny_tokenizer


def test_windows_longer_than_the_context_are_refused_before_the_text_is_read():
    model = tiny_model("llama", max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"evaluation window length .* is 65 tokens, more than the model's "
                                         r"context of 64 tokens"):
        heldout_perplexity(model, tiny_tokenizer(), "/nonexistent/never-read.txt", seq_len=65, progress=False)


def test_windows_as_long_as_the_context_are_scored(text_file):
    model = tiny_model("llama", max_position_embeddings=16)
    result = heldout_perplexity(model, tiny_tokenizer(), str(text_file), seq_len=16, max_tokens=64, progress=False)
    assert result["seq_len"] == 16 and result["windows"] == 4
