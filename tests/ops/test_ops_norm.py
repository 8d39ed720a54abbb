"""gqsa.ops.norm.add_rms_norm: the native path against transformers' RMSNorm formula, the residual add in place,
and the torch path (other dtypes, non-contiguous input, no extension)."""

import pytest
import torch

from gqsa.ops import cpu as cpu_kernels
from gqsa.ops.norm import add_rms_norm


def _formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, in float32."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 7, 64), (3, 5), (1, 1, 1)])
def test_equals_the_formula_and_adds_the_residual_in_place(shape):
    weight = _x(shape[-1], seed=1)
    x, delta = _x(*shape), _x(*shape, seed=2)
    want_x = x + delta
    got = add_rms_norm(x, weight, 1e-6, delta)
    assert torch.equal(x, want_x)  # x += delta
    torch.testing.assert_close(got, _formula(want_x, weight, 1e-6), rtol=2e-6, atol=1e-6)
    before = x.clone()
    torch.testing.assert_close(add_rms_norm(x, weight, 1e-6), _formula(x, weight, 1e-6), rtol=2e-6, atol=1e-6)
    assert torch.equal(x, before)  # no delta: x untouched


def test_eps_and_zero_rows():
    weight = torch.ones(16)
    x = torch.zeros(2, 16)
    x[1] = 1e-4
    got = add_rms_norm(x, weight, 1e-2)
    assert torch.equal(got[0], torch.zeros(16))
    torch.testing.assert_close(got[1], _formula(x[1:], weight, 1e-2)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_follows_transformers_order(dtype):
    weight = _x(32, seed=1).to(dtype)
    x, delta = _x(4, 32).to(dtype), _x(4, 32, seed=2).to(dtype)
    want = _formula(x + delta, weight, 1e-5)
    got = add_rms_norm(x, weight, 1e-5, delta)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want)


def test_non_contiguous_input_takes_the_torch_path():
    weight = _x(8, seed=1)
    base = _x(4, 16)
    x = base[:, :8]  # (4, 8), row stride 16
    assert not x.is_contiguous()
    torch.testing.assert_close(add_rms_norm(x, weight, 1e-6), _formula(x, weight, 1e-6), rtol=2e-6, atol=1e-6)


def test_without_the_extension(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    weight = _x(8, seed=1)
    x, delta = _x(3, 8), _x(3, 8, seed=2)
    want = _formula(x + delta, weight, 1e-6)
    torch.testing.assert_close(add_rms_norm(x, weight, 1e-6, delta), want, rtol=2e-6, atol=1e-6)


@pytest.mark.skipif(not cpu_kernels.available(), reason="gqsa._native_cpu is not built")
def test_native_path_is_taken_for_float32(monkeypatch):
    calls = []
    real = cpu_kernels._extension()

    class Spy:
        def add_rms_norm(self, *args):
            calls.append(args)
            return real.add_rms_norm(*args)

    monkeypatch.setattr(cpu_kernels, "_extension", lambda: Spy())
    add_rms_norm(_x(2, 8), _x(8, seed=1), 1e-6, _x(2, 8, seed=2))
    assert len(calls) == 1 and calls[0][4:6] == (2, 8)
