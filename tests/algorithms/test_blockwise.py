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


def test_each_dense_layer_is_released_once_replaced():
    """Compressing a block holds one dense layer at a time, not the whole block (peak memory of big blocks): when
    a layer is compressed, every layer replaced before it is gone."""
    import gc
    import weakref

    from gqsa.algorithms.blockwise import collect_block_hessians, compress_block_linears
    from gqsa.algorithms.activation_store import ActivationStore
    from gqsa.models.adapter import block_linears
    from gqsa.pipeline import _layer_compressor

    model = tiny_model("llama")
    block = model.model.layers[0]
    hidden = ActivationStore()
    hidden.append(torch.randn(1, 16, model.config.hidden_size))
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden[0], torch.arange(16)[None])}
    stats = collect_block_hessians(block, hidden, kwargs)
    refs = {name: weakref.ref(m) for name, m in block_linears(block).items()}
    compress = _layer_compressor(_config(0))
    alive_before = {}

    def compress_linear(name, linear, acc):
        gc.collect()
        alive_before[name] = sorted(n for n, r in refs.items() if r() is not None and r() is not linear
                                    and f"model.layers.0.{n}" != name)
        return compress(name, linear, acc)

    compress_block_linears(block, "model.layers.0", stats, compress_linear)
    names = list(refs)
    for i, name in enumerate(names):
        assert alive_before[f"model.layers.0.{name}"] == sorted(names[i + 1:]), name
