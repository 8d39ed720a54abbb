"""The CUDA mode of the kernel benchmark (benchmarks/bench/kernel_cuda*.py).

Without a GPU: the clear error, the masks and weights of the candidates, the candidates' construction, the
targets computed from synthetic rows, and (under Triton's interpreter, tests/conftest.py) one tiny shape measured
on CPU tensors. With a GPU: the benchmark end to end on the tiny shapes, checking the JSON contract.
"""

import json

import pytest
import torch

from benchmarks.bench import kernel, kernel_cuda
from benchmarks.bench import kernel_cuda_candidates as cuda_candidates
from benchmarks.bench import kernel_cuda_timing as cuda_timing
from gqsa.ops import gpu

CUDA = torch.cuda.is_available()
ROW_KEYS = {"candidate", "shape", "out_features", "in_features", "batch", "median_ms", "min_ms", "weight_bytes",
            "gb_per_s", "bandwidth_pct", "speedup_vs_fp16", "copies", "calls", "timing", "bits", "sparsity"}
GQSA_NAMES = {"gqsa-triton-w2g64", "gqsa-triton-w2g128", "gqsa-triton-s50", "gqsa-triton-rowsplit-s50",
              "gqsa-triton-uneven-s50", "gqsa-triton-rowsplit-uneven-s50"}


@pytest.mark.skipif(CUDA, reason="checks the error raised without CUDA")
def test_device_cuda_without_cuda_exits_2_naming_the_problem(capsys):
    assert kernel.main(["--device", "cuda", "--shapes", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs a CUDA GPU" in err and "torch.cuda.is_available() is False" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("n_out,g_count,sparsity", [(48, 8, 0.5), (37, 10, 0.3), (9, 7, 0.7), (64, 20, 0.0),
                                                    (1, 16, 0.5)])
def test_uneven_rows_keep_very_different_counts_at_the_same_overall_sparsity(n_out, g_count, sparsity):
    counts = cuda_candidates.uneven_row_counts(n_out, g_count, sparsity)
    d = 1 - sparsity
    heavy, light = counts[: n_out // 2], counts[n_out // 2:]
    assert int(counts.sum()) == round(d * n_out * g_count)  # the overall sparsity of the random mask
    assert (counts >= 0).all() and (counts <= g_count).all()
    assert heavy.unique().numel() <= 1 and int(light.max() - light.min()) <= 1
    spread = cuda_candidates.UNEVEN_SPREAD * min(d, 1 - d)
    if heavy.numel():
        assert int(heavy[0]) == min(g_count, round((d + spread) * g_count))
    mask = cuda_candidates.uneven_group_mask(n_out, g_count, sparsity)
    assert mask.shape == (n_out, g_count) and mask.dtype == torch.bool
    assert torch.equal(mask.sum(1), counts)


def test_uneven_rows_at_half_sparsity_keep_90_and_10_percent():
    counts = cuda_candidates.uneven_row_counts(100, 100, 0.5)
    assert counts[:50].tolist() == [90] * 50 and counts[50:].tolist() == [10] * 50
    masks = [cuda_candidates.uneven_group_mask(100, 100, 0.5, seed=s) for s in (0, 1)]
    assert not torch.equal(*masks)  # the kept columns are random


def test_2of4_pruning_keeps_the_two_largest_of_every_four():
    w = torch.randn(8, 32)
    pruned = cuda_candidates.prune_2of4(w)
    quads, kept = w.reshape(8, 8, 4), pruned.reshape(8, 8, 4)
    assert ((kept != 0).sum(-1) == 2).all()
    assert torch.equal(kept.abs().amax(-1), quads.abs().amax(-1))
    assert torch.equal(pruned[pruned != 0], w[pruned != 0])


def test_calls_per_timing_is_a_multiple_of_the_copies():
    assert [cuda_timing.calls_per_timing(c, 20) for c in (1, 3, 20, 40)] == [20, 21, 20, 40]


def test_candidates_on_cpu_tensors_carry_their_formats(monkeypatch):
    monkeypatch.setattr(cuda_candidates, "a8_available", lambda: False)  # the exact candidates only
    args = kernel.parse_args(["--device", "cuda", "--sparsity", "0.3,0.5"])
    weight = torch.randn(48, 128) * 0.02  # (N, K)
    notes: list[str] = []
    w2 = cuda_candidates.w2_candidates(weight, 0, notes)
    assert [c.name for c in w2] == ["gqsa-triton-w2g64", "gqsa-triton-w2g128"]
    for c, gs in zip(w2, (64, 128)):  # dense W2: every group kept, 2-bit codes
        assert (c.info["bits"], c.info["group_size"], c.info["sparsity"], c.info["split"]) == (2, gs, 0.0, "task")
        assert c.x_dtype == torch.float16 and c.copies == 1
    assert cuda_candidates.w2_candidates(torch.randn(4, 96), 0, notes) == []  # 96 in-features: neither group fits
    assert any("w2g64 skipped for 4x96" in n for n in notes)
    sparse = cuda_candidates.sparse_candidates(weight, args, cold_bytes=0)
    names = [c.name for c in sparse]
    assert names == [f"gqsa-triton{u}{s}" if split == "" else f"gqsa-triton-rowsplit{u}{s}"
                     for s in ("-s30", "-s50") for u in ("", "-uneven") for split in ("", "r")]
    by = {c.name: c for c in sparse}
    assert by["gqsa-triton-uneven-s50"].info["sparsity"] == 0.5  # exact: the counts are set per row
    assert by["gqsa-triton-rowsplit-uneven-s50"].info["split"] == "rows"
    assert by["gqsa-triton-s30"].info["rows"] == "random" and by["gqsa-triton-uneven-s30"].info["rows"] == "uneven"
    assert by["gqsa-triton-s30"].weight_bytes > by["gqsa-triton-s50"].weight_bytes
    big = cuda_candidates.sparse_candidates(weight, kernel.parse_args(["--sparsity", "0.5"]), cold_bytes=1 << 20)
    assert big[0].copies == kernel.copies_needed(big[0].weight_bytes, 1 << 20) > 1


@pytest.mark.parametrize("offered", [True, False])
def test_the_a8_candidate_is_measured_only_where_the_backend_is_offered(monkeypatch, offered):
    monkeypatch.setattr(cuda_candidates, "available_backends",
                        lambda device_type, approximate=False, named_only=False:
                        ["auto", "reference", "triton"] + (["triton-a8"] if offered and approximate else []))
    assert cuda_candidates.a8_available() is offered
    args = kernel.parse_args(["--device", "cuda", "--sparsity", "0.3,0.5"])
    sparse = cuda_candidates.sparse_candidates(torch.randn(48, 128) * 0.02, args, cold_bytes=0)
    by = {c.name: c for c in sparse}
    a8 = [name for name in by if "a8" in name]
    assert a8 == (["gqsa-triton-a8-s30", "gqsa-triton-a8-s50"] if offered else [])
    for name in a8:  # the random-rows weight of the exact task-centric candidate, through the a8 backend
        exact = by[name.replace("-a8", "")]
        assert by[name].info["backend"] == "triton-a8" and by[name].info["rows"] == "random"
        assert by[name].weight_bytes == exact.weight_bytes and by[name].info["sparsity"] == exact.info["sparsity"]
    assert len(sparse) == 8 + len(a8)


def test_baselines_that_cannot_run_here_are_skipped_with_a_note():
    notes: list[str] = []
    weight = torch.randn(48, 128)
    dense = cuda_candidates.dense_candidates(weight, 0)
    assert [(c.name, c.x_dtype) for c in dense] == [("torch-fp16", torch.float16), ("torch-bf16", torch.bfloat16)]
    assert not cuda_candidates.int4_candidate(weight, 0, notes, group_size=256)  # 128 is not a multiple of 256
    if not CUDA:
        assert not cuda_candidates.semi_structured_candidate(weight, 0, notes)  # CUDA tensors only
    assert any(n.startswith("torch-int4-g256 skipped for 48x128") for n in notes)
    assert all(len(n) < 400 for n in notes)


def _row(shape, name, ms, pct=50.0, batch=1):
    return {"shape": shape, "batch": batch, "candidate": name, "median_ms": ms, "bandwidth_pct": pct}


def test_targets_are_ratios_of_the_measured_medians():
    rows = [_row("11008x4096", n, ms, pct) for n, ms, pct in [
        ("torch-fp16", 40.0, 90), ("gqsa-triton-w2g64", 13.0, 80), ("gqsa-triton-w2g128", 12.0, 80),
        ("torch-2of4-fp16", 25.0, 60), ("gqsa-triton-s50", 10.0, 80), ("gqsa-triton-rowsplit-s50", 11.0, 70),
        ("gqsa-triton-uneven-s50", 10.0, 80), ("gqsa-triton-rowsplit-uneven-s50", 9.0, 85)]]
    rows += [_row("4096x4096", "gqsa-triton-s50", 5.0, 60), _row("4096x4096", "torch-fp16", 15.0),
             _row("4096x4096", "torch-fp16", 1.0, batch=4)]
    targets = kernel_cuda.target_ratios(rows)
    by = {(t["shape"], t["target"]): t for t in targets}
    assert {t["batch"] for t in targets} == {1} and len(targets) == 2 * 7
    mlp = "11008x4096"
    assert by[mlp, "W4S50 vs dense W2 g64"]["value"] == pytest.approx(1.3) and by[mlp, "W4S50 vs dense W2 g64"]["met"]
    assert by[mlp, "W4S50 vs dense W2 g128"]["met"] is False  # 1.2x < 1.26x
    assert by[mlp, "W4S50 vs 2:4 fp16"]["value"] == pytest.approx(2.5) and by[mlp, "W4S50 vs 2:4 fp16"]["met"]
    assert by[mlp, "W4S50 vs cuBLAS fp16"]["value"] == pytest.approx(4.0) and by[mlp, "W4S50 vs cuBLAS fp16"]["met"]
    bw = by[mlp, "W4S50 % of HBM read bandwidth"]
    assert (bw["value"], bw["threshold"], bw["met"], bw["unit"]) == (80, 75.0, True, "%")
    uneven = by[mlp, "W4S50 task-centric vs row split, uneven rows"]
    assert uneven["value"] == pytest.approx(0.9) and uneven["met"] is False
    assert by[mlp, "W4S50 task-centric vs row split, random rows"]["met"] is None
    small = "4096x4096"  # not a 7B MLP shape: bandwidth reported, not judged; missing candidates give None
    assert by[small, "W4S50 % of HBM read bandwidth"]["met"] is None
    assert by[small, "W4S50 vs cuBLAS fp16"]["value"] == pytest.approx(3.0)
    assert by[small, "W4S50 vs 2:4 fp16"]["value"] is None and by[small, "W4S50 vs 2:4 fp16"]["met"] is None
    text = kernel_cuda.format_targets(targets)
    assert "| 11008x4096 | 1 | W4S50 vs dense W2 g64 | 1.30x | >= 1.26x | yes |" in text
    assert "| 11008x4096 | 1 | W4S50 % of HBM read bandwidth | 80% | >= 75% | yes |" in text
    assert "| 4096x4096 | 1 | W4S50 vs 2:4 fp16 | n/a | >= 2.35x | - |" in text
    assert text.endswith("4 of 7 judged targets met.")
    assert kernel_cuda.target_ratios(rows, bits=2, sparsity=0.3)[0]["target"] == "W2S30 vs dense W2 g64"


def test_a8_candidate_is_reported_against_fp16_and_int4_where_measured():
    rows = [_row("11008x4096", n, ms) for n, ms in [("torch-fp16", 40.0), ("torch-int4-g128", 20.0),
                                                     ("gqsa-triton-s50", 10.0), ("gqsa-triton-a8-s50", 8.0)]]
    rows += [_row("4096x4096", "torch-fp16", 15.0), _row("4096x4096", "gqsa-triton-s50", 5.0)]
    targets = kernel_cuda.target_ratios(rows)
    by = {(t["shape"], t["target"]): t for t in targets}
    assert by["11008x4096", "W4S50 triton-a8 vs cuBLAS fp16"]["value"] == pytest.approx(5.0)
    assert by["11008x4096", "W4S50 triton-a8 vs torch int4 g128"]["value"] == pytest.approx(2.5)
    assert all(by["11008x4096", t]["threshold"] is None and by["11008x4096", t]["met"] is None
               for t in ("W4S50 triton-a8 vs cuBLAS fp16", "W4S50 triton-a8 vs torch int4 g128"))
    assert not any("a8" in t["target"] for t in targets if t["shape"] == "4096x4096")  # not measured there
    assert len(targets) == 7 + 2 + 7
    text = kernel_cuda.format_targets(targets)
    assert "| 11008x4096 | 1 | W4S50 triton-a8 vs cuBLAS fp16 | 5.00x | - | - |" in text


@pytest.mark.skipif(not gpu.interpreting(), reason="CPU tensors run the Triton candidates only under the interpreter "
                    "(tests/conftest.py sets it where there is no GPU)")
def test_one_tiny_shape_measured_on_cpu_tensors_under_the_interpreter():
    pytest.importorskip("triton")
    args = kernel.parse_args(["--device", "cuda", "--batch", "1", "--repeats", "1", "--min-calls", "1"])
    args.cold_mib = 0  # one copy per candidate: each interpreted call takes a fraction of a second
    notes: list[str] = []
    rows = cuda_timing.bench_shape((48, 128), args, 1.0, notes, torch.device("cpu"))
    names = {r["candidate"] for r in rows}
    assert {"torch-fp16", "torch-bf16"} | GQSA_NAMES <= names
    assert all(ROW_KEYS <= set(r) and r["timing"] == "wall" and r["median_ms"] > 0 for r in rows)
    assert next(r for r in rows if r["candidate"] == "torch-fp16")["speedup_vs_fp16"] == 1.0
    assert any("torch-2of4-fp16 skipped" in n for n in notes)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_benchmark_writes_the_json_contract(tmp_path, capsys):
    out, md = tmp_path / "k.json", tmp_path / "k.md"
    rc = kernel.main(["--device", "cuda", "--shapes", "tiny", "--batch", "1,4", "--sparsity", "0.5", "--repeats", "1",
                      "--min-calls", "1", "--cold-mib", "1", "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"device", "sm_count", "l2_cache_bytes", "torch", "triton", "git_revision",
            "hbm_read_gb_per_s"} <= set(report["machine"])
    rows = report["measurements"]
    assert all(ROW_KEYS <= set(r) and r["median_ms"] > 0 and r["gb_per_s"] > 0 for r in rows)
    names = {r["candidate"] for r in rows}
    assert {"torch-fp16", "torch-bf16"} | GQSA_NAMES <= names
    assert {(r["shape"], r["batch"]) for r in rows} == {(s, b) for s in ("48x128", "32x64") for b in (1, 4)}
    assert all(r["speedup_vs_fp16"] == 1.0 for r in rows if r["candidate"] == "torch-fp16")
    assert report["settings"]["sparsity"] == 0.5 and report["targets"]
    assert "| shape" in capsys.readouterr().out and "## Targets" in md.read_text()
