"""BQPO: block-wise training lowers the block output error of one-shot GQSA and never touches the masks."""

import json

import pytest
import torch
from tiny import tiny_model

from gqsa.compress import compress_model
from gqsa.config import BQPOSpec, CalibSpec, CompressConfig, QuantSpec, SparsitySpec
from gqsa.models.surgery import packed_layers


def _config(epochs, **bqpo):
    return CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                          calib=CalibSpec(samples=12, seq_len=32),
                          bqpo=BQPOSpec(epochs=epochs, lr_weight=3e-4, lr_qparams=1e-4, batch_size=1,
                                        val_windows=4, patience=2, **bqpo))


def _run(cfg, calib):
    model = tiny_model("llama")
    report = compress_model(model, cfg, calib_ids=calib, progress=False)
    return model, report


@pytest.fixture(scope="module")
def runs():
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (12, 32), generator=gen)
    with torch.inference_mode():
        dense = tiny_model("llama")(calib).logits
    out = {}
    for epochs in (0, 6):
        model, report = _run(_config(epochs), calib)
        with torch.inference_mode():
            err = float((model(calib).logits - dense).pow(2).mean())
        out[epochs] = (model, report, err)
    return out, calib


def test_bqpo_lowers_every_block_output_error_and_the_model_error(runs):
    out, _ = runs
    _, report, err = out[6]
    blocks = report["bqpo_blocks"]
    assert len(blocks) == 2
    for b in blocks:
        # Held-out windows of a random model on random tokens: little to learn, but it must learn something
        # (without gradient flow the loss would stay exactly where one-shot left it).
        assert b["loss_after"] < 0.99 * b["loss_before"], b
        assert b["epochs_run"] >= 1
    assert err < out[0][2]  # the whole model's logits on the calibration windows are closer to the dense ones
    for layer in report["layers"]:
        assert {"output_error", "oneshot_output_error"} <= set(layer)


def test_bqpo_keeps_the_one_shot_masks_and_sparsity(runs):
    out, _ = runs
    oneshot, trained = packed_layers(out[0][0]), packed_layers(out[6][0])
    for name in oneshot:
        a, b = oneshot[name].packed_weight(), trained[name].packed_weight()
        if name.startswith("model.layers.0."):  # block 0 sees the same inputs in both runs: the same mask
            assert torch.equal(a.crow_indices, b.crow_indices) and torch.equal(a.col_indices, b.col_indices)
        assert b.sparsity == a.sparsity == 0.5


def test_bqpo_is_deterministic(runs):
    out, calib = runs
    model, _ = _run(_config(6), calib)
    for name, layer in packed_layers(model).items():
        ref = packed_layers(out[6][0])[name]
        assert torch.equal(layer.packed_weight().values, ref.packed_weight().values), name
        assert torch.equal(layer.packed_weight().scale, ref.packed_weight().scale), name


def test_bqpo_needs_method_gqsa():
    with pytest.raises(ValueError, match="BQPO"):
        CompressConfig(method="magnitude", bqpo=BQPOSpec(epochs=1))


@pytest.mark.parametrize("train_zero_point", [False, True])
def test_e2e_oqp_changes_scales_and_nothing_else(train_zero_point):
    from gqsa.algorithms.e2e_oqp import e2e_oqp
    from gqsa.config import E2ESpec

    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (10, 32), generator=gen)
    model, _ = _run(_config(0), calib)
    before = {n: m.packed_weight() for n, m in packed_layers(model).items()}
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = e2e_oqp(model, calib, E2ESpec(epochs=3, lr=1e-3, batch_size=2, val_windows=3, patience=3,
                                           train_zero_point=train_zero_point, lr_zero_point=0.3))
    assert result["loss_after"] < result["loss_before"] and result["layers"] == 14
    after = {n: m.packed_weight() for n, m in packed_layers(model).items()}
    scales_changed = zeros_changed = 0
    for name, a in before.items():
        b = after[name]
        assert torch.equal(a.crow_indices, b.crow_indices) and torch.equal(a.col_indices, b.col_indices)
        assert torch.equal(a.values, b.values), name  # the integer codes are frozen
        scales_changed += int(not torch.equal(a.scale, b.scale))
        zeros_changed += int(not torch.equal(a.zero_point, b.zero_point))
    assert scales_changed == 14
    assert (zeros_changed > 0) == train_zero_point
    for key, value in model.state_dict().items():  # everything outside the packed layers is untouched
        if not any(key.startswith(n + ".") for n in before):
            assert torch.equal(value, dense_state[key]), key
    assert not model.training  # back in eval mode, as it was
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_full_pipeline_one_shot_bqpo_e2e_reports_each_stage():
    from gqsa.config import E2ESpec

    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (10, 32), generator=gen)
    cfg = _config(2).replace(e2e=E2ESpec(epochs=1, lr=1e-3, batch_size=2, val_windows=3))
    model, report = _run(cfg, calib)
    assert len(report["bqpo_blocks"]) == 2 and report["e2e"]["loss_after"] <= report["e2e"]["loss_before"]
    assert len(packed_layers(model)) == 14 and report["summary"]["sparsity"] == 0.5


def test_a_run_killed_after_a_block_resumes_to_the_uninterrupted_result(runs, tmp_path, monkeypatch):
    import gqsa.algorithms.bqpo as bqpo

    out, calib = runs
    cfg = _config(6).replace(calib=CalibSpec(samples=12, seq_len=32))
    real = bqpo._compress_and_train
    calls = []

    def dies_on_block_1(block, prefix, b, *args):
        calls.append(b)
        if b == 1:
            raise KeyboardInterrupt  # as if the process were stopped while training block 1
        return real(block, prefix, b, *args)

    monkeypatch.setattr(bqpo, "_compress_and_train", dies_on_block_1)
    with pytest.raises(KeyboardInterrupt):
        compress_model(tiny_model("llama"), cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_0000.json", "block_0000.safetensors",
                                                          "resume.json"]
    monkeypatch.setattr(bqpo, "_compress_and_train", real)
    calls.clear()
    model = tiny_model("llama")
    report = compress_model(model, cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    reference_model, reference_report = out[6][0], out[6][1]
    for name, layer in packed_layers(model).items():
        ref = packed_layers(reference_model)[name].packed_weight()
        for tname, t in layer.packed_weight().tensors().items():
            assert torch.equal(t, ref.tensors()[tname]), (name, tname)
    assert report["bqpo_blocks"] == reference_report["bqpo_blocks"]
    assert report["layers"] == reference_report["layers"]


@pytest.fixture(scope="module")
def one_epoch(runs):
    """The model and report of one BQPO epoch without resume state (the reference for the resume tests)."""
    return _run(_config(1), runs[1])


def test_resume_state_of_other_settings_is_never_replayed(runs, tmp_path):
    _, calib = runs
    compress_model(tiny_model("llama"), _config(1), calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    first = (tmp_path / "block_0000.json").read_text()
    model = tiny_model("llama")
    report = compress_model(model, _config(2), calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    assert report["bqpo_blocks"] == _run(_config(2), calib)[1]["bqpo_blocks"]  # as without any resume state
    assert (tmp_path / "block_0000.json").read_text() != first  # the other run's entries were discarded


def test_resume_state_of_another_input_model_is_never_replayed(runs, tmp_path):
    """Same architecture and config, other weights: the fingerprint covers the weights."""
    _, calib = runs
    cfg = _config(1)
    compress_model(tiny_model("llama", seed=1), cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    model = tiny_model("llama", seed=2)
    with_state = compress_model(model, cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    fresh = compress_model(tiny_model("llama", seed=2), cfg, calib_ids=calib, progress=False)
    assert with_state["layers"] == fresh["layers"]


@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate the weights", "edit the report",
                                    "delete the weights", "garbage entry"])
def test_a_damaged_resume_entry_is_recomputed_with_the_blocks_after_it(runs, one_epoch, tmp_path, caplog, damage):
    _, calib = runs
    cfg = _config(1)
    compress_model(tiny_model("llama"), cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    weights, entry = tmp_path / "block_0000.safetensors", tmp_path / "block_0000.json"
    if damage == "flip a weight byte":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate the weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "edit the report":
        info = json.loads(entry.read_text())
        info["record"]["bqpo"]["loss_after"] = 0.0
        entry.write_text(json.dumps(info))
    elif damage == "delete the weights":
        weights.unlink()
    else:
        entry.write_text("{not json")
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="gqsa.algorithms.bqpo"):
        report = compress_model(model, cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    assert "computing block 0 and the blocks after it again" in caplog.text
    assert "block_0000" in caplog.text
    assert report["bqpo_blocks"] == one_epoch[1]["bqpo_blocks"] and report["layers"] == one_epoch[1]["layers"]
    for name, layer in packed_layers(model).items():
        ref = packed_layers(one_epoch[0])[name].packed_weight()
        assert torch.equal(layer.packed_weight().values, ref.values), name


def test_float_baselines_with_bqpo_save_and_replay_their_blocks(tmp_path):
    """A method that prunes in float (no packed layer) has resume state too."""
    from gqsa.presets import preset
    from gqsa.models.adapter import compressible_linears

    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (8, 32), generator=gen)
    cfg = preset("2of4-sparsegpt").replace(calib=CalibSpec(samples=8, seq_len=32), bqpo=_config(1).bqpo)
    first = tiny_model("llama")
    compress_model(first, cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))
    assert (tmp_path / "block_0001.json").exists()
    again = tiny_model("llama")
    compress_model(again, cfg, calib_ids=calib, progress=False, resume_dir=str(tmp_path))  # replays both blocks
    for name, layer in compressible_linears(again).items():
        assert type(layer) is torch.nn.Linear
        assert torch.equal(layer.weight, compressible_linears(first)[name].weight), name


@pytest.mark.parametrize("preset_name", ["2of4-sparsegpt", "s50-wanda"])
def test_bqpo_reconstructs_float_baselines_with_their_masks_fixed(preset_name):
    from gqsa.presets import preset
    from gqsa.models.adapter import compressible_linears

    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (12, 32), generator=gen)
    base = preset(preset_name).replace(calib=CalibSpec(samples=12, seq_len=32))
    masks = {}
    for epochs in (0, 6):
        cfg = base.replace(bqpo=_config(epochs).bqpo)
        model = tiny_model("llama")
        report = compress_model(model, cfg, calib_ids=calib, progress=False)
        masks[epochs] = {n: m.weight != 0 for n, m in compressible_linears(model).items()}
    assert all(type(m) is torch.nn.Linear for m in compressible_linears(model).values())
    for b in report["bqpo_blocks"]:
        assert b["loss_after"] < 0.99 * b["loss_before"], b
    for name, mask in masks[6].items():
        if name.startswith("model.layers.0."):  # same inputs as the untrained run: the same mask
            assert torch.equal(mask, masks[0][name]), name
        assert mask.float().mean() <= 0.5
    if preset_name == "2of4-sparsegpt":
        w = compressible_linears(model)["model.layers.1.mlp.down_proj"].weight
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    assert report["summary"]["bits_per_weight"] <= 9.0


def test_bqpo_towards_the_dense_block_on_the_compressed_inputs():
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 320, (12, 32), generator=gen)
    dense_targets = _run(_config(3), calib)[1]["bqpo_blocks"]
    model, report = _run(_config(3, targets="compressed"), calib)
    blocks = report["bqpo_blocks"]
    assert report["config"]["bqpo"]["targets"] == "compressed"
    assert blocks[0]["loss_before"] == dense_targets[0]["loss_before"]  # block 0: the same inputs either way
    # block 1 starts closer to its targets: they no longer hold block 0's remaining error
    assert blocks[1]["loss_before"] < dense_targets[1]["loss_before"]
    assert all(b["loss_after"] < b["loss_before"] for b in blocks)
    with pytest.raises(ValueError, match="BQPOSpec.targets"):
        BQPOSpec(targets="teacher")
