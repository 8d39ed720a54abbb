"""The CPU kernel benchmark (tiny shapes, one repeat, every candidate reported with its keys) and what it shares
with the CUDA mode: arguments, measurement rows, the table."""

import json

import pytest

from benchmarks.bench import kernel
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


def test_arguments_take_lists_and_device_defaults():
    args = kernel.parse_args(["--sparsity", "0.3,0.5,0.7", "--shapes", "7b,13b"])
    assert args.device == "cpu" and args.sparsity == [0.3, 0.5, 0.7] and args.shapes == "7b,13b"
    assert (args.repeats, args.min_calls, args.cold_mib, args.cuda_graphs) == (10, 4, 64, True)
    assert kernel.shapes_of(args.shapes) == kernel.SHAPES["7b"] + kernel.SHAPES["13b"]
    assert kernel.shapes_of("tiny,tiny") == kernel.SHAPES["tiny"]
    args = kernel.parse_args(["--device", "cuda", "--repeats", "3"])
    assert (args.repeats, args.min_calls, args.cold_mib, args.sparsity) == (3, 20, None, [0.5])
    assert kernel.settings_dict(args)["sparsity"] == 0.5  # one value stays a number, as sweep.py reads it


@pytest.mark.parametrize("argv", [["--sparsity", "1.0"], ["--sparsity", "a,b"], ["--sparsity", ","],
                                  ["--shapes", "7b,70b"], ["--device", "tpu"], ["--repeats", "0"]])
def test_invalid_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        kernel.parse_args(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_several_sparsities_tag_the_gqsa_candidates_and_one_keeps_the_old_names():
    args = kernel.parse_args(["--batch", "1", "--repeats", "1", "--min-calls", "1", "--sparsity", "0.3,0.5"])
    args.cold_mib = 0  # one copy per candidate: the names are what is checked
    rows = kernel.bench_shape((32, 64), args, 1.0, [])
    names = [r["candidate"] for r in rows]
    assert "torch-fp32" in names and not any(n.startswith("gqsa-") and n[-4:] not in ("-s30", "-s50") for n in names)
    if "cpu" in available_backends("cpu"):
        assert {"gqsa-cpu-s30", "gqsa-cpu-rowsplit-s50", "gqsa-cpu-kernel-only-s50"} <= set(names)
        args.sparsity = [0.5]
        names = {r["candidate"] for r in kernel.bench_shape((32, 64), args, 1.0, [])}
        assert {"gqsa-cpu", "gqsa-cpu-rowsplit", "gqsa-cpu-a8", "gqsa-cpu-kernel-only"} <= names


def test_rows_and_table_report_ratios_and_a_missing_baseline():
    c = kernel.Candidate("x", lambda i, x: x, copies=2, weight_bytes=2_000_000, info={"bits": 4})
    row = kernel.measurement_row(c, (8, 16), 1, [1e-3, 2e-3, 4e-3], 4e-3, bandwidth=4.0, speedup_key="speedup_vs_fp16")
    assert (row["median_ms"], row["min_ms"], row["gb_per_s"], row["bandwidth_pct"]) == (2.0, 1.0, 1.0, 25.0)
    assert row["speedup_vs_fp16"] == 2.0 and row["bits"] == 4 and row["shape"] == "8x16" and row["copies"] == 2
    none = kernel.measurement_row(c, (8, 16), 1, [1e-3], None, 4.0, "speedup_vs_fp16")
    table = kernel.format_table([row, none], "speedup_vs_fp16", "HBM")
    assert "% HBM bw | speedup vs fp16 |" in table and "| 8x16 | 1 | x | 2.000 | 1.0 | 25 | 2.00 |" in table
    assert table.endswith("| n/a |")
    assert "% DRAM bw | speedup vs fp32 |" in kernel.format_table([])
