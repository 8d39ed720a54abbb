"""torch.ops.gqsa.linear (reference backend): matches dense F.linear on awkward shapes, checks every argument,
registers a correct fake impl and autograd, and compiles with fullgraph=True."""

import re

import pytest
import torch
import torch.nn.functional as F

from gqsa.format import PackedWeight, quantize_to_packed
from gqsa.ops import available_backends, packed_linear, reference_linear

K = 96
GROUP_SIZE = 16
X_SHAPES = [(1, K), (3, 7, K), (2, 5, K), (K,)]
BITS = (2, 3, 4, 8)
N_VALUES = (1, 3, 17)  # awkward out_features
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# |y - y_exact| <= REL * (|x| @ |W|.T + |b|): the rounding of W and y to the activation dtype.
REL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _packed(n: int, bits: int = 4, symmetric: bool = False, kind: str = "mixed", seed: int = 0,
            k: int = K, group_size: int = GROUP_SIZE) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    g_count = k // group_size
    w = torch.randn(n, k, generator=gen) * 0.2
    if kind == "all_kept":
        mask = torch.ones(n, g_count, dtype=torch.bool)
    elif kind == "none_kept":
        mask = torch.zeros(n, g_count, dtype=torch.bool)
    else:
        mask = torch.rand(n, g_count, generator=gen) < 0.6
        mask[0, 0] = True
        if n >= 3:
            mask[n // 2] = False  # a row with every group pruned
            mask[-1] = False  # the last row too
    return quantize_to_packed(w, mask, bits, group_size, symmetric=symmetric)


def _dense64(p: PackedWeight) -> torch.Tensor:
    """Independent float64 dense weight from the unpacked codes (pruned groups 0)."""
    u = p.unpack()
    zero = 2.0 ** (p.bits - 1) if u.zero_point is None else u.zero_point.double().unsqueeze(-1)
    w = (u.codes.double() - zero) * u.scale.double().unsqueeze(-1) * u.mask.unsqueeze(-1)
    return w.reshape(p.out_features, p.in_features)


def _op(x, p, bias=None, backend="auto"):
    return torch.ops.gqsa.linear(x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, bias,
                                 p.out_features, p.in_features, p.group_size, p.bits, backend)


def _x(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_dense_linear(dtype, has_bias, symmetric, n):
    bias = _x((n,), dtype, seed=99) if has_bias else None
    b64 = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    for i, shape in enumerate(X_SHAPES):
        # bits rotate over the parameters so that every (bits, x shape) pair is exercised for every dtype.
        bits = BITS[(i + N_VALUES.index(n) + 3 * has_bias) % len(BITS)]
        p = _packed(n, bits=bits, symmetric=symmetric, seed=n * 10 + bits)
        x = _x(shape, dtype, seed=len(shape))
        w64 = _dense64(p)
        want = x.double() @ w64.T + b64
        bound = x.double().abs() @ w64.abs().T + b64.abs()
        for backend in available_backends("cpu"):  # the reference and every kernel built here
            y = _op(x, p, bias, backend)
            assert y.dtype == dtype and y.shape == (*shape[:-1], n)
            if backend == "reference":  # the definition: F.linear with the weight dequantized in x's dtype
                assert torch.equal(y, F.linear(x, p.dequantize(x.dtype), bias))
            # An independent float64 evaluation, to the rounding of the activation dtype.
            assert bool(((y.double() - want).abs() <= REL[dtype] * bound + 1e-30).all()), (backend, bits, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_no_kept_group_gives_bias_only(dtype, has_bias):
    p = _packed(5, kind="none_kept")
    assert p.nnz == 0
    bias = _x((5,), dtype, seed=3) if has_bias else None
    x = _x((4, K), dtype)
    y = _op(x, p, bias)
    want = bias.expand(4, 5) if has_bias else torch.zeros(4, 5, dtype=dtype)
    assert torch.equal(y, want)


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_groups_kept(symmetric):
    p = _packed(9, bits=3, symmetric=symmetric, kind="all_kept")
    assert p.sparsity == 0.0
    x = _x((2, 3, K), torch.float32)
    torch.testing.assert_close(_op(x, p).double(), x.double() @ _dense64(p).T, rtol=1e-5, atol=1e-5)


def test_pruned_rows_output_exactly_the_bias():
    p = _packed(7)
    bias = torch.arange(7.0)
    y = _op(_x((4, K), torch.float32), p, bias)
    assert torch.equal(y[:, 3], torch.full((4,), 3.0))  # row 3 = n // 2 has no kept group
    assert torch.equal(y[:, 6], torch.full((4,), 6.0))


def test_large_group_sizes_and_many_groups():
    for group_size in (8, 128, 256):
        p = _packed(5, bits=2, symmetric=False, k=512, group_size=group_size)
        x = _x((3, 512), torch.float32)
        torch.testing.assert_close(_op(x, p).double(), x.double() @ _dense64(p).T, rtol=1e-5, atol=1e-5)


# ---- autograd -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", X_SHAPES, ids=str)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_gradients_match_dense_linear(shape, has_bias, symmetric):
    p = _packed(17, symmetric=symmetric)
    x = _x(shape, torch.float32).requires_grad_()
    bias = _x((17,), torch.float32, seed=5).requires_grad_() if has_bias else None
    y = _op(x, p, bias)
    grad_out = _x(y.shape, torch.float32, seed=7)
    y.backward(grad_out)

    x2 = x.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_() if has_bias else None
    F.linear(x2, p.dequantize(), bias2).backward(grad_out)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    if has_bias:
        torch.testing.assert_close(bias.grad, bias2.grad, rtol=1e-6, atol=1e-6)
    # And against the exact float64 weight: d(x @ W.T)/dx = grad_out @ W.
    want = grad_out.double() @ _dense64(p)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gradients_in_half_precision(dtype):
    p = _packed(3)
    x = _x((2, K), dtype).requires_grad_()
    bias = _x((3,), dtype, seed=2).requires_grad_()
    y = _op(x, p, bias)
    y.sum().backward()
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype
    torch.testing.assert_close(x.grad, torch.ones(2, 3, dtype=dtype) @ p.dequantize(dtype))
    torch.testing.assert_close(bias.grad, torch.full((3,), 2.0, dtype=dtype))


def test_gradient_flows_only_to_x_and_bias():
    p = _packed(3)
    x = _x((2, K), torch.float32).requires_grad_()
    y = _op(x, p)
    assert y.requires_grad
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape


OPCHECK_CASES = [
    ("asym-bias-fp32-3d", dict(n=17, symmetric=False), (3, 7, K), torch.float32, True),
    ("sym-nobias-bf16-1d", dict(n=3, symmetric=True, bits=3), (K,), torch.bfloat16, False),
    ("nnz0-bias-fp16", dict(n=4, kind="none_kept"), (2, K), torch.float16, True),
    ("asym-8bit-fp32-2d", dict(n=1, bits=8), (1, K), torch.float32, False),
]


@pytest.mark.parametrize(("case", "kwargs", "shape", "dtype", "has_bias"), OPCHECK_CASES,
                         ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(case, kwargs, shape, dtype, has_bias):
    p = _packed(**kwargs)
    x = _x(shape, dtype).requires_grad_()
    bias = _x((p.out_features,), dtype, seed=4).requires_grad_() if has_bias else None
    args = (x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, bias, p.out_features,
            p.in_features, p.group_size, p.bits, "auto")
    torch.library.opcheck(torch.ops.gqsa.linear.default, args)


def test_fake_impl_on_meta_tensors():
    p = _packed(17).to("meta")
    y = _op(torch.empty(4, 9, K, device="meta", dtype=torch.bfloat16), p)
    assert y.device.type == "meta" and y.shape == (4, 9, 17) and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="in_features"):
        _op(torch.empty(4, K + 16, device="meta"), p)


# ---- invalid input ------------------------------------------------------------------------------------


def _args(p: PackedWeight, x=None, bias=None):
    return {
        "x": _x((2, 3, K), torch.float32) if x is None else x,
        "crow_indices": p.crow_indices,
        "col_indices": p.col_indices,
        "values": p.values,
        "scale": p.scale,
        "zero_point": p.zero_point,
        "bias": bias,
        "out_features": p.out_features,
        "in_features": p.in_features,
        "group_size": p.group_size,
        "bits": p.bits,
        "backend": "auto",
    }


def _call(args):
    return torch.ops.gqsa.linear(*args.values())


P5 = _packed(5)
INVALID = [
    ("x_wrong_in_features", {"x": _x((2, K + 16), torch.float32)}, "in_features"),
    ("x_1d_wrong_length", {"x": _x((K - 1,), torch.float32)}, "in_features"),
    ("x_int", {"x": torch.ones(2, K, dtype=torch.int32)}, "x must be"),
    ("x_float64", {"x": torch.ones(2, K, dtype=torch.float64)}, "x must be"),
    ("x_0d", {"x": torch.tensor(1.0)}, "in_features"),
    ("bias_shape", {"bias": torch.zeros(6)}, "bias"),
    ("bias_2d", {"bias": torch.zeros(1, 5)}, "bias"),
    ("bias_dtype", {"bias": torch.zeros(5, dtype=torch.float16)}, "bias"),
    ("scale_dtype", {"scale": P5.scale.float()}, "scale"),
    ("scale_shape", {"scale": P5.scale[:-1]}, "scale"),
    ("values_shape", {"values": P5.values[:, :-1]}, "values"),
    ("values_dtype", {"values": P5.values.to(torch.int8)}, "values"),
    ("crow_length", {"crow_indices": P5.crow_indices[:-1]}, "crow_indices"),
    ("crow_dtype", {"crow_indices": P5.crow_indices.long()}, "crow_indices"),
    ("col_dtype", {"col_indices": P5.col_indices.int()}, "col_indices"),
    ("col_2d", {"col_indices": P5.col_indices.reshape(-1, 1)}, "col_indices"),
    ("zero_point_shape", {"zero_point": torch.zeros(P5.zero_point.numel() + 1, dtype=torch.uint8)}, "zero_point"),
    ("zero_point_dtype", {"zero_point": P5.zero_point.to(torch.int8)}, "zero_point"),
    ("bits", {"bits": 5}, "bits"),
    ("group_size_not_pow2", {"group_size": 12}, "group_size"),
    ("group_size_too_small", {"group_size": 4}, "group_size"),
    ("group_size_not_dividing", {"group_size": 64}, "group_size"),
    ("out_features", {"out_features": 0}, "out_features"),
    ("unknown_backend", {"backend": "no_such_kernel"}, "no_such_kernel"),
]


@pytest.mark.parametrize(("case", "change", "word"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_input_raises_value_error_naming_the_argument(case, change, word):
    args = {**_args(P5), **change}
    with pytest.raises(ValueError, match=re.escape(word)):
        _call(args)


def test_unknown_backend_message_lists_known_backends():
    with pytest.raises(ValueError, match=r"unknown gqsa backend 'cuda_fast'.*reference"):
        _call({**_args(P5), "backend": "cuda_fast"})


@pytest.mark.parametrize(("case", "change", "word"), INVALID[:6], ids=[c[0] for c in INVALID[:6]])
def test_fake_impl_checks_arguments_too(case, change, word):
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in {**_args(P5), **change}.items()}
    with pytest.raises(ValueError, match=re.escape(word)):
        _call(args)


def test_tensor_on_another_device_is_named():
    args = {**_args(P5), "scale": P5.scale.to("meta")}
    with pytest.raises(ValueError, match="scale is on meta"):
        _call(args)


def test_backend_defaults_to_auto_and_keywords_work():
    p = _packed(3)
    x = _x((2, K), torch.float32).requires_grad_()
    y = torch.ops.gqsa.linear(x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, None, 3, K,
                              GROUP_SIZE, 4)
    torch.testing.assert_close(y, F.linear(x, p.dequantize()), rtol=1e-5, atol=1e-5)  # auto: any kernel
    y.sum().backward()  # the autograd context unpacks the defaulted backend too
    torch.testing.assert_close(x.grad, torch.ones(2, 3) @ p.dequantize())
    y2 = torch.ops.gqsa.linear(x, p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, None,
                               out_features=3, in_features=K, group_size=GROUP_SIZE, bits=4, backend="reference")
    assert torch.equal(y2, F.linear(x, p.dequantize()))


def test_reference_linear_is_the_plain_function():
    p = _packed(3)
    x = _x((2, K), torch.float32)
    args = _args(p, x=x)
    del args["backend"]
    assert torch.equal(reference_linear(*args.values()), F.linear(x, p.dequantize(), None))


# ---- torch.compile ------------------------------------------------------------------------------------


def _model_fn(p, bias):
    def fn(x):
        return torch.relu(packed_linear(x, p, bias)) * 2.0 + 1.0

    return fn


def test_compile_fullgraph_aot_eager_forward_and_backward():
    torch._dynamo.reset()
    p = _packed(17)
    bias = _x((17,), torch.float32, seed=3)
    fn = _model_fn(p, bias)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for shape in [(3, K), (2, 5, K)]:
        x = _x(shape, torch.float32).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y = compiled(x)
        torch.testing.assert_close(y, fn(x2), rtol=0, atol=0)
        y.sum().backward()
        fn(x2).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)


def test_compile_fullgraph_inductor():
    # Inductor compiles C++ on CPU: ~25 s on a cold cache with 2 cores, ~4 s warm.
    torch._dynamo.reset()
    p = _packed(17, symmetric=True)
    fn = _model_fn(p, None)
    compiled = torch.compile(fn, fullgraph=True)
    x = _x((3, K), torch.float32)
    torch.testing.assert_close(compiled(x), fn(x))
