"""Backend selection behind gqsa::linear: reference, auto, registered kernels, unavailable kernels."""

import pytest
import torch
import torch.nn.functional as F

from gqsa.format import quantize_to_packed
from gqsa.ops import Backend, Kernel, available_backends, packed_linear, register_kernel
from gqsa.ops import backends as backends_module

HIGH = 10**9  # outranks any real kernel a future build registers


@pytest.fixture
def registry():
    """The kernel registry, restored afterwards (dummy kernels never leak into other tests)."""
    before = dict(backends_module._KERNELS)
    yield backends_module._KERNELS
    backends_module._KERNELS.clear()
    backends_module._KERNELS.update(before)


@pytest.fixture
def packed():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 32, generator=gen)
    mask = torch.rand(5, 2, generator=gen) < 0.7
    return quantize_to_packed(w, mask, 4, 16)


def _recording_kernel(name, calls, *, available=True, device_types=("cpu",), priority=HIGH, marker=123.0):
    def fn(x, crow, col, values, scale, zero, bias, out_features, in_features, group_size, bits):
        calls.append((name, tuple(x.shape), out_features, in_features, group_size, bits))
        return torch.full((*x.shape[:-1], out_features), marker, dtype=x.dtype, device=x.device)

    return Kernel(name=name, device_types=frozenset(device_types), fn=fn, available=lambda: available,
                  priority=priority)


def test_backend_enum_values():
    assert Backend.AUTO.value == "auto" and Backend.REFERENCE.value == "reference"
    assert Backend("auto") is Backend.AUTO


def test_available_backends_always_lists_auto_and_reference():
    names = available_backends("cpu")
    assert names[:2] == ["auto", "reference"]
    assert available_backends("some_device")[:2] == ["auto", "reference"]


@pytest.mark.parametrize("name", ["auto", "reference"])
def test_reserved_names_cannot_be_registered(registry, name):
    with pytest.raises(ValueError, match="reserved"):
        register_kernel(_recording_kernel(name, []))
    assert name not in registry


def test_auto_uses_an_available_kernel_for_the_device(registry, packed):
    calls = []
    register_kernel(_recording_kernel("dummy_cpu", calls))
    assert "dummy_cpu" in available_backends("cpu")
    assert "dummy_cpu" not in available_backends("cuda")
    x = torch.randn(2, 3, 32)
    y = packed_linear(x, packed, backend="auto")
    assert calls == [("dummy_cpu", (2, 3, 32), 5, 32, 16, 4)]
    assert y.shape == (2, 3, 5) and bool((y == 123.0).all())
    # The default backend is auto.
    packed_linear(x, packed)
    assert len(calls) == 2
    # Naming the kernel explicitly works too; "reference" bypasses it.
    packed_linear(x, packed, backend="dummy_cpu")
    assert len(calls) == 3
    y_ref = packed_linear(x, packed, backend="reference")
    assert len(calls) == 3
    assert torch.equal(y_ref, F.linear(x, packed.dequantize()))


def test_auto_prefers_the_highest_priority(registry, packed):
    calls = []
    register_kernel(_recording_kernel("dummy_low", calls, priority=HIGH - 1, marker=1.0))
    register_kernel(_recording_kernel("dummy_high", calls, priority=HIGH, marker=2.0))
    register_kernel(_recording_kernel("dummy_higher_but_gpu", calls, priority=HIGH + 1, device_types=("cuda",)))
    y = packed_linear(torch.randn(4, 32), packed)
    assert [c[0] for c in calls] == ["dummy_high"]
    assert bool((y == 2.0).all())
    names = available_backends("cpu")
    assert names.index("dummy_high") < names.index("dummy_low")
    assert "dummy_higher_but_gpu" not in names


def test_auto_skips_unavailable_kernels_and_falls_back(registry, packed):
    calls = []
    register_kernel(_recording_kernel("dummy_unavailable", calls, available=False))
    register_kernel(_recording_kernel("dummy_gpu_only", calls, device_types=("cuda",)))
    x = torch.randn(3, 32)
    y = packed_linear(x, packed, backend="auto")
    assert calls == []
    torch.testing.assert_close(y, F.linear(x, packed.dequantize()))
    assert "dummy_unavailable" not in available_backends("cpu")


def test_naming_an_unavailable_kernel_raises(registry, packed):
    calls = []
    register_kernel(_recording_kernel("dummy_unavailable", calls, available=False))
    with pytest.raises(ValueError, match="dummy_unavailable"):
        packed_linear(torch.randn(3, 32), packed, backend="dummy_unavailable")
    assert calls == []


def test_naming_a_kernel_for_another_device_raises(registry, packed):
    calls = []
    register_kernel(_recording_kernel("dummy_gpu_only", calls, device_types=("cuda",)))
    with pytest.raises(ValueError, match=r"dummy_gpu_only.*cpu"):
        packed_linear(torch.randn(3, 32), packed, backend="dummy_gpu_only")
    assert calls == []


def test_registering_again_replaces(registry, packed):
    calls = []
    register_kernel(_recording_kernel("dummy", calls, marker=1.0))
    register_kernel(_recording_kernel("dummy", calls, marker=7.0))
    assert bool((packed_linear(torch.randn(1, 32), packed, backend="dummy") == 7.0).all())



def test_named_only_kernels_run_by_name_but_never_by_auto(registry, packed):
    """A kernel that serves a device type only when named (Triton's interpreter on CPU) is skipped by "auto" and
    by the default listing, and runs when asked for."""
    calls = []
    kernel = _recording_kernel("dummy_named_only", calls, priority=HIGH + 5, marker=7.0)
    register_kernel(Kernel(name=kernel.name, device_types=kernel.device_types, fn=kernel.fn,
                           available=kernel.available, priority=kernel.priority, named_only=frozenset({"cpu"})))
    x = torch.randn(2, 32)
    torch.testing.assert_close(packed_linear(x, packed, backend="auto"),
                               packed_linear(x, packed, backend="reference"))
    assert "dummy_named_only" not in available_backends("cpu", approximate=True)
    assert "dummy_named_only" in available_backends("cpu", named_only=True)
    assert bool((packed_linear(x, packed, backend="dummy_named_only") == 7.0).all())
    assert [c[0] for c in calls] == ["dummy_named_only"]
