"""Sweep: GQSA over a grid of sparsity, bits and group size against the baselines, on one model, into one table
and two kinds of plots.

Every point compresses a fresh copy of the model with one configuration (a preset plus overrides, built the way
benchmarks/accuracy_table.py builds its rows: one-shot unless ``--bqpo-epochs`` / ``--e2e-epochs`` ask for
training), then measures held-out perplexity (gqsa.eval.heldout) on each corpus, optionally the zero-shot mean
accuracy over a task list (gqsa.eval.zeroshot), and takes bits per weight from the compression report. Results
are appended to a JSON file after every point, so an interrupted run resumes where it stopped (points already
measured with the same configuration and evaluation settings are skipped). Kernel speed is read from the JSON
files of ``gqsa bench kernel --json``.

Outputs: the results JSON, PNG plots in docs/figures/ (perplexity against bits per weight with the Pareto front,
one per corpus; kernel time and rows per second against batch size, one per kernel file) and a markdown table
between ``<!-- sweep-table:begin -->`` and ``<!-- sweep-table:end -->`` in docs/RESULTS.md.

    python benchmarks/sweep.py                                 # the default grid (days on 2 cores)
    python benchmarks/sweep.py --sparsity 0,0.5 --bits 4 --group-size 16 --baselines 2of4-sparsegpt
    python benchmarks/sweep.py --render --from-accuracy-table  # no compression: rows the accuracy table measured
"""
# The command line; the sweep's parts are the files beside this one: sweep_grid.py (the points), sweep_measure.py
# (evaluating one), sweep_import.py (points taken from other results files), sweep_kernels.py (kernel benchmark
# files), sweep_plots.py and sweep_render.py (the figures and the markdown block); what every benchmark script
# shares (git revision, results JSON, splicing a block into a document) is in bench/kernel_common.py.

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from sweep_grid import Grid, measurement_key
from sweep_import import import_accuracy_rows, import_dense_zeroshot
from sweep_kernels import load_kernel, run_kernel
from sweep_measure import EvalSettings, is_done, measure_point, measured_points, revision
from sweep_plots import plot_all
from sweep_render import BLOCK, render

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # for `benchmarks.bench`, which this file and its sweep_*.py files import lazily
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "sweep_smollm2.json"
ACCURACY = ROOT / "benchmarks" / "results" / "accuracy_smollm2.json"
DOC = ROOT / "docs" / "RESULTS.md"
FIGURES = ROOT / "docs" / "figures"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    g = Grid()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=_floats, default=g.sparsity, help="fractions of groups pruned, comma-separated")
    p.add_argument("--bits", type=_ints, default=g.bits)
    p.add_argument("--group-size", type=_ints, default=g.group_size)
    p.add_argument("--baselines", type=_names, default=g.baselines, help="preset names, comma-separated ('' none)")
    p.add_argument("--no-dense", action="store_true", help="do not measure the uncompressed reference")
    p.add_argument("--bqpo-epochs", type=int, default=0, help="train after the one-shot step (default: one-shot)")
    p.add_argument("--e2e-epochs", type=int, default=0)
    p.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--calib-dataset", default=g.calib_dataset)
    p.add_argument("--calib-samples", type=int, default=g.calib_samples)
    p.add_argument("--seq-len", type=int, default=g.calib_seq_len, help="calibration window length")
    p.add_argument("--datasets", type=_names, default=("wiki", "c4"), help="held-out corpora (names or text files)")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--zeroshot", type=_names, default=(), help="zero-shot tasks, comma-separated (default none)")
    p.add_argument("--zeroshot-limit", type=int, default=None, help="items per task (default all)")
    p.add_argument("--zeroshot-json", type=Path, action="append", default=[],
                   help="a `gqsa eval zeroshot --json` report of the default model: its results become the dense "
                        "point's zero-shot record when tasks and limit match")
    p.add_argument("--from-accuracy-table", nargs="?", type=Path, const=ACCURACY, default=None,
                   help=f"import the points measured by benchmarks/accuracy_table.py (default file {ACCURACY.name})")
    p.add_argument("--kernel-json", type=Path, action="append", default=None,
                   help="a `gqsa bench kernel --json` file (repeatable; default benchmarks/results/kernel_cpu_*.json)")
    p.add_argument("--kernel-shape", default=None, help="shape to show, e.g. 576x576 (default: the first measured)")
    p.add_argument("--kernel-run", default=None, metavar="SHAPES",
                   help="also run the kernel benchmark on these shapes (its --shapes names, e.g. tiny)")
    p.add_argument("--kernel-batch", default="1,4,16", help="batch sizes of --kernel-run")
    p.add_argument("--kernel-repeats", type=int, default=10, help="repeats of --kernel-run")
    p.add_argument("--kernel-cold-mib", type=int, default=64, help="weight copies per candidate of --kernel-run")
    p.add_argument("--render", action="store_true", help="measure nothing: import, then write table and plots")
    p.add_argument("--redo", action="store_true", help="measure points again even if present")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--figures", type=Path, default=FIGURES)
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the markdown block")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _command(argv: list[str]) -> str:
    return "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep.py " + " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from benchmarks.bench.kernel_common import load_results, save_results, write_doc_blocks

    try:
        grid = Grid(sparsity=args.sparsity, bits=args.bits, group_size=args.group_size, baselines=args.baselines,
                    calib_dataset=args.calib_dataset, calib_samples=args.calib_samples, calib_seq_len=args.seq_len,
                    bqpo_epochs=args.bqpo_epochs, e2e_epochs=args.e2e_epochs, dense=not args.no_dense)
        points = grid.points()
    except ValueError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    settings = EvalSettings(model=args.model, datasets=args.datasets, seq_len=args.eval_seq_len,
                            max_tokens=args.eval_tokens, zeroshot=args.zeroshot, zeroshot_limit=args.zeroshot_limit,
                            progress=not args.no_progress)
    data = load_results(args.results, {"points": {}})
    entries = data["points"]
    if args.from_accuracy_table is not None:
        imported = import_accuracy_rows(load_results(args.from_accuracy_table, {"rows": {}}), points, settings,
                                        label=args.from_accuracy_table.name)
        by_name = {p.name: p for p in points}
        for name, entry in imported.items():  # a point this sweep measured itself is kept
            if not is_done(entries.get(name), by_name[name], settings):
                entries[name] = entry
        print(f"imported {len(imported)} point(s) from {args.from_accuracy_table}", flush=True)
    dense = next((p for p in points if p.config is None), None)
    for path in args.zeroshot_json:
        zs = import_dense_zeroshot(json.loads(path.read_text()), settings)
        if dense is not None and zs is not None and dense.name in entries:
            entries[dense.name]["zeroshot"] = zs
    data["settings"] = {**settings.to_dict(), "kernel_shape": args.kernel_shape, "command": _command(argv)}
    data["git_revision"] = revision()
    save_results(args.results, data)

    measured = 0
    if not args.render:
        import transformers

        transformers.logging.set_verbosity_error()
        for point in points:
            if is_done(entries.get(point.name), point, settings) and not args.redo:
                continue
            try:
                entry = measure_point(point, settings)
            except ValueError as exc:  # a configuration the model does not fit: recorded, not retried
                print(f"point {point.name}: {exc}", file=sys.stderr, flush=True)
                entry = {"name": point.name, "family": point.family, "model": settings.model,
                         "key": measurement_key(point.config.to_dict()), "config": point.config.to_dict(),
                         "not_applicable": str(exc), "source": "sweep"}
            entries[point.name] = entry
            measured += 1
            save_results(args.results, data)
            print(json.dumps({k: v for k, v in entry.items() if k not in ("config", "key", "zeroshot")}), flush=True)
    print(f"measured {measured} point(s)", flush=True)

    kernel_paths = args.kernel_json if args.kernel_json is not None else sorted(
        (ROOT / "benchmarks" / "results").glob("kernel_cpu_*.json"))
    if args.kernel_run:
        kernel_paths = [*kernel_paths, run_kernel(args, args.results.with_name(
            f"{args.results.stem}_kernel_{args.kernel_run}.json"))]
    kernels = [load_kernel(p) for p in kernel_paths]
    current = [entries[p.name] for p in measured_points(data, points, settings)]
    figures = plot_all(current, settings, kernels, args.figures, args.results.stem, args.kernel_shape)
    table = render(data, points, settings, kernels, figures, args.doc)
    if not args.no_doc:
        write_doc_blocks(args.doc, {BLOCK: table})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
