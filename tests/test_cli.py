"""The gqsa command line on a tiny model and a tiny text file."""

import json
import math

import pytest
import torch

from gqsa.cli import main
from gqsa.models.outputs import resume_dir


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


PPL_ARGS = ("--seq-len", 16, "--max-tokens", 64)


def calib(text_file):
    """Calibration flags for method gqsa: 4 windows of 32 tokens from the calibration part of the text file."""
    return ("--calib-dataset", text_file, "--calib-samples", 4, "--seq-len", 32)


def test_eval_ppl_json(capsys, dense_dir, text_file):
    from gqsa.eval.heldout import heldout_perplexity
    from gqsa.models.loading import load_model

    code, out, _ = _run(capsys, "eval", "ppl", dense_dir, "--text-file", text_file, *PPL_ARGS, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["seq_len"] == 16 and result["windows"] == 4 and result["tokens"] == 4 * 15
    model, tok = load_model(dense_dir)
    direct = heldout_perplexity(model, tok, str(text_file), seq_len=16, max_tokens=64, progress=False)
    assert math.isclose(result["ppl"], direct["ppl"], rel_tol=1e-9)
    assert 1.0 < result["ppl"] < 2 * 320  # a random model is near uniform over the 320-token vocabulary


def test_eval_ppl_text_output(capsys, dense_dir, text_file):
    code, out, _ = _run(capsys, "eval", "ppl", dense_dir, "--text-file", text_file, *PPL_ARGS)
    assert code == 0 and "perplexity" in out and "60 predicted tokens" in out


def test_compress_info_eval_generate(capsys, dense_dir, text_file, tmp_path):
    out_dir = tmp_path / "w4s50"
    code, out, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--preset", "w4s50", *calib(text_file), "--eval",
                          "--eval-text-file", text_file, "--eval-seq-len", 16, "--eval-max-tokens", 64, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["summary"]["num_layers"] == 14
    assert report["summary"]["sparsity"] == pytest.approx(0.5)
    assert report["ppl_before"]["ppl"] != report["ppl_after"]["ppl"]
    for name in ("model.safetensors", "gqsa_config.json", "config.json", "report.json", "compress_config.json"):
        assert (out_dir / name).is_file(), name
    assert json.loads((out_dir / "compress_config.json").read_text())["quant"]["group_size"] == 16

    code, out, _ = _run(capsys, "info", out_dir, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["num_layers"] == 14 and info["sparsity"] == pytest.approx(0.5)
    assert info["bits_per_weight"] == pytest.approx(report["summary"]["bits_per_weight"])
    assert info["bytes"] == sum(p.stat().st_size for p in out_dir.iterdir())

    code, out, _ = _run(capsys, "eval", "ppl", out_dir, "--text-file", text_file, *PPL_ARGS, "--json")
    assert code == 0
    assert json.loads(out)["ppl"] == pytest.approx(report["ppl_after"]["ppl"], rel=1e-6)

    code, out, _ = _run(capsys, "generate", out_dir, "--prompt", "The quick", "--max-new-tokens", 5,
                        "--no-chat-template")
    assert code == 0 and out.strip()


def test_compress_overrides_reach_the_checkpoint(capsys, dense_dir, text_file, tmp_path):
    out_dir = tmp_path / "w3"
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--bits", 3, "--group-size", 32,
                        "--sparsity", 0.25, "--allocation", "matrix", "--symmetric", "--qparams", "mse",
                        "--saliency", "wanda", "--damp", 0.05, *calib(text_file), "--seed", 7)
    assert code == 0, err
    cfg = json.loads((out_dir / "compress_config.json").read_text())
    assert cfg["quant"] == {"bits": 3, "group_size": 32, "symmetric": True, "qparam_method": "mse"}
    assert cfg["sparsity"] == {"ratio": 0.25, "allocation": "matrix", "pattern": "group", "model_spread": 0.1}
    assert cfg["oneshot"]["saliency"] == "wanda" and cfg["oneshot"]["damp"] == 0.05
    assert cfg["calib"] == {"dataset": str(text_file), "samples": 4, "seq_len": 32, "seed": 7}
    layer = json.loads((out_dir / "gqsa_config.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]
    assert layer["bits"] == 3 and layer["group_size"] == 32 and layer["symmetric"] is True


@pytest.mark.parametrize(
    "flags,message",
    [
        (("--group-size", 12), "group_size"),
        (("--group-size", 256), "does not divide in_features 64"),
        (("--sparsity", 1.0), "ratio must be a number in [0, 1)"),
        (("--bits", 5), "bits must be one of"),
        (("--preset", "w9s99"), "unknown preset"),
        (("--pattern", "2:4"), "method 'gqsa' prunes whole groups"),
        (("--preset", "2of4-sparsegpt", "--bits", "4"), "leaves the kept weights in float; bits (--bits)"),
        (("--preset", "s50-wanda", "--pattern", "3:4", "--sparsity", "0.5"), "ratio must be 0.25"),
        (("--activation-budget-mb", "-1"), "--activation-budget-mb must be >= 0"),
        (("--bqpo-epochs", "-1"), "BQPOSpec.epochs"),
        (("--method", "magnitude", "--e2e-epochs", "1"), "E2E-OQP"),
        (("--calib-samples", 0), "samples must be a positive integer"),
    ],
)
def test_compress_bad_input_is_named(capsys, dense_dir, text_file, tmp_path, flags, message):
    code, _, err = _run(capsys, "compress", dense_dir, "--out", tmp_path / "x", *calib(text_file), *flags)
    assert code == 2 and message in err
    assert not (tmp_path / "x").exists()


def test_compress_keeps_existing_output(capsys, dense_dir, tmp_path):
    out_dir = tmp_path / "existing"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious")
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out_dir)
    assert code == 2 and "--overwrite" in err
    assert (out_dir / "keep.txt").read_text() == "precious"


def test_missing_model_and_non_checkpoint_are_errors(capsys, tmp_path, dense_dir):
    code, _, err = _run(capsys, "eval", "ppl", tmp_path / "nope", "--dataset", "wiki")
    assert code == 2 and "nope" in err
    code, _, err = _run(capsys, "info", dense_dir)
    assert code == 2 and "not a gqsa checkpoint" in err


def test_float_baseline_preset_saves_a_plain_checkpoint_the_evaluation_loads(capsys, dense_dir, text_file, tmp_path):
    out_dir = tmp_path / "sgpt"
    code, out, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--preset", "2of4-sparsegpt",
                          *calib(text_file))
    assert code == 0, err
    assert "2:4 sparsity 50%" in out and "9.000 bits per weight" in out
    assert not (out_dir / "gqsa_config.json").exists() and (out_dir / "gqsa_pruned.json").exists()
    report = json.loads((out_dir / "report.json").read_text())
    assert report["summary"]["sparsity"] == 0.5 and len(report["layers"]) == 14
    code, out, err = _run(capsys, "eval", "ppl", out_dir, "--text-file", text_file, *PPL_ARGS, "--json")
    assert code == 0, err
    assert math.isfinite(json.loads(out)["ppl"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    w = model.model.layers[1].mlp.down_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()  # the 2:4 pattern survived the round trip
    code, out, err = _run(capsys, "info", out_dir)
    assert code == 0 and "pruned float checkpoint" in out and "sparsegpt: 2:4 sparsity 0.5" in out
    code, out, err = _run(capsys, "info", out_dir, "--json")
    assert code == 0 and json.loads(out)["summary"]["bits_per_weight"] == 9.0


def test_model_allocation_through_the_cli(capsys, dense_dir, text_file, tmp_path):
    out_dir = tmp_path / "model-alloc"
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--allocation", "model",
                        "--activation-budget-mb", 0, "--host-activation-budget-mb", 3, "--device", "cpu",
                        *calib(text_file))
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["activation_budget_bytes"] == 0 and len(report["groups_pruned_per_layer"]) == 14
    assert report["host_activation_budget_bytes"] == 3 * 2**20


def test_bqpo_and_e2e_flags_reach_the_config_and_the_report(capsys, dense_dir, text_file, tmp_path):
    out_dir = tmp_path / "trained"
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--bqpo-epochs", 1, "--bqpo-lr-weight",
                        1e-4, "--e2e-epochs", 1, "--e2e-lr", 1e-4, "--e2e-zero-point", *calib(text_file))
    assert code == 0, err
    cfg = json.loads((out_dir / "compress_config.json").read_text())
    assert cfg["bqpo"]["epochs"] == 1 and cfg["bqpo"]["lr_weight"] == 1e-4
    assert cfg["e2e"] == {**cfg["e2e"], "epochs": 1, "lr": 1e-4, "train_zero_point": True}
    report = json.loads((out_dir / "report.json").read_text())
    assert len(report["bqpo_blocks"]) == 2 and "loss_after" in report["e2e"]
    assert not resume_dir(out_dir).exists()  # removed once the checkpoint is saved


def test_an_interrupted_compress_resumes_to_the_uninterrupted_result(capsys, dense_dir, text_file, tmp_path,
                                                                     monkeypatch):
    import gqsa.algorithms.bqpo as bqpo

    flags = ("--bqpo-epochs", 1, *calib(text_file))
    code, _, err = _run(capsys, "compress", dense_dir, "--out", tmp_path / "full", *flags)
    assert code == 0, err
    real = bqpo._compress_and_train

    def dies_on_block_1(block, prefix, b, *args):
        if b == 1:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while block 1 was training
        return real(block, prefix, b, *args)

    out_dir = tmp_path / "resumed"
    monkeypatch.setattr(bqpo, "_compress_and_train", dies_on_block_1)
    code, out, err = _run(capsys, "compress", dense_dir, "--out", out_dir, *flags)
    assert code == 130 and err.strip().endswith("interrupted; rerun the same command to resume") and not out
    resume = resume_dir(out_dir)
    assert not out_dir.exists()  # no output until the run has finished
    assert sorted(p.name for p in tmp_path.iterdir()) == [resume.name, "full"]  # no lock or temporary left
    assert (resume / "block_0000.json").exists() and not (resume / "block_0001.json").exists()
    monkeypatch.setattr(bqpo, "_compress_and_train", real)
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out_dir, *flags)  # the same command again
    assert code == 0, err
    assert not resume.exists()
    a = json.loads((out_dir / "gqsa_config.json").read_text())["weights"]["tensors"]
    b = json.loads((tmp_path / "full" / "gqsa_config.json").read_text())["weights"]["tensors"]
    assert {k: v["sha256"] for k, v in a.items()} == {k: v["sha256"] for k, v in b.items()}


def test_bench_kernel_runs_through_the_cli(capsys, tmp_path):
    out = tmp_path / "k.json"
    code, stdout, err = _run(capsys, "bench", "kernel", "--shapes", "tiny", "--batch", "1", "--repeats", 1,
                             "--min-calls", 1, "--cold-mib", 1, "--json", out)
    assert code == 0, err
    assert "| shape" in stdout and json.loads(out.read_text())["measurements"]
    code, _, err = _run(capsys, "bench", "nope")
    assert code == 2 and "unknown benchmark 'nope'" in err and "e2e" in err


def test_bench_without_a_source_checkout_names_the_problem(capsys, monkeypatch, tmp_path):
    """A wheel install has no benchmarks/ next to its sources: `gqsa bench` says what it needs, in one line."""
    import gqsa.cli_bench

    missing = tmp_path / "site-packages" / "benchmarks"
    monkeypatch.setattr(gqsa.cli_bench, "benchmarks_dir", lambda: missing)
    code, out, err = _run(capsys, "bench", "kernel", "--shapes", "tiny")
    assert code == 2 and out == ""
    assert err == (f"gqsa bench kernel: error: the benchmarks need a source checkout: benchmarks/ not found at "
                   f"{missing}; clone the repository and pip install -e .\n")


def test_fast_is_the_cheap_variant_of_the_preset_and_flags_still_override_it(capsys, dense_dir, text_file, tmp_path):
    out_dir = tmp_path / "fast"
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--fast", *calib(text_file))
    assert code == 0, err
    cfg = json.loads((out_dir / "compress_config.json").read_text())
    assert cfg["bqpo"]["epochs"] == 1 and cfg["e2e"]["epochs"] == 0  # the w4s50 preset trains 2 + 1 epochs
    assert (cfg["calib"]["samples"], cfg["calib"]["seq_len"]) == (4, 32)
    report = json.loads((out_dir / "report.json").read_text())
    assert len(report["bqpo_blocks"]) == 2 and "e2e" not in report
    code, _, err = _run(capsys, "compress", dense_dir, "--out", tmp_path / "fast-e2e", "--fast", "--e2e-epochs", 1,
                        *calib(text_file))
    assert code == 0, err
    assert json.loads((tmp_path / "fast-e2e" / "compress_config.json").read_text())["e2e"]["epochs"] == 1


def test_a_method_without_training_drops_the_training_of_the_preset(capsys, dense_dir, tmp_path):
    out_dir = tmp_path / "magnitude"
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--method", "magnitude")  # preset w4s50
    assert code == 0, err
    cfg = json.loads((out_dir / "compress_config.json").read_text())
    assert cfg["method"] == "magnitude" and cfg["bqpo"]["epochs"] == 0 and cfg["e2e"]["epochs"] == 0


# ---- generate --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, dense_dir):
    out_dir = tmp_path_factory.mktemp("packed") / "magnitude"
    code = main(["compress", str(dense_dir), "--out", str(out_dir), "--preset", "magnitude-w4s50"])
    assert code == 0
    return out_dir


def test_generate_streams_samples_reproducibly_and_packs_the_lm_head(capsys, packed_dir):
    args = ("generate", packed_dir, "--prompt", "The quick", "--max-new-tokens", 6, "--no-chat-template")
    code, greedy, err = _run(capsys, *args)
    assert code == 0 and "[backend " in err and "fused step" in err and "tokens/s]" in err
    code, unfused, err = _run(capsys, *args, "--no-fused")
    assert code == 0 and "model step" in err and unfused == greedy
    code, streamed, _ = _run(capsys, *args, "--stream")
    assert code == 0 and streamed.strip() == greedy.strip()
    sampling = ("--temperature", 1.5, "--top-p", 0.9, "--seed", 7)
    first, second = (_run(capsys, *args, *sampling)[1] for _ in range(2))
    assert first == second
    code, _, err = _run(capsys, *args, "--lm-head-bits", 8)
    assert code == 0, err
    code, _, err = _run(capsys, *args, "--lm-head-bits", 8, "--embedding-bits", 8)
    assert code == 0 and "fused step" in err, err


def test_generate_in_16_bit(capsys, packed_dir):
    """--dtype casts the activations and dense weights; the packed layers keep their fp16 scales."""
    args = ("generate", packed_dir, "--prompt", "The quick", "--max-new-tokens", 4, "--no-chat-template")
    for dtype in ("bfloat16", "float16"):
        code, out, err = _run(capsys, *args, "--dtype", dtype, "--lm-head-bits", 8, "--embedding-bits", 8)
        assert code == 0 and "fused step" in err, err
        assert out.strip()


@pytest.mark.parametrize("flags,message", [
    (("--device", "tpu"), "--device must be cpu or cuda"),
    (("--device", "not a device"), "--device must be cpu or cuda"),
    pytest.param(("--device", "cuda"), "sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    (("--max-new-tokens", 0), "max_new_tokens must be a positive integer"),
    (("--temperature", -1), "temperature must be >= 0"),
    (("--top-p", 1.5), "top_p must be in (0, 1]"),
    (("--prompt", ""), "--prompt is empty"),
])
def test_generate_bad_arguments_are_named(capsys, packed_dir, flags, message):
    code, _, err = _run(capsys, "generate", packed_dir, "--prompt", "Hi", *flags)
    assert code == 2 and message in err


def test_bench_e2e_runs_through_the_cli(capsys, dense_dir):
    code, out, err = _run(capsys, "bench", "e2e", dense_dir, "--candidates", "gqsa", "--prompt-len", 4,
                          "--new-tokens", 2, "--repeats", 1, "--threads", 1, "--json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["candidate"] == "gqsa"
