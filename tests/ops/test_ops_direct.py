"""Direct kernel calls (``gqsa.ops.direct``) give exactly what the registered op gives, and the layer rebinds.

Every backend on awkward shapes (N = 37, K = 7 groups), rows with no kept group, 0% and 100% kept, every code
width, symmetric and asymmetric, bias, 16-bit activations, 1-D / 3-D / non-contiguous x, and batches above the
native kernel's limit; invalid inputs raise as the op does; PackedLinear uses the bound call only for plain
inference and rebinds when its buffers, backend or device change.
"""

import copy
import pickle

import pytest
import torch

from gqsa.format import quantize_to_packed
from gqsa.nn import PackedLinear
from gqsa.ops import available_backends, packed_linear
from gqsa.ops import cpu as cpu_kernels
from gqsa.ops.direct import bind_linear

N, GROUPS, G = 37, 7, 16
K = G * GROUPS
BACKENDS = available_backends("cpu")[1:]  # reference and every built kernel


def _packed(bits=4, symmetric=False, kept="mixed", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.1  # (N, K)
    mask = torch.rand(N, GROUPS, generator=gen) < 0.5  # (N, G)
    mask[0], mask[5], mask[-1] = True, False, False  # a full row, rows with nothing kept (one of them the last)
    if kept != "mixed":
        mask[:] = kept == "all"
    return quantize_to_packed(w, mask, bits, G, symmetric=symmetric)


def _bound(p, bias=None, backend="auto"):
    return bind_linear(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, bias, N, K, G, p.bits,
                       backend)


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, False), (4, True), (8, False)])
@pytest.mark.parametrize("kept", ["mixed", "all", "none"])
def test_bound_call_equals_the_op_bit_for_bit(backend, bits, symmetric, kept):
    p = _packed(bits, symmetric, kept, seed=bits)
    bound = _bound(p, backend=backend)
    m_above = cpu_kernels.native_batch_limit(N, K) + 3
    for x in (_x(1, K), _x(3, K), _x(K), _x(2, 5, K), _x(m_above, K), _x(K, 4).T, _x(0, K)):
        want = packed_linear(x, p, backend=backend)
        got = bound(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bound_call_with_bias_and_16_bit_activations(backend, dtype):
    p = _packed()
    bias = torch.linspace(-1, 1, N).to(dtype)
    bound = _bound(p, bias, backend)
    for x in (_x(1, K, dtype=dtype), _x(2, 3, K, dtype=dtype)):
        assert torch.equal(bound(x), packed_linear(x, p, bias, backend=backend))
    without_bias = _bound(p, backend=backend)
    x = _x(2, K, dtype=dtype)
    assert torch.equal(without_bias(x), packed_linear(x, p, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_call_rejects_what_the_op_rejects(backend):
    p = _packed()
    bound = _bound(p, torch.zeros(N), backend)
    with pytest.raises(ValueError, match="in_features=112"):
        bound(_x(2, K + 16))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        _bound(p, backend=backend)(_x(2, K).double())
    with pytest.raises(ValueError, match="bias"):
        bound(_x(2, K, dtype=torch.bfloat16))  # the bias is float32


def test_binding_checks_the_weight_and_the_backend_once():
    p = _packed()
    with pytest.raises(ValueError, match="no_such_kernel"):
        _bound(p, backend="no_such_kernel")
    with pytest.raises(ValueError, match="scale"):
        bind_linear(p.crow_indices, p.col_indices, p.values, p.scale.float(), p.zero_point, None, N, K, G, 4)


def test_layer_takes_the_bound_call_for_inference_and_the_op_otherwise(monkeypatch):
    p = _packed()
    layer = PackedLinear.from_packed(p, torch.linspace(-1, 1, N))
    op_calls = []
    op = torch.ops.gqsa.linear

    class Spy:
        def __call__(self, *args):
            op_calls.append(1)
            return op(*args)

    monkeypatch.setattr(torch.ops.gqsa, "linear", Spy())
    x = _x(3, K)
    with torch.inference_mode():
        want = layer(x)
    with torch.no_grad():
        layer(x)
    assert op_calls == [] and layer._bound is not None
    y = layer(x.clone().requires_grad_())  # autograd: the op
    assert op_calls == [1] and torch.equal(y.detach(), want) and y.requires_grad
    layer.fast_path = False
    layer(x)
    assert op_calls == [1, 1]


def test_layer_rebinds_when_buffers_backend_or_dtype_change():
    layer = PackedLinear.from_packed(_packed(seed=0), torch.linspace(-1, 1, N))
    x = _x(2, K)
    with torch.inference_mode():
        first = layer(x)
        bound = layer._bound
        other = _packed(seed=5)
        for name, t in other.tensors().items():
            setattr(layer, name, t)
        assert torch.equal(layer(x), packed_linear(x, other, layer.bias)) and layer._bound is not bound
        layer.backend = "reference"
        assert torch.equal(layer(x), packed_linear(x, other, layer.bias, backend="reference"))
        layer.backend = "no_such_kernel"
        with pytest.raises(ValueError, match="no_such_kernel"):
            layer(x)
        layer.backend = "auto"
        layer.to(torch.bfloat16)
        xb = x.bfloat16()
        assert torch.equal(layer(xb), packed_linear(xb, other, layer.bias))
        assert not torch.equal(layer(xb).float(), first)


def test_copies_and_pickles_of_a_bound_layer_compute_with_their_own_buffers():
    layer = PackedLinear.from_packed(_packed(), torch.linspace(-1, 1, N))
    x = _x(2, K)
    with torch.inference_mode():
        want = layer(x)
        twin = copy.deepcopy(layer)
        restored = pickle.loads(pickle.dumps(layer))
        assert torch.equal(twin(x), want) and torch.equal(restored(x), want)
        assert twin._bound is not layer._bound and restored._bound is not layer._bound
        twin.scale.mul_(2)  # in place: same pointer, and the kernel reads the new values
        assert torch.allclose(twin(x) - twin.bias, 2 * (want - layer.bias), rtol=1e-5, atol=1e-5)


def _graph_targets(fn, *args):
    """Targets of the FX graph that torch.compile traces for ``fn(*args)`` (and its result)."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return targets, out


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the native CPU kernel is not built")
def test_compiled_inference_uses_the_direct_op_once_bound_and_the_public_op_otherwise():
    layer = PackedLinear.from_packed(_packed(), torch.linspace(-1, 1, N))
    x = _x(3, K)
    with torch.no_grad():
        targets, _ = _graph_targets(layer, x)  # never bound eagerly: the public op
        assert "gqsa.linear" in targets and "gqsa.linear_direct" not in targets
        want = layer(x)  # binds
        targets, got = _graph_targets(layer, x)
    assert "gqsa.linear_direct" in targets and torch.equal(got, want)
    targets, got = _graph_targets(layer, x.clone().requires_grad_())  # autograd: the public op
    assert "gqsa.linear" in targets and torch.equal(got.detach(), want)
