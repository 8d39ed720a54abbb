"""The one block-wise driver: every calibrated method walks the blocks through it, on the device asked for, with
resume state; the model itself stays where it is."""

import pytest
import torch
from tiny import tiny_model

import gqsa.algorithms.blockwise as blockwise
from gqsa.algorithms.driver import walk_blocks
from gqsa.compress import compress_model
from gqsa.config import CalibSpec, CompressConfig, QuantSpec, SparsitySpec
from gqsa.models.surgery import packed_layers

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]
CALIB = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
ONESHOT = CompressConfig(quant=QuantSpec(bits=4, group_size=16), sparsity=SparsitySpec(ratio=0.5),
                         calib=CalibSpec(samples=4, seq_len=24))


def _tensors(model):
    return {n: layer.packed_weight().tensors() for n, layer in packed_layers(model).items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs_targets", [False, True])
def test_each_step_sees_its_block_inputs_and_kwargs_on_the_device_and_the_model_stays_home(device, needs_targets):
    model = tiny_model("llama")
    seen = []

    def step(work):
        tensors = [next(work.block.parameters()), work.inputs[0]] + [
            t for v in work.kwargs.values() for t in (v if isinstance(v, tuple) else (v,))
            if isinstance(t, torch.Tensor)]
        if needs_targets:
            tensors.append(work.targets[0])
            assert len(work.targets) == len(work.inputs) == CALIB.shape[0]
        seen.append({t.device.type for t in tensors})
        return {"layers": [], "block": work.index}

    records = walk_blocks(model, CALIB, step, needs_targets=needs_targets, device=device, progress=False)
    assert [r["block"] for r in records] == [0, 1]
    assert seen == [{device}, {device}]  # no stage silently elsewhere
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # every block went back


@pytest.mark.parametrize("device", DEVICES)
def test_one_shot_on_a_device_gives_the_models_result(device):
    reference = tiny_model("llama")
    compress_model(reference, ONESHOT, calib_ids=CALIB, progress=False)
    model = tiny_model("llama")
    report = compress_model(model, ONESHOT, calib_ids=CALIB, progress=False, device=device)
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"cpu"}
    got, want = _tensors(model), _tensors(reference)
    assert got.keys() == want.keys() and len(got) == 14
    for name in want:
        for key in want[name]:
            if device == "cpu":
                assert torch.equal(got[name][key], want[name][key]), (name, key)
            elif key in ("crow_indices", "col_indices"):  # GPU float rounding may move a rare code, not a mask
                assert torch.equal(got[name][key], want[name][key]), (name, key)
    assert report["summary"]["sparsity"] == 0.5


def test_one_shot_runs_resume_after_a_kill(tmp_path, monkeypatch):
    """Resume state is no longer BQPO's alone: a one-shot run killed in block 1 resumes to the same model."""
    reference = tiny_model("llama")
    compress_model(reference, ONESHOT, calib_ids=CALIB, progress=False)
    real = blockwise.compress_block_linears
    calls = []
    kill = [True]

    def dies_in_block_1(block, prefix, *args):
        calls.append(prefix)
        if prefix.endswith(".1") and kill[0]:
            raise KeyboardInterrupt  # as if the process were stopped while compressing block 1
        return real(block, prefix, *args)

    monkeypatch.setattr(blockwise, "compress_block_linears", dies_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        compress_model(tiny_model("llama"), ONESHOT, calib_ids=CALIB, progress=False, resume_dir=str(tmp_path))
    assert (tmp_path / "block_0000.json").exists() and not (tmp_path / "block_0001.json").exists()
    calls.clear()
    kill[0] = False
    model = tiny_model("llama")
    compress_model(model, ONESHOT, calib_ids=CALIB, progress=False, resume_dir=str(tmp_path))
    assert calls == ["model.layers.1"]  # block 0 replayed, not recomputed
    got, want = _tensors(model), _tensors(reference)
    for name in want:
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)


@pytest.mark.parametrize("targets_from", ["dense", "compressed"])
def test_targets_are_the_dense_blocks_outputs_on_the_inputs_asked_for(targets_from):
    from gqsa.algorithms.driver import block_output
    from gqsa.models.adapter import capture_block_inputs, decoder_layers

    dense = tiny_model("llama")
    seen = []

    def step(work):  # "compression": every weight of the block halved
        seen.append(([h.clone() for h in work.inputs], [t.clone() for t in work.targets]))
        with torch.no_grad():
            for p in work.block.parameters():
                p.mul_(0.5)
        return {"layers": []}

    walk_blocks(tiny_model("llama"), CALIB, step, needs_targets=True, targets_from=targets_from, progress=False)
    block0, block1 = decoder_layers(dense)
    with torch.no_grad():
        for i in range(CALIB.shape[0]):
            h, kw = capture_block_inputs(dense, CALIB[i: i + 1])
            dense_in1 = block_output(block0(h, **kw[0]))
            inputs1, targets1 = seen[1][0][i], seen[1][1][i]
            assert not torch.allclose(inputs1, dense_in1)  # block 1's inputs come from the halved block 0
            source = dense_in1 if targets_from == "dense" else inputs1
            assert torch.allclose(targets1, block_output(block1(source, **kw[1])), atol=1e-5)
    with pytest.raises(ValueError, match="targets_from"):
        walk_blocks(tiny_model("llama"), CALIB, step, needs_targets=True, targets_from="teacher", progress=False)
