"""BQPO and E2E-OQP under bfloat16 autocast: they still train, in bfloat16 compute, with float32 parameters."""

import pytest
import torch
from tiny import tiny_model

from gqsa.algorithms.training import fit
from gqsa.compress import compress_model
from gqsa.config import BQPOSpec, CalibSpec, CompressConfig, E2ESpec, QuantSpec, SparsitySpec
from gqsa.presets import resolve_config


def _config(dtype: str) -> CompressConfig:
    return CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                          calib=CalibSpec(samples=10, seq_len=32),
                          bqpo=BQPOSpec(epochs=3, lr_weight=3e-4, lr_qparams=1e-4, val_windows=3, patience=3,
                                        train_dtype=dtype),
                          e2e=E2ESpec(epochs=2, lr=1e-3, batch_size=2, val_windows=3, patience=3, train_dtype=dtype))


def test_fit_computes_the_loss_under_autocast_and_keeps_float32_parameters():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8)
    seen = []

    def loss(i):
        y = x @ w
        seen.append(y.dtype)
        return y.square().mean()

    result = fit([{"params": [w], "lr": 0.01}], loss, 4, 2, 1, 0.0, 1, 2, 0, autocast=torch.bfloat16)
    assert set(seen) == {torch.bfloat16} and w.dtype == torch.float32
    assert result["loss_after"] < result["loss_before"]


def test_bqpo_and_e2e_train_under_bfloat16_autocast():
    calib = torch.randint(0, 320, (10, 32), generator=torch.Generator().manual_seed(0))
    reports = {dtype: compress_model(tiny_model("llama"), _config(dtype), calib_ids=calib, progress=False)
               for dtype in ("float32", "bfloat16")}
    bf16 = reports["bfloat16"]
    for block in bf16["bqpo_blocks"]:
        assert block["loss_after"] < block["loss_before"]
    assert bf16["e2e"]["loss_after"] < bf16["e2e"]["loss_before"]
    # computed in bfloat16: the held-out losses are not the float32 ones (same weights before training)
    assert bf16["bqpo_blocks"][0]["loss_before"] != reports["float32"]["bqpo_blocks"][0]["loss_before"]
    assert bf16["bqpo_blocks"][0]["loss_before"] == pytest.approx(
        reports["float32"]["bqpo_blocks"][0]["loss_before"], rel=0.05)
    assert bf16["config"]["bqpo"]["train_dtype"] == bf16["config"]["e2e"]["train_dtype"] == "bfloat16"


def test_train_dtype_is_checked_and_set_by_one_override():
    cfg = resolve_config("w4s50", train_dtype="bfloat16")
    assert cfg.bqpo.train_dtype == cfg.e2e.train_dtype == "bfloat16"
    with pytest.raises(ValueError, match="BQPOSpec.train_dtype"):
        BQPOSpec(train_dtype="float16")
