"""`gqsa compress` and its output directory: one run per output, checks before any work, nothing left behind."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from gqsa.cli import main
from gqsa.models.outputs import resume_dir
from gqsa.utils.io import owned_prefix
from gqsa.utils.lock import OutputLock, lock_path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def calib(text_file):
    return ("--calib-dataset", text_file, "--calib-samples", 4, "--seq-len", 32)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the model is loaded: the checks must come first."""
    import gqsa.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(loading, "load_model", refuse)


HOLD_LOCK = textwrap.dedent('''
    import sys, time
    from gqsa.utils.lock import OutputLock
    with OutputLock(sys.argv[1], what="gqsa compress (a test holding the lock)"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
''')


def _hold_lock(out, seconds=60):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_first(capsys, dense_dir, tmp_path, no_work):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        start = time.monotonic()
        code, stdout, err = _run(capsys, "compress", dense_dir, "--out", out, "--method", "magnitude")
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and not stdout
    assert f"pid {holder.pid}" in err and "a test holding the lock" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_killed_holder_never_blocks_the_next_run(capsys, dense_dir, tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()  # left behind by the killed process, but no longer locked
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out, "--method", "magnitude")
    assert code == 0, err
    assert not lock_path(out).exists()  # released (and removed) by the run that finished


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with OutputLock(tmp_path / "x"):
        with pytest.raises(FileExistsError, match="another gqsa run"):
            OutputLock(tmp_path / "x").acquire()
    with OutputLock(tmp_path / "x"):  # released: free again
        pass


@pytest.mark.parametrize("case", ["empty", "file", "equals input", "contains input", "foreign directory",
                                  "non-empty without --overwrite"])
def test_bad_outputs_are_refused_before_any_work(capsys, dense_dir, tmp_path, no_work, case):
    import shutil

    model = dense_dir
    if case == "empty":
        out, words = "", "empty"
    elif case == "file":
        out = tmp_path / "a-file"
        out.write_text("keep me")
        words = "existing file"
    elif case == "equals input":
        model = tmp_path / "model"
        shutil.copytree(dense_dir, model)
        out, words = model, "input model"
    elif case == "contains input":
        model = tmp_path / "models" / "tiny"
        shutil.copytree(dense_dir, model)
        out, words = tmp_path / "models", "input model"
    elif case == "foreign directory":
        out = tmp_path / "photos"
        out.mkdir()
        (out / "holiday.jpg").write_bytes(b"\xff\xd8")
        words = "gqsa did not write (holiday.jpg)"
    else:
        out = tmp_path / "photos"
        out.mkdir()
        (out / "holiday.jpg").write_bytes(b"\xff\xd8")
        words = "not empty"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    flags = ("--overwrite",) if case != "non-empty without --overwrite" else ()
    code, stdout, err = _run(capsys, "compress", model, "--out", out, "--method", "magnitude", *flags)
    assert code == 2 and not stdout, err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched


def test_a_read_only_output_location_is_refused_before_any_work(capsys, dense_dir, tmp_path, no_work, monkeypatch):
    import gqsa.models.outputs as outputs

    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self._st = real(path)

        def __getattr__(self, name):
            return getattr(self._st, name)

        @property
        def f_flag(self):
            return self._st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(outputs.os, "statvfs", ReadOnly)
    code, _, err = _run(capsys, "compress", dense_dir, "--out", tmp_path / "sub" / "out", "--method", "magnitude")
    assert code == 2 and "Read-only file system" in err and str(tmp_path) in err, err
    assert not (tmp_path / "sub").exists()


def test_overwrite_replaces_a_gqsa_output_and_the_output_gets_the_umask_mode(capsys, dense_dir, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        code, _, err = _run(capsys, "compress", dense_dir, "--out", out, "--method", "magnitude")
        assert code == 0, err
        assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0o700
        code, _, err = _run(capsys, "compress", dense_dir, "--out", out, "--method", "magnitude", "--sparsity",
                            0.25, "--overwrite")
        assert code == 0, err
    finally:
        os.umask(old)
    assert json.loads((out / "compress_config.json").read_text())["sparsity"]["ratio"] == 0.25
    assert {"report.json", "compress_config.json", "gqsa_config.json"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, resume state or temporary left


def test_stale_temporaries_of_killed_runs_are_removed_and_live_ones_kept(capsys, dense_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / (owned_prefix(".out").replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "abc123.tmp")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"\0" * 4096)
    stale_file = tmp_path / (owned_prefix(".report.json").replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "x1.tmp")
    stale_file.write_text("{")
    live = tmp_path / (owned_prefix(".other") + "zz9.tmp")  # this process: alive
    live.mkdir()
    code, _, err = _run(capsys, "compress", dense_dir, "--out", tmp_path / "out", "--method", "magnitude")
    assert code == 0, err
    assert not stale_dir.exists() and not stale_file.exists() and live.exists()


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the old one is restored."""
    from gqsa.utils.io import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / (owned_prefix(".out").replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "q7.old")
    aside.mkdir()
    (aside / "gqsa_config.json").write_text("{}")
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "out" / "gqsa_config.json").read_text() == "{}" and not aside.exists()


def test_stale_activation_spills_are_removed(tmp_path):
    import torch

    from gqsa.algorithms.activation_store import ActivationStore

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / (owned_prefix("gqsa-activations").replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "a1.tmp")
    stale.mkdir()
    (stale / "000000.pt").write_bytes(b"\0" * 1024)
    with ActivationStore(budget_bytes=0, directory=tmp_path) as store:
        store.append(torch.zeros(4))
        assert not stale.exists() and len(list(tmp_path.iterdir())) == 1
    assert not list(tmp_path.iterdir())


def test_a_failed_compress_leaves_no_output(capsys, dense_dir, text_file, tmp_path, monkeypatch):
    import gqsa.algorithms.bqpo as bqpo

    def fails(*args, **kwargs):
        raise ValueError("block 0, layer model.layers.0.self_attn.q_proj: calibration activations contain NaN")

    monkeypatch.setattr(bqpo, "_compress_and_train", fails)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out, "--bqpo-epochs", 1, *calib(text_file))
    assert code == 2 and "calibration activations contain NaN" in err
    assert not list(tmp_path.iterdir())  # no output, no resume state (nothing finished), no lock, no temporary


COMPRESS = textwrap.dedent('''
    import sys
    from gqsa.cli import main
    sys.exit(main(sys.argv[1:]))
''')


STALLS_AT_BLOCK_1 = textwrap.dedent('''
    import sys, time
    import gqsa.algorithms.bqpo as bqpo
    from gqsa.cli import main

    real = bqpo._compress_and_train

    def stalls_at_block_1(block, prefix, b, *args):
        while b == 1:  # block 0 is finished and saved; wait here for the signal
            time.sleep(0.02)
        return real(block, prefix, b, *args)

    bqpo._compress_and_train = stalls_at_block_1
    sys.exit(main(sys.argv[1:]))
''')


def test_sigterm_stops_a_compress_cleanly_and_the_same_command_resumes(dense_dir, text_file, tmp_path):
    out = tmp_path / "out"
    argv = ["compress", str(dense_dir), "--out", str(out), "--bqpo-epochs", "1", "--calib-samples", "8",
            "--calib-dataset", str(text_file), "--seq-len", "32", "--e2e-epochs", "0"]
    proc = subprocess.Popen([sys.executable, "-c", STALLS_AT_BLOCK_1, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    entry = resume_dir(out) / "block_0000.json"
    deadline = time.monotonic() + 240
    while not entry.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "gqsa compress: terminated; rerun the same command to resume"
    assert sorted(p.name for p in tmp_path.iterdir()) == [resume_dir(out).name]  # no lock, temporary or output
    done = subprocess.run([sys.executable, "-c", COMPRESS, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


GATED_COMPRESS = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import gqsa.algorithms.bqpo as bqpo
    from gqsa.cli import main

    gate, real = Path(sys.argv[1]), bqpo._compress_and_train

    def waits_at_the_gate(*args):
        while not gate.exists():  # holds the run (and its lock) until the test opens the gate
            time.sleep(0.02)
        return real(*args)

    bqpo._compress_and_train = waits_at_the_gate
    sys.exit(main(sys.argv[2:]))
''')


def test_two_concurrent_compress_runs_on_one_output_never_mix(dense_dir, text_file, tmp_path):
    """Two real runs with different settings: the second fails at once naming the first, which finishes alone."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    common = ["compress", str(dense_dir), "--out", str(out), "--calib-dataset", str(text_file), "--calib-samples",
              "8", "--seq-len", "32", "--e2e-epochs", "0"]
    first = subprocess.Popen([sys.executable, "-c", GATED_COMPRESS, str(gate), *common, "--bqpo-epochs", "1",
                              "--sparsity", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lock_path(out).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        second = subprocess.run([sys.executable, "-c", COMPRESS, *common, "--bqpo-epochs", "1", "--sparsity",
                                 "0.25"], capture_output=True, text=True, timeout=300)
    finally:
        gate.touch()
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and f"another gqsa run (pid {first.pid}" in second.stderr, second.stderr
    cfg = json.loads((out / "gqsa_config.json").read_text())
    assert cfg["compression"]["sparsity"]["ratio"] == 0.5 and cfg["summary"]["sparsity"] == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate", "out"]


@pytest.mark.parametrize("method,preset", [("magnitude", ()), (None, ("--preset", "2of4-magnitude"))])
def test_overwrite_refuses_a_checkpoint_holding_the_users_files(capsys, dense_dir, tmp_path, method, preset):
    """A gqsa checkpoint the user put notes or results into is not replaced: they would be deleted. Every file
    gqsa itself writes (packed and float-pruned checkpoints, their tokenizer files) is not foreign."""
    from gqsa.models.outputs import foreign_entries

    out = tmp_path / "ckpt"
    flags = ("--method", method) if method else preset
    code, _, err = _run(capsys, "compress", dense_dir, "--out", out, *flags)
    assert code == 0, err
    assert foreign_entries(out) == []
    (out / "notes.txt").write_text("mine")
    (out / "results").mkdir()
    (out / "results" / "r.json").write_text("{}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stdout, err = _run(capsys, "compress", dense_dir, "--out", out, *flags, "--overwrite")
    assert code == 2 and not stdout, err
    assert "does not write (notes.txt, results)" in err and "would delete them" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
