"""Calibration activations: on the device up to a budget, a GPU's in host memory up to a second one, then on disk;
the result does not depend on where they were."""

import pytest
import torch
from tiny import tiny_model

from gqsa.algorithms.activation_store import ActivationStore


def test_store_keeps_the_budget_in_memory_and_the_rest_on_disk(tmp_path):
    tensors = [torch.randn(1, 10, 8) for _ in range(5)]  # 320 bytes each
    with ActivationStore(budget_bytes=700, directory=tmp_path) as store:
        for t in tensors:
            store.append(t)
        assert len(store) == 5 and store.spilled == 3 and store.memory_bytes == 640
        assert len(list(tmp_path.glob("gqsa-activations~*/*.pt"))) == 3
        for a, b in zip(store, tensors):
            assert torch.equal(a, b)
        assert torch.equal(store[4], tensors[4])
    assert not list(tmp_path.glob("gqsa-activations~*"))  # spill directory removed


def test_store_without_budget_never_touches_disk(tmp_path):
    store = ActivationStore(None, directory=tmp_path)
    store.append(torch.ones(1000))
    assert store.spilled == 0 and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="budget_bytes"):
        ActivationStore(-1)


CUDA = torch.cuda.is_available()


def _as_device(monkeypatch):
    """On a machine without a GPU: CPU tensors treated as a device's, so the host tier takes them (a clone stands
    for the copy to host memory). With a GPU the tests below run on real CUDA tensors instead."""
    import gqsa.algorithms.activation_store as activations

    copies = []
    real = activations._to_host
    monkeypatch.setattr(activations, "_to_host", lambda t: copies.append(1) or (real(t) if CUDA else t.clone()))
    if CUDA:
        return "cuda", copies
    monkeypatch.setattr(activations, "_on_host", lambda t: False)
    return "cpu", copies


def test_a_devices_tensors_go_to_host_memory_past_the_device_budget_then_to_disk(tmp_path, monkeypatch):
    device, _ = _as_device(monkeypatch)
    tensors = [torch.randn(1, 10, 8, device=device) for _ in range(6)]  # 320 bytes each
    with ActivationStore(budget_bytes=700, directory=tmp_path, host_budget_bytes=650) as store:
        for t in tensors:
            store.append(t)
        assert (store.memory_bytes, store.host_bytes) == (640, 640)
        assert (store.on_host, store.spilled) == (2, 2)  # 2 on the device, 2 in host memory, 2 on disk
        assert len(list(tmp_path.glob("gqsa-activations~*/*.pt"))) == 2
        for i, (a, b) in enumerate(zip(store, tensors)):
            assert a.device == b.device and torch.equal(a, b), i  # each back where it came from
        if CUDA:
            assert store._items[2][0].device.type == "cpu" and store._items[2][0].is_pinned()
    assert not list(tmp_path.glob("gqsa-activations~*"))
    with pytest.raises(ValueError, match="host_budget_bytes"):
        ActivationStore(0, host_budget_bytes=-1)


def test_host_tensors_never_take_the_host_tier(tmp_path):
    with ActivationStore(budget_bytes=0, directory=tmp_path, host_budget_bytes=10**6) as store:
        store.append(torch.ones(100))
        assert store.host_bytes == 0 and store.spilled == 1  # a CPU tensor past the budget goes to disk


def test_default_budgets_follow_the_device():
    from gqsa.compress import default_activation_budget, default_host_activation_budget

    assert default_host_activation_budget(None) == default_host_activation_budget("cpu") == 0
    assert default_host_activation_budget("cuda") == default_activation_budget("cpu") > 0
    if CUDA:
        total = torch.cuda.get_device_properties(0).total_memory
        assert default_activation_budget("cuda") == total // 4


def test_the_driver_shares_both_budgets_among_its_live_stores(tmp_path):
    from gqsa.algorithms.driver import store_factory

    store = store_factory(900, str(tmp_path), 3, host_activation_budget_bytes=600)()
    assert (store.budget_bytes, store.host_budget_bytes, store.directory) == (300, 200, tmp_path)


def test_compression_through_all_three_tiers_equals_in_memory_compression(tmp_path, monkeypatch):
    from gqsa.compress import compress_model
    from gqsa.config import CalibSpec, CompressConfig, QuantSpec, SparsitySpec
    from gqsa.models.surgery import packed_layers

    device, copies = _as_device(monkeypatch)
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: saves.append(1) or real_save(*a, **k))
    calib = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                         calib=CalibSpec(samples=6, seq_len=24))
    window = 24 * 64 * 4  # one (1, 24, 64) fp32 window
    results = []
    for budget, host in ((None, 0), (2 * 2 * window, 2 * 2 * window)):  # per store: 2 on the device, 2 on host
        model = tiny_model("llama")
        compress_model(model, cfg, calib_ids=calib, progress=False, activation_budget_bytes=budget,
                       host_activation_budget_bytes=host, offload_dir=str(tmp_path), device=device)
        results.append({n: m.packed_weight().tensors() for n, m in packed_layers(model).items()})
        assert bool(copies) == bool(saves) == (budget is not None)  # the tiered run used host memory and disk
    for name, tensors in results[0].items():
        for key, a in tensors.items():
            assert torch.equal(a.cpu(), results[1][name][key].cpu()), (name, key)


def test_offloaded_compression_equals_in_memory_compression(tmp_path):
    from gqsa.compress import compress_model
    from gqsa.config import CalibSpec, CompressConfig, QuantSpec, SparsitySpec
    from gqsa.models.surgery import packed_layers

    calib = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                         calib=CalibSpec(samples=4, seq_len=24))
    results = []
    for budget in (None, 0):
        model = tiny_model("llama")
        compress_model(model, cfg, calib_ids=calib, progress=False, activation_budget_bytes=budget,
                       offload_dir=str(tmp_path / "spill"))
        results.append({n: m.packed_weight() for n, m in packed_layers(model).items()})
    for name, packed in results[0].items():
        other = results[1][name]
        assert torch.equal(packed.values, other.values) and torch.equal(packed.scale, other.scale), name
    assert not list((tmp_path / "spill").glob("gqsa-activations~*"))
