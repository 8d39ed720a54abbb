"""compress_model and calibration_ids refuse, before any work, what cannot be compressed: non-finite weights in a
layer (the layer named) and calibration windows longer than the model's context (both numbers named)."""

import pytest
import torch

from gqsa.compress import calibration_ids, check_layers, compress_model
from gqsa.config import CalibSpec, CompressConfig, QuantSpec, SparsitySpec
from tiny import tiny_model, tiny_tokenizer


def _config(method="gqsa", seq_len=16, **calib):
    return CompressConfig(method=method, quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                          calib=CalibSpec(samples=2, seq_len=seq_len, **calib))


@pytest.mark.parametrize("method", ["gqsa", "magnitude"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_naming_the_layer(method, value):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[4, 9] = value
    first = model.model.layers[0].self_attn.q_proj
    before = first.weight.clone()
    with pytest.raises(ValueError, match=r"^model.layers.1.mlp.down_proj: the weight holds 1 non-finite value"):
        compress_model(model, _config(method), calib_ids=torch.zeros(2, 16, dtype=torch.long), progress=False)
    assert model.model.layers[0].self_attn.q_proj is first and torch.equal(first.weight, before)  # nothing done


def test_check_layers_looks_at_the_bias_too():
    linear = torch.nn.Linear(16, 4)
    with torch.no_grad():
        linear.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"^l: the bias holds 1 non-finite value of 4 \(1 NaN, 0 Inf\)"):
        check_layers({"l": linear}, _config())


def test_calibration_windows_longer_than_the_context_are_refused():
    model = tiny_model("llama")  # max_position_embeddings 512
    with pytest.raises(ValueError, match=r"calibration window length .* is 1024 tokens, more than the model's "
                                         r"context of 512 tokens"):
        compress_model(model, _config(seq_len=1024), calib_ids=torch.zeros(2, 1024, dtype=torch.long),
                       progress=False)
    with pytest.raises(ValueError, match=r"1024 tokens, more than the model's context of 512"):
        calibration_ids(tiny_tokenizer(), _config(seq_len=1024, dataset="/nonexistent/never-read.txt"), model)
    ids = calibration_ids(tiny_tokenizer(), _config(seq_len=512, dataset="tiny"), model)
    assert ids.shape == (2, 512)
