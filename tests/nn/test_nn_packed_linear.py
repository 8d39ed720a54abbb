"""PackedLinear: forward is the op, state dict layout, dtype moves keep fp16 scales, meta skeleton + assign load."""

import pytest
import torch
import torch.nn.functional as F

from gqsa.format import PackedWeight, quantize_to_packed
from gqsa.nn import PackedLinear
from gqsa.ops import packed_linear

N, K = 11, 64
ASYM_KEYS = {"crow_indices", "col_indices", "values", "scale", "zero_point"}


def _packed(symmetric: bool = False, bits: int = 4, seed: int = 0) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.1
    mask = torch.rand(N, K // 16, generator=gen) < 0.6
    mask[0, 0] = True
    mask[4] = False  # a row with every group pruned
    return quantize_to_packed(w, mask, bits, 16, symmetric=symmetric)


def _bias(dtype=torch.float32):
    return torch.linspace(-1, 1, N).to(dtype)


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_from_packed_forward_equals_the_op(symmetric, has_bias):
    p = _packed(symmetric)
    bias = _bias() if has_bias else None
    layer = PackedLinear.from_packed(p, bias)
    assert (layer.in_features, layer.out_features, layer.bits, layer.group_size) == (K, N, 4, 16)
    assert layer.symmetric is symmetric and layer.nnz == p.nnz
    for x in (_x(3, K), _x(2, 5, K), _x(K)):
        y = layer(x)
        assert torch.equal(y, packed_linear(x, p, bias))  # the same backend: bit for bit
        torch.testing.assert_close(y, F.linear(x, p.dequantize(), bias), rtol=1e-5, atol=1e-5)


def test_from_packed_shares_tensors():
    p = _packed()
    bias = _bias()
    layer = PackedLinear.from_packed(p, bias)
    for name, t in p.tensors().items():
        assert getattr(layer, name).data_ptr() == t.data_ptr()
    assert layer.bias.data_ptr() == bias.data_ptr()


def test_state_dict_keys_and_dtypes_asymmetric_with_bias():
    layer = PackedLinear.from_packed(_packed(), _bias())
    sd = layer.state_dict()
    assert set(sd) == ASYM_KEYS | {"bias"}
    assert sd["crow_indices"].dtype == torch.int32
    assert sd["col_indices"].dtype == torch.int16
    assert sd["values"].dtype == torch.uint8
    assert sd["scale"].dtype == torch.float16
    assert sd["zero_point"].dtype == torch.uint8
    assert sd["bias"].dtype == torch.float32
    assert list(layer.parameters()) == []  # an inference layer: everything is a buffer


def test_symmetric_layer_has_no_zero_point():
    layer = PackedLinear.from_packed(_packed(symmetric=True))
    sd = layer.state_dict()
    assert set(sd) == ASYM_KEYS - {"zero_point"}
    assert layer.zero_point is None and layer.symmetric
    assert "zero_point" not in dict(layer.named_buffers())
    assert layer.packed_weight().zero_point is None
    skeleton = PackedLinear(K, N, bits=4, group_size=16, nnz=3, symmetric=True)
    assert "zero_point" not in skeleton.state_dict() and skeleton.zero_point is None


def test_packed_weight_and_metadata_round_trip():
    p = _packed()
    layer = PackedLinear.from_packed(p, _bias())
    again = layer.packed_weight()
    again.validate()
    assert again.metadata() == p.metadata()
    for name, t in p.tensors().items():
        assert torch.equal(getattr(again, name), t)
    assert layer.metadata() == {**p.metadata(), "bias": True}
    assert PackedLinear.from_packed(p).metadata()["bias"] is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_move_keeps_fp16_scale_and_casts_bias(dtype):
    p = _packed()
    layer = PackedLinear.from_packed(p, _bias())
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    out = layer.to(dtype)
    assert out is layer
    assert layer.scale.dtype == torch.float16
    assert torch.equal(layer.scale, before["scale"])
    assert layer.bias.dtype == dtype
    assert torch.equal(layer.bias, before["bias"].to(dtype))
    for name in ("crow_indices", "col_indices", "values", "zero_point"):
        assert getattr(layer, name).dtype == before[name].dtype
        assert torch.equal(getattr(layer, name), before[name])
    assert layer.state_dict()["scale"].dtype == torch.float16


@pytest.mark.parametrize("convert", ["half", "bfloat16", "float", "double"])
def test_dtype_shortcuts_keep_fp16_scale(convert):
    layer = PackedLinear.from_packed(_packed(), _bias())
    getattr(layer, convert)()
    assert layer.scale.dtype == torch.float16


def test_dtype_move_of_a_parent_module_reaches_the_layer():
    model = torch.nn.Sequential(PackedLinear.from_packed(_packed(), _bias()), torch.nn.Linear(N, 3))
    model.to(torch.bfloat16)
    assert model[0].scale.dtype == torch.float16
    assert model[0].bias.dtype == torch.bfloat16 and model[1].weight.dtype == torch.bfloat16
    assert model(_x(2, K, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_layer_forward():
    p = _packed()
    layer = PackedLinear.from_packed(p, _bias()).to(torch.bfloat16)
    x = _x(4, K, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # bf16 output of an fp32-accurate product (kernels may keep the weight in fp32, the reference rounds it to bf16)
    want = F.linear(x.float(), p.dequantize(), _bias(torch.bfloat16).float())
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    with pytest.raises(ValueError, match="bias"):
        layer(_x(4, K))  # float32 activations no longer match the bf16 bias


def test_to_device_keeps_everything():
    p = _packed()
    layer = PackedLinear.from_packed(p, _bias()).to("cpu")
    assert torch.equal(layer(_x(2, K)), packed_linear(_x(2, K), p, _bias()))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_meta_skeleton_then_assign_load_reproduces_the_output(symmetric, has_bias):
    p = _packed(symmetric, bits=3)
    source = PackedLinear.from_packed(p, _bias() if has_bias else None)
    sd = {name: t.clone() for name, t in source.state_dict().items()}
    meta = source.metadata()

    skeleton = PackedLinear(**meta, device="meta")
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())
    assert {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in sd.items()
    }
    assert "nnz=" in repr(skeleton)  # repr works before loading

    result = skeleton.load_state_dict(sd, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(t.device.type == "cpu" for t in skeleton.state_dict().values())
    skeleton.packed_weight().validate()
    for x in (_x(3, K), _x(2, 2, K)):
        assert torch.equal(skeleton(x), source(x))


def test_skeleton_rejects_state_dict_of_another_shape():
    source = PackedLinear.from_packed(_packed())
    skeleton = PackedLinear(**{**source.metadata(), "nnz": source.nnz + 1})
    with pytest.raises(RuntimeError, match="size mismatch"):
        skeleton.load_state_dict(source.state_dict())


def test_empty_layer_buffers_have_format_shapes():
    layer = PackedLinear(K, N, bits=2, group_size=32, nnz=7, bias=True, dtype=torch.bfloat16)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()}
    assert shapes == {
        "crow_indices": ((N + 1,), torch.int32),
        "col_indices": ((7,), torch.int16),
        "values": ((7, 8), torch.uint8),
        "scale": ((7,), torch.float16),
        "zero_point": ((2,), torch.uint8),
        "bias": ((N,), torch.bfloat16),
    }


def test_backend_is_used_by_forward():
    layer = PackedLinear.from_packed(_packed(), backend="no_such_kernel")
    with pytest.raises(ValueError, match="no_such_kernel"):
        layer(_x(2, K))
    layer.backend = "reference"
    assert torch.equal(layer(_x(2, K)), F.linear(_x(2, K), _packed().dequantize()))


def test_extra_repr():
    text = repr(PackedLinear.from_packed(_packed(), _bias()))
    assert f"in_features={K}" in text and f"out_features={N}" in text
    assert "bits=4" in text and "group_size=16" in text and "bias=True" in text


def test_compiled_layer_fullgraph():
    torch._dynamo.reset()
    p = _packed(symmetric=True)
    layer = PackedLinear.from_packed(p, _bias())
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for x in (_x(3, K), _x(2, 4, K)):
        assert torch.equal(compiled(x), layer(x))


def test_gradient_through_the_layer_reaches_the_input_only():
    p = _packed()
    layer = PackedLinear.from_packed(p, _bias())
    x = _x(3, K).requires_grad_()
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, N) @ p.dequantize())


def test_former_name_gqsalinear_is_the_same_class():
    import gqsa
    import gqsa.nn
    import gqsa.nn.packed_linear

    for where in (gqsa, gqsa.nn, gqsa.nn.packed_linear):
        assert where.GQSALinear is PackedLinear
        assert "GQSALinear" in getattr(where, "__all__", ["GQSALinear"])


def test_a_model_pickled_under_the_former_name_loads():
    """torch.save(module) records the class as module + qualified name: one pickled before the rename names
    ``gqsa.nn.packed_linear.GQSALinear``, which the alias still resolves."""
    import io

    layer = PackedLinear.from_packed(_packed(), _bias())
    buffer = io.BytesIO()
    PackedLinear.__qualname__ = "GQSALinear"  # as pickled before the rename
    try:
        torch.save(layer, buffer)
    finally:
        PackedLinear.__qualname__ = "PackedLinear"
    assert b"GQSALinear" in buffer.getvalue() and b"PackedLinear" not in buffer.getvalue()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is PackedLinear
    x = _x(3, K)
    assert torch.equal(loaded(x), layer(x))
