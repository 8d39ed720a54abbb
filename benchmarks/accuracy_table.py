"""Accuracy table: GQSA against every baseline, one-shot and trained, on one model, one calibration set, one
evaluation.

Each row compresses a fresh copy of the model with one configuration (a preset plus overrides), then measures
held-out perplexity on wiki and c4 with the documented protocol (gqsa.eval.heldout). Results are appended to a
JSON file after every row, so an interrupted run resumes where it stopped (rows already measured with the same
settings are skipped); ``--render`` rewrites the table in docs/RESULTS.md from that file.

    python benchmarks/accuracy_table.py                      # every row (hours on 2 cores)
    python benchmarks/accuracy_table.py --rows dense,w4s50-g16
    python benchmarks/accuracy_table.py --extra llmc-gptq-w4g128=/path/to/hf_dir   # a peer library's output
    python benchmarks/accuracy_table.py --render             # only regenerate the markdown table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/accuracy_table.py`: the root, for the package benchmarks
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.kernel_common import (  # noqa: E402
    git_revision,
    load_results,
    machine_summary,
    save_results,
    write_doc_blocks,
)

RESULTS = ROOT / "benchmarks" / "results" / "accuracy_smollm2.json"
DOC = ROOT / "docs" / "RESULTS.md"
BLOCK, ABLATION_BLOCK = "accuracy-table", "ablation-table"  # the generated blocks of DOC (kernel_common.block_markers)

# row name -> (preset, overrides of the preset as {spec: {field: value}}, table section)
ROWS: dict[str, tuple[str | None, dict, str]] = {
    "dense": (None, {}, "reference"),
    **{f"w4s{r}-g{g}": ("w4s50", {"sparsity": {"ratio": r / 100}, "quant": {"group_size": g}}, "GQSA one-shot")
       for g, r in ((16, 30), (16, 40), (16, 50), (16, 60), (32, 50))},
    # Group 128 does not divide SmolLM2's hidden size (576 = 9 x 64): its dense baselines use groups 32 and 64.
    **{f"gptq-w{b}g{g}": (f"w{b}g64", {"quant": {"group_size": g}}, "GPTQ (dense, group quantization)")
       for b in (2, 3, 4) for g in (32, 64)},
    **{f"rtn-w{b}g{g}": ("rtn-w2g64", {"quant": {"bits": b, "group_size": g}}, "round to nearest (dense)")
       for b in (2, 3, 4) for g in (32, 64)},
    **{p: (p, {}, "float pruning (fp16 sparse storage)") for p in (
        "2of4-sparsegpt", "2of4-wanda", "2of4-magnitude", "s50-sparsegpt", "s50-wanda", "s50-magnitude")},
    "magnitude-w4s50": ("magnitude-w4s50", {}, "GQSA format, data-free"),
    # saliency and allocation at W4S50 g16 (the w4s50-g16 row is obs saliency with row allocation)
    "w4s50-g16-matrix": ("w4s50", {"sparsity": {"allocation": "matrix"}}, "W4S50 g16: saliency / allocation"),
    "w4s50-g16-model": ("w4s50", {"sparsity": {"allocation": "model"}}, "W4S50 g16: saliency / allocation"),
    "w4s50-g16-obs_diag": ("w4s50", {"oneshot": {"saliency": "obs_diag"}}, "W4S50 g16: saliency / allocation"),
    "w4s50-g16-wanda": ("w4s50", {"oneshot": {"saliency": "wanda"}}, "W4S50 g16: saliency / allocation"),
    "w4s50-g16-magnitude": ("w4s50", {"oneshot": {"saliency": "magnitude"}}, "W4S50 g16: saliency / allocation"),
    "w4s50-g16-adaptive": ("w4s50", {"oneshot": {"saliency": "obs_adaptive"}}, "W4S50 g16: saliency / allocation"),
    "w4s50-g16-adaptive-matrix": ("w4s50", {"oneshot": {"saliency": "obs_adaptive"},
                                            "sparsity": {"allocation": "matrix"}}, "W4S50 g16: saliency / allocation"),
    # the W2 presets take qparams from the original weights (static); re-fitted on the updated weights for comparison
    **{f"gptq-w2g{g}-dynamic": ("w2g64", {"quant": {"group_size": g}, "oneshot": {"static_qparams": False}},
                                 "GPTQ (dense, group quantization)") for g in (32, 64)},
    "w4s50-g16-static": ("w4s50", {"oneshot": {"static_qparams": True}}, "W4S50 g16: saliency / allocation"),
    # why W4S50 loses to 2:4 one-shot: pruning alone (8-bit codes, ~lossless) and quantization alone (no pruning)
    "w8s50-g16": ("w4s50", {"quant": {"bits": 8}}, "W4S50 g16 decomposed"),
    "w4s0-g16": ("w4s50", {"sparsity": {"ratio": 0.0}}, "W4S50 g16 decomposed"),
    "w8s50-g8": ("w4s50", {"quant": {"bits": 8, "group_size": 8}}, "W4S50 g16 decomposed"),
    # trained (issue 4): BQPO block by block, then E2E-OQP; the baselines get the same block-wise budget
    **{f"w4s{r}-g16+bqpo": ("w4s50", {"sparsity": {"ratio": r / 100}, "bqpo": {"epochs": 2}}, "trained")
       for r in (30, 40, 50, 60)},
    **{f"w4s{r}-g16+bqpo+e2e": ("w4s50", {"sparsity": {"ratio": r / 100}, "bqpo": {"epochs": 2},
                                          "e2e": {"epochs": 1}}, "trained") for r in (30, 40, 50, 60)},
    "gptq-w2g64+bqpo": ("w2g64", {"bqpo": {"epochs": 2}}, "trained"),
    "gptq-w2g64+bqpo+e2e": ("w2g64", {"bqpo": {"epochs": 2}, "e2e": {"epochs": 1}}, "trained"),
    "2of4-sparsegpt+bqpo": ("2of4-sparsegpt", {"bqpo": {"epochs": 2}}, "trained"),
    # E2E-OQP's held-out loss was still falling after its one epoch: the same pipeline with three
    "w4s50-g16+bqpo+e2e3": ("w4s50", {"bqpo": {"epochs": 2}, "e2e": {"epochs": 3}}, "trained"),
}


def resolve(row: str, calib_samples: int, seq_len: int):
    """The CompressConfig of a row (None for the dense reference)."""
    from gqsa.presets import preset

    name, overrides, _ = ROWS[row]
    if name is None:
        return None
    cfg = preset(name)
    # one-shot unless the row trains (the GQSA presets train by default)
    cfg = cfg.replace(bqpo=cfg.bqpo.replace(epochs=0), e2e=cfg.e2e.replace(epochs=0))
    changes = {spec: getattr(cfg, spec).replace(**fields) for spec, fields in overrides.items()}
    changes["calib"] = cfg.calib.replace(samples=calib_samples, seq_len=seq_len)
    return cfg.replace(**changes)


def settings(args) -> dict:
    return {"calib_samples": args.calib_samples, "calib_seq_len": args.seq_len, "eval_seq_len": args.eval_seq_len,
            "eval_max_tokens": args.eval_tokens, "datasets": args.datasets}


def _stages(row: str) -> list[str]:
    """The rows one run measures: a "+bqpo+e2e" row also gives its "+bqpo" row (evaluated before E2E-OQP)."""
    stages = [row]
    if row.endswith("+e2e") and row[: -len("+e2e")] in ROWS:
        stages.insert(0, row[: -len("+e2e")])
    return stages


def _evaluate(model, tokenizer, args, entry: dict) -> dict:
    from gqsa.eval.heldout import heldout_perplexity

    for ds in args.datasets:
        r = heldout_perplexity(model, tokenizer, ds, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
        entry[f"ppl_{ds}"] = r["ppl"]
        entry[f"tokens_{ds}"] = r["tokens"]
    return entry


def measure(row: str, args, source: str | None = None) -> dict[str, dict]:
    """Compress (unless dense or a given directory) and evaluate one row.

    A row with E2E-OQP is measured in two stages on one model: compression and BQPO, evaluated as its "+bqpo"
    row, then E2E-OQP, evaluated as the row itself (its time counts both stages). Returns {row: entry}.
    """
    from gqsa.compress import calibration_ids, compress_model
    from gqsa.config import E2ESpec
    from gqsa.models.adapter import compressible_linears
    from gqsa.models.loading import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(source)
    entry = {"row": row, "section": ROWS[row][2] if row in ROWS else "peer library (same model, see its calibration)",
             "threads": torch.get_num_threads()}
    cfg = resolve(row, args.calib_samples, args.seq_len) if row in ROWS else None
    if source is not None:
        entry["source"] = str(source)
        weights = [m.weight for m in compressible_linears(model).values()]
        entry["sparsity"] = float(sum((w == 0).sum() for w in weights) / sum(w.numel() for w in weights))
    if cfg is None:
        return {row: _evaluate(model, tokenizer, args, entry) | {"total_time_s": time.perf_counter() - t0}}
    stages = _stages(row)
    first = cfg.replace(e2e=E2ESpec()) if len(stages) == 2 else cfg
    if len(stages) == 2 and resolve(stages[0], args.calib_samples, args.seq_len) != first:
        raise ValueError(f"row {stages[0]!r} is not row {row!r} without E2E-OQP")
    calib = calibration_ids(tokenizer, cfg) if cfg.method != "magnitude" else None
    cpu0 = time.process_time()  # CPU seconds: with one thread, the wall time of a quiet machine
    report = compress_model(model, first, calib_ids=calib, progress=True)
    s = report["summary"]
    entry.update(config=first.to_dict(), bits_per_weight=s["bits_per_weight"], sparsity=s["sparsity"],
                 compress_time_s=report["wall_time_s"], compress_cpu_s=time.process_time() - cpu0,
                 peak_rss_mb=report["peak_rss_mb"])
    for key in ("groups_pruned_per_layer", "bqpo_blocks", "e2e"):
        if key in report:
            entry[key] = report[key]
    out = {}
    if len(stages) == 2:
        out[stages[0]] = _evaluate(model, tokenizer, args, {**entry, "row": stages[0]})
        out[stages[0]]["total_time_s"] = time.perf_counter() - t0
        from gqsa.algorithms.e2e_oqp import e2e_oqp

        t1, cpu1 = time.perf_counter(), time.process_time()
        e2e = e2e_oqp(model, calib, cfg.e2e)
        entry.update(config=cfg.to_dict(), e2e=e2e,
                     compress_time_s=entry["compress_time_s"] + time.perf_counter() - t1,
                     compress_cpu_s=entry["compress_cpu_s"] + time.process_time() - cpu1)
    out[row] = _evaluate(model, tokenizer, args, entry)
    out[row]["total_time_s"] = time.perf_counter() - t0
    return out


def _fmt_ppl(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def render(data: dict) -> str:
    """The markdown table of every measured row, grouped by section, in ROWS order."""
    rows = data["rows"]
    s = data.get("settings", {})
    datasets = s.get("datasets", ["wiki", "c4"])
    order = list(ROWS) + sorted(r for r in rows if r not in ROWS)
    lines = [
        f"Model: SmolLM2-135M-Instruct (dequantized from Q4_1, fp32). Calibration: {s.get('calib_samples')} "
        f"windows x {s.get('calib_seq_len')} tokens of the wiki calibration split. Evaluation: held-out "
        f"{', '.join(datasets)}, first {s.get('eval_max_tokens')} tokens in windows of {s.get('eval_seq_len')}. "
        f"Machine: {data.get('machine', '?')}; gqsa {data.get('git_revision', '?')}.",
        "",
        "| section | row | bits/weight | sparsity | " + " | ".join(f"{d} ppl" for d in datasets)
        + " | compress wall (s) | compress CPU (s) |",
        "|---|---|---:|---:|" + "---:|" * len(datasets) + "---:|---:|",
    ]
    for row in order:
        if row not in rows:
            continue
        e = rows[row]
        bpw = e.get("bits_per_weight")
        bpw_s = "32 (fp32)" if row == "dense" else ("-" if bpw is None else f"{bpw:.2f}")
        sp = e.get("sparsity")
        t, cpu = e.get("compress_time_s"), e.get("compress_cpu_s")
        lines.append(
            f"| {e['section']} | {row} | {bpw_s} | {'-' if sp is None else f'{sp:.1%}'} | "
            + " | ".join(_fmt_ppl(e.get(f"ppl_{d}")) for d in datasets)
            + f" | {'-' if t is None else f'{t:.0f}'} | {'-' if cpu is None else f'{cpu:.0f}'} |"
        )
    return "\n".join(lines)


# The ablation of issue 4: each setting one-shot, after BQPO, after BQPO + E2E-OQP (None: not applicable).
ABLATION: dict[str, tuple[str, str, str | None]] = {
    **{f"GQSA W4S{r} g16": (f"w4s{r}-g16", f"w4s{r}-g16+bqpo", f"w4s{r}-g16+bqpo+e2e") for r in (30, 40, 50, 60)},
    "GPTQ W2 g64": ("gptq-w2g64", "gptq-w2g64+bqpo", "gptq-w2g64+bqpo+e2e"),
    "SparseGPT 2:4 (fp16)": ("2of4-sparsegpt", "2of4-sparsegpt+bqpo", None),
}


def render_ablation(data: dict) -> str:
    """One line per setting: bits per weight, then wiki / c4 perplexity and CPU time one-shot, +BQPO, +E2E-OQP."""
    rows = data["rows"]
    datasets = data.get("settings", {}).get("datasets", ["wiki", "c4"])

    def cell(row: str | None) -> str:
        if row is None:
            return "n/a"
        e = rows.get(row)
        if e is None:
            return "not measured"
        cpu, wall = e.get("compress_cpu_s"), e.get("compress_time_s")
        ppl = " / ".join(_fmt_ppl(e.get(f"ppl_{d}")) for d in datasets)
        if cpu is not None:
            return ppl + f" ({cpu / 60:.0f} min)"
        return ppl + ("" if wall is None else f" ({wall / 60:.0f} min wall, shared machine)")

    lines = [
        f"Perplexity {' / '.join(datasets)} (compression CPU time, one thread); same calibration and evaluation "
        "as the table above.",
        "",
        "| setting | bits/weight | one-shot | + BQPO | + BQPO + E2E-OQP |",
        "|---|---:|---|---|---|",
    ]
    for name, stages in ABLATION.items():
        bpw = next((rows[r]["bits_per_weight"] for r in stages if r in rows and "bits_per_weight" in rows[r]), None)
        lines.append(f"| {name} | {'-' if bpw is None else f'{bpw:.2f}'} | "
                     + " | ".join(cell(r) for r in stages) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all): {', '.join(ROWS)}")
    p.add_argument("--extra", action="append", default=[], help="NAME=DIR: also evaluate an HF model directory")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--datasets", default="wiki,c4")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--redo", action="store_true", help="measure rows again even if present")
    p.add_argument("--render", action="store_true", help="only rewrite the table in docs/RESULTS.md")
    p.add_argument("--merge", type=Path, action="append", default=[],
                   help="add the rows of another results file measured with the same settings (parallel runs)")
    args = p.parse_args(argv)
    args.datasets = args.datasets.split(",")
    data = load_results(args.results, {"rows": {}})
    for other_path in args.merge:
        other = load_results(other_path, {"rows": {}})
        if data.get("settings") not in (None, other.get("settings")):
            print(f"{other_path} was measured with other settings; not merged", file=sys.stderr)
            return 2
        data.setdefault("settings", other.get("settings"))
        data["rows"].update(other["rows"])
        save_results(args.results, data)
    if not args.render:
        import transformers

        import gqsa

        transformers.logging.set_verbosity_error()
        if data.get("settings") not in (None, settings(args)):
            if data["rows"] and not args.redo:
                print(f"{args.results} holds rows measured with other settings {data['settings']}; pass --redo "
                      "or another --results file", file=sys.stderr)
                return 2
        data["settings"] = settings(args)
        data["machine"] = machine_summary()
        data["gqsa_version"] = gqsa.__version__
        todo = [(r, None) for r in args.rows.split(",") if r]
        todo += [tuple(x.split("=", 1)) for x in args.extra]
        for row, source in todo:
            if row not in ROWS and source is None:
                print(f"unknown row {row!r}", file=sys.stderr)
                return 2
            if row in data["rows"] and not args.redo:
                continue
            if f"{row}+e2e" in args.rows.split(","):
                continue  # measured on the way to its +e2e row
            try:
                entries = measure(row, args, source)
            except ValueError as exc:  # a configuration the model does not fit: say so and go on
                print(f"row {row}: {exc}", file=sys.stderr, flush=True)
                continue
            data["rows"].update(entries)
            data["git_revision"] = git_revision(cwd=ROOT)
            save_results(args.results, data)
            for entry in entries.values():
                print(json.dumps({k: v for k, v in entry.items()
                                  if k not in ("config", "groups_pruned_per_layer", "bqpo_blocks")}), flush=True)
    if not args.no_doc:
        write_doc_blocks(DOC, {BLOCK: render(data), ABLATION_BLOCK: render_ablation(data)})
    print(render(data))
    print()
    print(render_ablation(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
