"""benchmarks/gpu_check.sh, the prepared command for a rented GPU machine, checked without a GPU: its syntax, its dry
run (every step with a time limit, the whole within the deadline, the commands it would run), a run whose Python is
a stand-in that plays each step's part (the runner's results, logs and summary), and its two Python helpers
(benchmarks/gpu_ncu_driver.py under Triton's interpreter, benchmarks/gpu_e2e.py on a tiny model with the native CPU
backend)."""

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["machine", "tests", "kernel-7b", "kernel-13b", "e2e", "ncu"]
EIGHT_MINUTES = 480


def _run(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=os.environ | env)


def _limits(out: str) -> dict[str, int]:
    """{step: seconds} from the dry run's "== STEP: timeout Ns" lines."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^== ([a-z0-9-]+): timeout (\d+)s", out, re.M)}


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_without_a_directory_it_prints_its_usage_and_exits_2():
    result = _run({}, timeout=30)
    assert result.returncode == 2 and "usage: bash benchmarks/gpu_check.sh DIR" in result.stderr


def test_dry_run_lists_every_step_with_its_commands_and_creates_nothing(tmp_path):
    out_dir = tmp_path / "gpu"
    result = _run({"GQSA_GPU_CHECK_DRY": "1"}, str(out_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    limits = _limits(out)
    assert list(limits) == STEPS
    # the worst case (every step uses all of its time, then timeout's 5 s before KILL) fits in 8 minutes
    assert sum(limits.values()) + 5 * len(STEPS) <= EIGHT_MINUTES
    assert limits["tests"] >= 120 and all(limits[s] >= 30 for s in STEPS)
    assert not out_dir.exists()
    commands = [line for line in out.splitlines() if line.startswith("+ ")]
    pytest_line = next(c for c in commands if "-m pytest" in c)
    assert "tests/ops/test_ops_triton.py" in pytest_line and pytest_line.endswith("tests/bench")
    assert ("tests/ops/test_ops_triton_a8.py" in pytest_line) == (ROOT / "tests/ops/test_ops_triton_a8.py").exists()
    for shape in ("7b", "13b"):
        kernel_line = next(c for c in commands if f"--shapes {shape} " in c)
        for flag in ("bench kernel --device cuda", r"--batch 1\,4\,16", r"--sparsity 0.3\,0.5\,0.7", "--repeats",
                     f"--json {out_dir}/kernel_{shape}.json", f"--markdown {out_dir}/kernel_{shape}.md"):
            assert flag in kernel_line
    e2e_line = next(c for c in commands if "benchmarks/gpu_e2e.py" in c)
    assert f"--json {out_dir}/e2e.json" in e2e_line and "--new-tokens 128" in e2e_line
    ncu_lines = [c for c in commands if re.match(r"\+ \S*ncu ", c)]  # ncu, or its path where it is installed
    assert [re.search(r"--backends (\S+)", c)[1] for c in ncu_lines] == ["triton", "triton-a8"]
    for flag in ("--clock-control none", "--kernel-name regex:", "--launch-count", "--section SpeedOfLight",
                 "--section Occupancy", "--section LaunchStats", "--section MemoryWorkloadAnalysis",
                 "benchmarks/gpu_ncu_driver.py"):
        assert all(flag in c for c in ncu_lines)
    assert "+ nvidia-smi -L" in commands
    assert "| ncu | dry run |" in out


def test_a_short_deadline_keeps_the_first_steps_and_skips_the_rest():
    result = _run({"GQSA_GPU_CHECK_DRY": "1", "GQSA_GPU_CHECK_DEADLINE_S": "120"}, "out/gpu")
    assert result.returncode == 0, result.stderr
    limits = _limits(result.stdout)
    ran = list(limits)
    assert ran == STEPS[:len(ran)] and len(ran) >= 2 and sum(limits.values()) + 5 * len(ran) <= 120
    assert limits["tests"] >= 60  # its minimum, before what the later steps would have wanted
    assert len(ran) < len(STEPS)
    for step in STEPS[len(ran):]:
        assert f"| {step} | skipped (no time left) | 0 |" in result.stdout


# A stand-in for python3: plays each step's part from its arguments (passes, writes a benchmark's markdown, fails).
FAKE_PYTHON = r"""#!/usr/bin/env bash
args="$*"
md=${args##*--markdown }
case "$args" in
  -)  cat >/dev/null; echo "device Fake GPU | sm 9.0"; echo "gqsa cuda backends: auto reference triton" ;;
  "-m pytest"*) echo "...F."; echo "1 failed, 4 passed in 0.50s"; exit 1 ;;
  *"--shapes 7b"*)
    printf '# k\n\n| a |\n\n## Targets (batch 1, W4S50)\n\n' >"$md"
    printf '| shape | x |\n|---|---|\n| 11008x4096 | 1.3x |\n\n1 of 2 judged targets met.\n' >>"$md" ;;
  *"--shapes 13b"*) echo "kernel benchmark: error: out of luck" >&2; exit 3 ;;
  *gpu_e2e.py*) printf '# e2e\n\n| candidate | tok/s |\n| dense-fp16 | 300 |\n' >"$md" ;;
  *) echo "unexpected: $*" >&2; exit 9 ;;
esac
"""


def test_a_run_records_every_step_and_writes_the_summary(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out_dir = tmp_path / "gpu"
    result = _run({"GQSA_PYTHON": str(fake)}, str(out_dir), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr  # tests and kernel-13b failed
    summary = (out_dir / "summary.md").read_text()
    assert result.stdout.endswith(summary)  # printed last, and written
    rows = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    assert "| ok |" in rows["machine"] and "device Fake GPU" in rows["machine"]
    assert "| failed (exit 1) |" in rows["tests"] and "1 failed, 4 passed" in rows["tests"]
    assert "| ok |" in rows["kernel-7b"] and "1 of 2 judged targets met" in rows["kernel-7b"]
    assert "| failed (exit 3) |" in rows["kernel-13b"] and "out of luck" in rows["kernel-13b"]
    assert "| ok |" in rows["e2e"]
    if shutil.which("ncu") is None:
        assert "| skipped |" in rows["ncu"] and "is not on PATH" in (out_dir / "ncu.txt").read_text()
    assert "## kernel-7b: Targets (batch 1, W4S50)" in summary and "| 11008x4096 | 1.3x |" in summary
    assert "| dense-fp16 | 300 |" in summary
    machine = (out_dir / "machine.txt").read_text()
    assert "+ nvidia-smi -L" in machine and "# machine: ok after" in machine
    assert "--junitxml=" in (out_dir / "tests.txt").read_text()


def test_ncu_driver_help_and_a_cpu_run_under_the_interpreter():
    driver = ROOT / "benchmarks" / "gpu_ncu_driver.py"
    helped = subprocess.run([sys.executable, str(driver), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--backends" in helped.stdout and "--calls" in helped.stdout
    pytest.importorskip("triton")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    ran = subprocess.run([sys.executable, str(driver), "--device", "cpu", "--out-features", "40", "--in-features",
                          "64", "--calls", "1", "--backends", "triton,no-such-backend"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stderr
    assert "triton: 1 calls on 40x64 W4S50 g16, batch 1" in ran.stdout
    assert "no-such-backend: skipped" in ran.stdout


def test_e2e_help_and_its_report_on_a_tiny_model_on_the_cpu(tmp_path):
    script = ROOT / "benchmarks" / "gpu_e2e.py"
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and all(f in helped.stdout for f in ("--backends", "--new-tokens", "--candidates"))
    from gqsa.ops import available_backends

    if "cpu" not in available_backends("cpu"):
        pytest.skip("the native CPU kernels are not built: no packed backend to run the flow on without a GPU")
    out, md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    ran = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shapes", "tiny", "--layers", "1",
                          "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2", "--dtype", "float32",
                          "--backends", "cpu,no-such-backend", "--json", str(out), "--markdown", str(md)],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    rows = {r["candidate"]: r for r in report["results"]}
    # every candidate is listed: measured, or skipped with the reason (in the row and in the notes)
    assert list(rows) == ["dense-fp32", "hf-generate-fp32", "torch-int4-g128", "gqsa-cpu", "gqsa-no-such-backend"]
    measured = {n: r for n, r in rows.items() if "skipped" not in r}
    assert list(measured) == ["dense-fp32", "hf-generate-fp32", "gqsa-cpu"]
    assert rows["dense-fp32"]["speedup_vs_dense"] == 1.0 and rows["gqsa-cpu"]["backend"] == "cpu"
    for r in measured.values():
        assert "error" not in r
        assert r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and len(r["tokens"]) == 4 and len(r["ttft_ms_runs"]) == 2
        assert r["peak_gpu_mib"] is None and r["peak_gpu_vs_dense"] is None
        assert r["speedup_vs_dense"] > 0 and r["ttft_vs_dense"] > 0
    assert rows["dense-fp32"]["step"] == rows["gqsa-cpu"]["step"] == "fused"
    hf = rows["hf-generate-fp32"]
    assert hf["step"].startswith("transformers generate") and hf["loop"] == "transformers generate"
    assert hf["reference"] == "dense-fp32" and 0 <= hf["leading_tokens_equal_to_dense"] <= 4
    assert hf["model_mib"] == rows["dense-fp32"]["model_mib"] > rows["gqsa-cpu"]["model_mib"]
    assert "CUDA kernel" in rows["torch-int4-g128"]["skipped"]
    skipped = ("torch-int4-g128", "gqsa-no-such-backend")
    assert report["notes"] == [f"{n} skipped: {rows[n]['skipped']}" for n in skipped]
    assert rows["gqsa-no-such-backend"]["skipped"] == "backend no-such-backend not offered by gqsa.ops for cpu here"
    text = md.read_text()
    assert "| gqsa-cpu | fused |" in text and "| hf-generate-fp32 | transformers generate" in text
    assert "| torch-int4-g128 | skipped: " in text


def _gpu_e2e():
    """benchmarks/gpu_e2e.py as a module (registered, as its dataclass needs)."""
    if "gpu_e2e" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_e2e", ROOT / "benchmarks" / "gpu_e2e.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_e2e"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_e2e"]


def test_e2e_candidates_are_chosen_by_kind_or_name():
    e2e = _gpu_e2e()
    names = [c.name for c in e2e.all_candidates("float16", ["triton", "triton-a8"])]
    assert names == ["dense-fp16", "hf-generate-fp16", "torch-int4-g128", "gqsa-triton", "gqsa-triton-a8"]
    args = e2e.parse_args(["--candidates", "torch-int4,gqsa-triton-a8"])
    assert args.candidates == ["torch-int4", "gqsa-triton-a8"]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--candidates", "dense,no-such-candidate"])


def test_e2e_a_failed_cuda_graph_is_noted_and_measured_without_one(monkeypatch):
    """On CUDA, a generation that fails through the CUDA graph is tried again with cuda_graph=False (a stand-in
    generation and device here: no GPU needed)."""
    import torch

    e2e = _gpu_e2e()
    graphs = []

    def once(model, prompt, spec):
        graphs.append(spec.cuda_graph)
        if spec.cuda_graph is None:
            raise RuntimeError("operation not permitted when stream is capturing")
        return {"tokens": torch.tensor([1, 2]), "first_token_s": 0.01, "decode_tok_s": 100.0, "prefill_tok_s": 8e2,
                "step": "fused"}

    monkeypatch.setattr(e2e, "gqsa_generate_once", once)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 << 20)

    class Prompt:
        shape = (1, 8)

        def to(self, device):
            return self

    cuda = type("Device", (), {"type": "cuda"})()
    args, notes = e2e.parse_args(["--repeats", "2"]), []
    int4 = e2e.Candidate("torch-int4", "torch-int4-g128")
    row = e2e.measure(int4, torch.nn.Linear(2, 2), Prompt(), args, cuda, 1 << 20, notes)
    assert graphs == [None, False, False, False] and row["step"] == "fused" and row["peak_gpu_mib"] == 2.0
    assert "stream is capturing" in row["cuda_graph_failure"]
    assert notes == ["torch-int4-g128: generation through the CUDA graph failed (RuntimeError: operation not "
                     "permitted when stream is capturing); measured with cuda_graph=False"]
    monkeypatch.setattr(e2e, "gqsa_generate_once", lambda *a: (_ for _ in ()).throw(ValueError("no kernel")))
    with pytest.raises(RuntimeError, match="no kernel; with cuda_graph=False: ValueError: no kernel"):
        e2e.measure(int4, torch.nn.Linear(2, 2), Prompt(), args, cuda, 0, [])
