"""The whole run from Python (``gqsa.compress.run``) and the one place presets and overrides are resolved."""

import json

import pytest
import torch

import gqsa
from gqsa.compress import HeldoutSpec, run
from gqsa.presets import OVERRIDES, PRESETS, fast, resolve_config


def test_overrides_replace_the_presets_values_and_only_those():
    base = PRESETS["w4s50"]
    cfg = resolve_config("w4s50", bits=3, calib_samples=8, bqpo_epochs=1, symmetric=True)
    assert (cfg.quant.bits, cfg.quant.symmetric, cfg.calib.samples, cfg.bqpo.epochs) == (3, True, 8, 1)
    assert cfg.replace(quant=base.quant, calib=base.calib, bqpo=base.bqpo) == base
    assert resolve_config("w4s50", True) == fast(base)
    assert resolve_config("w4s50", True, calib_samples=64).calib.samples == 64  # flags override --fast


def test_a_pattern_fixes_the_ratio_and_training_follows_the_method():
    cfg = resolve_config("s50-wanda", pattern="2:4")
    assert cfg.sparsity.ratio == 0.5 and cfg.quant is None
    assert resolve_config("w4s50", method="magnitude").bqpo.epochs == 0  # magnitude does not train block-wise
    with pytest.raises(ValueError, match="data-free"):  # asked for: refused by the config's validation
        resolve_config("w4s50", method="magnitude", bqpo_epochs=1)
    assert resolve_config("w4s50", method="sparsegpt", pattern="2:4").e2e.epochs == 0


@pytest.mark.parametrize("overrides,message", [
    ({"bitz": 4}, "unknown override"),
    ({"bits": 4}, "bits (--bits) do(es) not apply"),
    ({"sparsity": 1.5}, "ratio must be a number in [0, 1)"),
])
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ValueError) as info:
        resolve_config("2of4-sparsegpt" if "bits" in overrides else "w4s50", **overrides)
    assert message in str(info.value)
    assert "bitz" not in OVERRIDES


def test_run_writes_what_the_cli_writes(dense_dir, text_file, tmp_path):
    out = tmp_path / "w4s50"
    report = run(out, "magnitude-w4s50", dense_dir, heldout=HeldoutSpec(str(text_file), seq_len=32, max_tokens=256),
                 sample_prompt="Hello", progress=False)
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"] == report["summary"] and report["summary"]["num_layers"] > 0
    assert report["ppl_after"]["ppl"] > 0 and report["ppl_before"]["tokens"] == report["ppl_after"]["tokens"]
    assert isinstance(report["sample"]["completion"], str)
    assert json.loads((out / "compress_config.json").read_text()) == PRESETS["magnitude-w4s50"].to_dict()
    model, _ = gqsa.load(out)
    assert any(isinstance(m, gqsa.PackedLinear) for m in model.modules())
    with pytest.raises(FileExistsError, match="exists"):
        run(out, "magnitude-w4s50", dense_dir, progress=False)  # nothing replaced without overwrite
    assert json.loads((out / "report.json").read_text()) == saved
    with pytest.raises(ValueError, match="not to a resolved CompressConfig"):
        run(tmp_path / "x", PRESETS["w4s50"], dense_dir, bits=3)
    with pytest.raises(ValueError, match="input model"):
        run(dense_dir, "magnitude-w4s50", dense_dir, overwrite=True)


def test_run_with_calibration_and_block_training_leaves_no_resume_state(dense_dir, text_file, tmp_path):
    out = tmp_path / "trained"
    report = run(out, "w4s50", dense_dir, calib_dataset=str(text_file), calib_samples=2, seq_len=16,
                 bqpo_epochs=1, e2e_epochs=0, progress=False)
    assert len(report["bqpo_blocks"]) > 0
    assert not any(p.name.endswith("gqsa-resume") for p in tmp_path.iterdir())
    model, _ = gqsa.load(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_run_with_lazy_loading_writes_the_same_checkpoint(dense_dir, text_file, tmp_path, capsys):
    """``lazy_load`` (``--lazy-load``) reads the blocks from the shards one at a time: the same tensors come out; the
    perplexity is measured after compressing only."""
    from safetensors.torch import load_file

    from gqsa.cli import main

    settings = dict(calib_dataset=str(text_file), calib_samples=2, seq_len=16, progress=False)
    whole = run(tmp_path / "whole", "w4s50", dense_dir, fast=True, **settings)
    lazy = run(tmp_path / "lazy", "w4s50", dense_dir, fast=True, lazy_load=True,
               heldout=HeldoutSpec(str(text_file), seq_len=32, max_tokens=128), **settings)
    assert lazy["layers"] == whole["layers"] and "ppl_before" not in lazy and lazy["ppl_after"]["ppl"] > 0
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "lazy"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code = main(["compress", str(dense_dir), "--out", str(tmp_path / "cli"), "--preset", "magnitude-w4s50",
                 "--lazy-load", "--device", "cpu", "--eval", "--eval-text-file", str(text_file), "--eval-seq-len",
                 "32", "--eval-max-tokens", "64"])
    assert code == 0 and "perplexity on held-out" in capsys.readouterr().out
