"""Every error the command line meets is one line on stderr with a meaningful exit code, and its JSON is strict.

Exit codes: 2 bad input, 1 machine trouble (another OSError, out of memory) or an internal error, 130 Ctrl-C,
143 SIGTERM. Faults that cannot be produced for real in a test (a full disk, Ctrl-C) are raised by a stand-in for
the subcommand; the rest go through the real commands on a tiny model.
"""

import errno
import json
import os
import signal
import time

import pytest
import torch

import gqsa.cli as cli
from gqsa.cli import main
from tiny import tiny_model, tiny_tokenizer


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, prefix: str) -> str:
    """The single line of stderr, which must start with ``prefix``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def _reject_constant(token):
    raise ValueError(f"not JSON: {token}")


def strict_json(text: str):
    """Parse as a strict JSON parser does: NaN, Infinity and -Infinity are errors."""
    return json.loads(text, parse_constant=_reject_constant)


def _raising(exc):
    def handler(args):
        raise exc

    return handler


# ---- exit codes and one-line messages, from a stand-in subcommand --------------------------------------------


@pytest.mark.parametrize("exc,message", [
    (ValueError("--thing must be positive"), "--thing must be positive"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"), "No such file or directory: /data/x"),
    (FileExistsError("out exists; pass --overwrite"), "out exists; pass --overwrite"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file"), "Not a directory: /data/file"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/dir"), "Is a directory: /data/dir"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), "Permission denied: /ro/out; choose a path"),
])
def test_bad_input_exits_2_with_one_line(capsys, monkeypatch, exc, message):
    monkeypatch.setattr(cli, "cmd_info", _raising(exc))
    code, _, err = _run(capsys, "info", "somewhere")
    assert code == 2
    assert message in _one_error_line(err, "gqsa info: error: ")


def test_gqsa_errors_are_bad_input(capsys, monkeypatch):
    from gqsa.format.checkpoint import CheckpointError
    from gqsa.format.packed import FormatError
    from gqsa.models.adapter import UnsupportedArchitectureError

    for exc in (CheckpointError("bad ckpt"), FormatError("bad format"), UnsupportedArchitectureError("gpt2")):
        monkeypatch.setattr(cli, "cmd_info", _raising(exc))
        code, _, err = _run(capsys, "info", "somewhere")
        assert code == 2 and str(exc) in _one_error_line(err, "gqsa info: error: ")


def test_full_disk_exits_1_naming_the_path(capsys, monkeypatch):
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/model.safetensors")
    monkeypatch.setattr(cli, "cmd_compress", _raising(exc))
    code, _, err = _run(capsys, "compress", "--out", "/out")
    assert code == 1
    line = _one_error_line(err, "gqsa compress: error: ")
    assert "No space left on device: /out/model.safetensors" in line and "Errno" not in line


def test_out_of_memory_exits_1(capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_eval", _raising(MemoryError()))
    code, _, err = _run(capsys, "eval", "ppl", "m", "--dataset", "wiki")
    assert code == 1 and "out of memory" in _one_error_line(err, "gqsa eval ppl: error: ")


def test_internal_error_is_one_line_and_verbose_adds_the_traceback(capsys, caplog, monkeypatch):
    monkeypatch.setattr(cli, "cmd_info", _raising(RuntimeError("boom\nsecond line")))
    code, _, err = _run(capsys, "info", "somewhere")
    assert code == 1 and "Traceback" not in caplog.text
    line = _one_error_line(err, "gqsa info: internal error: RuntimeError: boom second line")
    assert line.endswith("(rerun with --verbose for the traceback)")
    code, _, err = _run(capsys, "--verbose", "info", "somewhere")  # logging's handler writes the traceback
    assert code == 1 and "Traceback (most recent call last)" in caplog.text and "RuntimeError: boom" in caplog.text
    line = _one_error_line(err, "gqsa info: internal error: ")
    assert line == "gqsa info: internal error: RuntimeError: boom second line"


def test_ctrl_c_exits_130_and_compress_says_how_to_resume(capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_compress", _raising(KeyboardInterrupt()))
    code, _, err = _run(capsys, "compress", "--out", "somewhere")
    assert code == 130
    assert _one_error_line(err, "gqsa compress:") == "gqsa compress: interrupted; rerun the same command to resume"
    monkeypatch.setattr(cli, "cmd_info", _raising(KeyboardInterrupt()))
    code, _, err = _run(capsys, "info", "somewhere")
    assert code == 130 and _one_error_line(err, "gqsa info:") == "gqsa info: interrupted"


def test_sigterm_runs_finally_blocks_and_exits_143(capsys, monkeypatch):
    cleaned = []

    def slow_command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the signal interrupts this
            return 0
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_info", slow_command)
    start = time.perf_counter()
    code, _, err = _run(capsys, "info", "somewhere")
    assert code == 143 and cleaned == [True] and time.perf_counter() - start < 10
    assert _one_error_line(err, "gqsa info:") == "gqsa info: terminated"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is main()'s only


def test_usage_errors_keep_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress"])  # --out missing
    assert info.value.code == 2


# ---- real commands ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, dense_dir):
    out_dir = tmp_path_factory.mktemp("packed") / "magnitude"
    assert main(["compress", str(dense_dir), "--out", str(out_dir), "--preset", "magnitude-w4s50"]) == 0
    return out_dir


@pytest.mark.parametrize("edit,key", [
    (lambda layer: layer.pop("nnz"), "nnz"),
    (lambda layer: layer.update(in_features="64"), "in_features"),
])
def test_info_names_a_malformed_layer_entry(capsys, packed_dir, tmp_path, edit, key):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(packed_dir, broken)
    cfg = json.loads((broken / "gqsa_config.json").read_text())
    layer = "model.layers.1.mlp.down_proj"
    edit(cfg["layers"][layer])
    (broken / "gqsa_config.json").write_text(json.dumps(cfg))
    code, _, err = _run(capsys, "info", broken)
    assert code == 2
    line = _one_error_line(err, "gqsa info: error: ")
    assert layer in line and key in line


def _tiny_gguf_file(path):
    """A GGUF file with a small header and two float32 tensors (no model: enough for the header check)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_tensor("a.weight", np.ones((64, 64), dtype=np.float32))
    writer.add_tensor("b.weight", np.ones((128, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("fraction", [0.01, 0.6])
def test_truncated_gguf_is_one_line(capsys, tmp_path, monkeypatch, fraction):
    monkeypatch.setenv("GQSA_CACHE_DIR", str(tmp_path / "cache"))
    whole = _tiny_gguf_file(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: int(len(whole) * fraction)])
    code, _, err = _run(capsys, "eval", "ppl", cut, "--dataset", "wiki")
    assert code == 2
    line = _one_error_line(err, "gqsa eval ppl: error: ")
    assert str(cut) in line and "truncated" in line


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "tiny-nan"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_non_finite_weights_are_refused_at_load(capsys, nan_dir, text_file):
    code, _, err = _run(capsys, "eval", "ppl", nan_dir, "--text-file", text_file, "--seq-len", 16)
    assert code == 2
    line = _one_error_line(err, "gqsa eval ppl: error: ")
    assert "model.layers.1.mlp.up_proj.weight" in line and "1 non-finite value" in line and "1 NaN" in line


def test_eval_seq_len_beyond_the_context_is_refused_before_the_text_is_read(capsys, dense_dir, tmp_path):
    missing = tmp_path / "never-read.txt"  # reading it would fail with another message
    code, _, err = _run(capsys, "eval", "ppl", dense_dir, "--text-file", missing, "--seq-len", 1024)
    assert code == 2
    line = _one_error_line(err, "gqsa eval ppl: error: ")
    assert "1024" in line and "512" in line and "context" in line


@pytest.mark.parametrize("flags", [
    ("--seq-len", 1024),
    ("--seq-len", 1024, "--eval", "--eval-text-file", "TEXT", "--eval-seq-len", 16),
    ("--seq-len", 32, "--eval", "--eval-text-file", "TEXT", "--eval-seq-len", 1024),
])
def test_compress_seq_len_beyond_the_context_is_refused_before_any_work(capsys, monkeypatch, dense_dir, text_file,
                                                                        tmp_path, flags):
    import gqsa.algorithms.driver as driver
    import gqsa.eval.heldout as heldout

    def no_work(*args, **kwargs):
        raise AssertionError("calibration or evaluation started")

    monkeypatch.setattr(driver, "capture_calibration_inputs", no_work)
    monkeypatch.setattr(heldout, "perplexity", no_work)
    flags = [text_file if f == "TEXT" else f for f in flags]
    code, _, err = _run(capsys, "compress", dense_dir, "--out", tmp_path / "out", "--calib-dataset", text_file,
                        "--calib-samples", 2, *flags)
    assert code == 2
    line = _one_error_line(err, "gqsa compress: error: ")
    assert "1024" in line and "512" in line and "context" in line
    assert not (tmp_path / "out").exists()


def test_eval_ppl_json_is_strict_when_the_perplexity_is_infinite(capsys, tmp_path, text_file):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e25)  # finite weights, but a negative log-likelihood of ~1e24: ppl = inf
    model.save_pretrained(tmp_path / "hot")
    tiny_tokenizer().save_pretrained(tmp_path / "hot")
    code, out, err = _run(capsys, "eval", "ppl", tmp_path / "hot", "--text-file", text_file, "--seq-len", 16,
                          "--max-tokens", 64, "--json")
    assert code == 0, err
    result = strict_json(out)
    assert result["ppl"] is None and result["nll"] > 1e20


def test_compress_json_and_report_are_strict(capsys, monkeypatch, dense_dir, tmp_path):
    import gqsa.compress

    real = gqsa.compress.compress_model

    def with_non_finite(*args, **kwargs):
        report = real(*args, **kwargs)
        report["layers"][0]["relative_error"] = float("nan")
        report["e2e"] = {"loss_before": float("inf"), "loss_after": -float("inf")}
        return report

    monkeypatch.setattr(gqsa.compress, "compress_model", with_non_finite)
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "compress", dense_dir, "--out", out_dir, "--preset", "magnitude-w4s50", "--json")
    assert code == 0, err
    for text in (out, (out_dir / "report.json").read_text()):
        report = strict_json(text)
        assert report["layers"][0]["relative_error"] is None
        assert report["e2e"] == {"loss_before": None, "loss_after": None}


def test_zeroshot_json_is_strict(capsys, monkeypatch, dense_dir):
    import gqsa.eval.zeroshot as zeroshot

    def nan_result(model, tokenizer, spec, limit=None, batch_size=1):
        return zeroshot.TaskResult(task=spec.name, n=1, acc=float("nan"), stderr=None, ppl=float("inf"))

    monkeypatch.setattr(zeroshot, "evaluate_task", nan_result)
    code, out, err = _run(capsys, "eval", "zeroshot", dense_dir, "--tasks", "lambada", "--limit", 1, "--json")
    assert code == 0, err
    result = strict_json(out)
    assert result["acc"] is None and result["ppl"] is None


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`gqsa info DIR | head -1`: a closed stdout is no error to report (exit 141, as a shell's SIGPIPE)."""
    import subprocess
    import sys

    from tiny import tiny_model

    import gqsa
    from gqsa.compress import compress_model
    from gqsa.config import CompressConfig

    model = tiny_model("llama")
    compress_model(model, CompressConfig(method="magnitude"), progress=False)
    gqsa.save(model, None, tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-m", "gqsa", "info", str(tmp_path / "ckpt")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and not err.strip(), err


def test_a_text_file_named_like_a_packaged_corpus_is_that_file(capsys, monkeypatch, dense_dir, tmp_path, text_file):
    # "code" is also the name of a packaged corpus: --text-file must read the user's file all the same
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").write_text(text_file.read_text())
    results = []
    for name in ("code", "./code"):
        code, out, err = _run(capsys, "eval", "ppl", dense_dir, "--text-file", name, "--seq-len", 16, "--json")
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["tokens"] == results[1]["tokens"] and results[0]["ppl"] == results[1]["ppl"]


@pytest.mark.parametrize("command", [("ppl", "--seq-len", 16), ("zeroshot", "--tasks", "piqa", "--limit", 1)])
def test_eval_of_a_checkpoint_without_tokenizer_names_it(capsys, packed_dir, tmp_path, text_file, command):
    import gqsa

    model, _ = gqsa.load(packed_dir)
    bare = tmp_path / "no-tokenizer"
    gqsa.save(model, None, bare)  # allowed: a tokenizer "may be None"
    extra = ("--text-file", text_file) if command[0] == "ppl" else ()
    code, _, err = _run(capsys, "eval", *command, bare, *extra)
    assert code == 2
    line = _one_error_line(err, f"gqsa eval {command[0]}: error: ")
    assert str(bare) in line and "no tokenizer files" in line


def test_compressing_a_compressed_checkpoint_is_refused_before_any_work(capsys, packed_dir, tmp_path):
    code, _, err = _run(capsys, "compress", packed_dir, "--out", tmp_path / "again", "--preset", "magnitude-w4s50")
    assert code == 2
    line = _one_error_line(err, "gqsa compress: error: ")
    assert str(packed_dir) in line and "compressed checkpoint" in line and "dense model" in line
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("eval_flags,words", [
    (("--eval-text-file", "MISSING", "--eval-seq-len", 16), "MISSING"),
    (("--eval-text-file", "TEXT"), "2048"),  # the default window, beyond the tiny model's 512 positions
    (("--eval-text-file", "TEXT", "--eval-seq-len", 16, "--eval-max-tokens", 10), "10"),
])
def test_lazy_compress_checks_its_evaluation_before_compressing(capsys, monkeypatch, dense_dir, text_file, tmp_path,
                                                                eval_flags, words):
    """With --lazy-load no perplexity is measured before compressing: its settings are checked before it all the
    same, not after the whole compression."""
    import gqsa.compress

    def compress_model(*args, **kwargs):
        raise AssertionError("compressed before the evaluation settings were checked")

    monkeypatch.setattr(gqsa.compress, "compress_model", compress_model)
    missing = tmp_path / "nosuch.txt"
    flags = [{"MISSING": missing, "TEXT": text_file}.get(f, f) for f in eval_flags]
    code, _, err = _run(capsys, "compress", dense_dir, "--out", tmp_path / "out", "--method", "gqsa",
                        "--calib-samples", 2, "--seq-len", 16, "--lazy-load", "--eval", *flags)
    assert code == 2, err
    line = _one_error_line(err, "gqsa compress: error: ")
    assert str({"MISSING": missing}.get(words, words)) in line, line


def test_save_with_overwrite_keeps_the_rules_of_the_command_line(packed_dir, tmp_path):
    """gqsa.save(..., overwrite=True) replaces a gqsa checkpoint, never another directory or the user's files."""
    import shutil

    import gqsa

    model, tokenizer = gqsa.load(packed_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="gqsa did not write .keep.txt."):
        gqsa.save(model, tokenizer, precious, overwrite=True)
    assert (precious / "keep.txt").read_text() == "mine" and sorted(p.name for p in precious.iterdir()) == ["keep.txt"]
    again = tmp_path / "again"
    shutil.copytree(packed_dir, again)
    gqsa.save(model, tokenizer, again, overwrite=True)  # a gqsa checkpoint: replaced
    (again / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not write .notes.txt."):
        gqsa.save(model, tokenizer, again, overwrite=True)
    assert (again / "notes.txt").read_text() == "mine"


def test_a_compressed_checkpoint_with_a_corrupt_tokenizer_names_it(capsys, packed_dir, tmp_path, text_file):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(packed_dir, broken)
    (broken / "tokenizer.json").write_text("{")
    code, _, err = _run(capsys, "eval", "ppl", broken, "--text-file", text_file, "--seq-len", 16)
    assert code == 2
    line = _one_error_line(err, "gqsa eval ppl: error: ")
    assert str(broken) in line and "tokenizer cannot be loaded" in line, line


def _header_is_a_list(ckpt):
    body = b"[]"
    (ckpt / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)


def _edit_json(name, edit):
    def apply(ckpt):
        cfg = json.loads((ckpt / name).read_text())
        edit(cfg)
        (ckpt / name).write_text(json.dumps(cfg))
    return apply


@pytest.mark.parametrize("tamper,words", [
    (_edit_json("gqsa_config.json", lambda c: c["weights"].update(file=5)), "'weights.file' must be a file name"),
    (_edit_json("gqsa_config.json", lambda c: c["weights"].update(file="../model.safetensors")),
     "'weights.file' must be a file name inside the checkpoint"),
    (_edit_json("gqsa_config.json", lambda c: c["weights"].update(file="/etc/model.safetensors")),
     "'weights.file' must be a file name inside the checkpoint"),
    (_header_is_a_list, "corrupted safetensors header (a JSON list"),
    (_edit_json("config.json", lambda c: c.update(dtype="float99")), "float99"),
])
def test_hand_edited_checkpoint_records_are_named(capsys, packed_dir, tmp_path, tamper, words):
    """Records a checkpoint's own checks missed (found by an audit): one line, exit 2, not an internal error."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(packed_dir, broken)
    tamper(broken)
    code, _, err = _run(capsys, "info", broken)
    assert code == 2, err
    line = _one_error_line(err, "gqsa info: error: ")
    assert str(broken) in line and words in line, line
