"""Smoke test of the CPU kernel benchmark: tiny shapes, one repeat, every candidate reported with its keys."""

import json

from gqsa.bench import kernel
from gqsa.ops import available_backends

KEYS = {"candidate", "shape", "batch", "median_ms", "gb_per_s", "bandwidth_pct", "speedup_vs_fp32"}


def test_kernel_benchmark_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = kernel.main(["--shapes", "tiny", "--batch", "1,3", "--repeats", "1", "--min-calls", "1", "--cold-mib", "1",
                      "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"torch", "git_revision", "dram_read_gb_per_s"} <= set(report["machine"])
    rows = report["measurements"]
    assert rows and all(KEYS <= set(r) for r in rows)
    names = {r["candidate"] for r in rows}
    assert {"torch-fp32", "torch-bf16"} <= names
    if "cpu" in available_backends("cpu"):
        assert {"gqsa-cpu", "gqsa-cpu-rowsplit", "gqsa-cpu-a8"} <= names
    assert {(r["shape"], r["batch"]) for r in rows} == {(s, b) for s in ("48x128", "32x64") for b in (1, 3)}
    assert all(r["median_ms"] > 0 and r["gb_per_s"] > 0 for r in rows)
    assert all(r["speedup_vs_fp32"] == 1.0 for r in rows if r["candidate"] == "torch-fp32")
    assert "| shape" in capsys.readouterr().out and "| shape" in md.read_text()
