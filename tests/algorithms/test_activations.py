"""Calibration activations spill to disk past a budget, and the result does not depend on it."""

import pytest
import torch
from tiny import tiny_model

from gqsa.algorithms.activations import ActivationStore


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
