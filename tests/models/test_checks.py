"""Model checks before work: finite weights (the tensor named) and windows within the model's context."""

import pytest
import torch
from torch import nn

from gqsa.models.checks import check_context_length, check_finite_weights, max_context_length
from tiny import tiny_config, tiny_model


def test_check_finite_weights_names_the_first_bad_parameter_or_buffer():
    model = tiny_model("llama")
    check_finite_weights(model)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^dir: tensor model.layers.0.mlp.gate_proj.weight holds 1 non-finite "
                                         r"value of 8192 \(0 NaN, 1 Inf\)"):
        check_finite_weights(model, source="dir")

    holder = nn.Module()
    holder.register_buffer("table", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"tensor table holds 1 non-finite value"):
        check_finite_weights(holder)


def test_max_context_length_reads_the_text_config():
    import transformers

    assert max_context_length(tiny_model("llama")) == 512
    assert max_context_length(tiny_config("qwen3", max_position_embeddings=128)) == 128
    text = tiny_config("gemma3_text", max_position_embeddings=256).to_dict()
    multimodal = transformers.Gemma3Config(text_config=text)
    assert max_context_length(multimodal) == 256
    assert max_context_length(nn.Linear(2, 2)) is None


def test_check_context_length_names_both_numbers():
    model = tiny_model("llama")
    check_context_length(model, 512)
    with pytest.raises(ValueError, match=r"--seq-len is 513 tokens, more than the model's context of 512 tokens"):
        check_context_length(model, 513, "--seq-len")
    check_context_length(nn.Linear(2, 2), 10**9)  # unknown context: nothing to check
