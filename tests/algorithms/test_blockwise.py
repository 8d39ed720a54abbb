"""The block-wise drivers refuse calibration activations that are NaN/Inf, naming the block and the layer."""

import pytest
import torch

from gqsa.algorithms.blockwise import check_finite_input
from gqsa.compress import compress_model
from gqsa.config import BQPOSpec, CalibSpec, CompressConfig, QuantSpec, SparsitySpec
from tiny import tiny_model

CALIB = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def _config(bqpo_epochs: int, method: str = "gqsa") -> CompressConfig:
    group = method == "gqsa"
    return CompressConfig(method=method, quant=QuantSpec(bits=4, group_size=16) if group else None,
                          sparsity=SparsitySpec(ratio=0.5, pattern="group" if group else "unstructured"),
                          calib=CalibSpec(samples=2, seq_len=16), bqpo=BQPOSpec(epochs=bqpo_epochs, val_windows=0))


def overflowing_model():
    """Finite weights whose MLP product overflows float32 in block 0: the input of its down_proj is Inf/NaN."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e20)
        model.model.layers[0].mlp.up_proj.weight.mul_(1e20)
    return model


@pytest.mark.parametrize("bqpo_epochs", [0, 1])
def test_overflow_in_block_0_names_the_block_and_layer(bqpo_epochs):
    with pytest.raises(ValueError, match=r"^block 0, layer model.layers.0.mlp.down_proj: calibration activations "
                                         r"contain NaN/Inf \(the model overflows in float32"):
        compress_model(overflowing_model(), _config(bqpo_epochs), calib_ids=CALIB, progress=False)


@pytest.mark.parametrize("bqpo_epochs,method", [(0, "gqsa"), (1, "gqsa"), (0, "wanda")])
def test_nan_from_an_earlier_block_names_the_later_block(bqpo_epochs, method):
    model = tiny_model("llama")

    def nan_output(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[..., 3] = float("nan")
        return output

    model.model.layers[0].register_forward_hook(nan_output)
    with pytest.raises(ValueError, match=r"^block 1, layer model.layers.1.self_attn.q_proj: calibration activations "
                                         r"contain NaN/Inf"):
        compress_model(model, _config(bqpo_epochs, method), calib_ids=CALIB, progress=False)


def test_check_finite_input():
    check_finite_input(torch.ones(2, 3), 0, "x")
    with pytest.raises(ValueError, match=r"^block 5, layer m.l: calibration activations contain NaN/Inf \(the model "
                                         r"overflows in float16"):
        check_finite_input(torch.tensor([1.0, float("inf")], dtype=torch.float16), 5, "m.l")
    with pytest.raises(ValueError, match=r"^layer q: "):
        check_finite_input(torch.tensor([float("nan")]), None, "q")
