"""The sweep's markdown block (benchmarks/sweep.py): the command, what was measured how, the points table, the
kernel tables by batch size and the figures; spliced into its document between the markers of BLOCK."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from sweep_grid import Point, describe
from sweep_kernels import kernel_ms_for, kernel_series, kernel_shape
from sweep_measure import EvalSettings, is_done, measured_points

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (dequantized from Q4_1, fp32)"
BLOCK = "sweep-table"  # between <!-- sweep-table:begin --> and <!-- sweep-table:end --> (kernel_common.block_markers)


def corpus_label(source: str) -> str:
    """A corpus name as it is, a text file by its file name."""
    return Path(source).name if ("/" in source or "." in source) else source


def finite(x) -> bool:
    """Whether ``x`` is a finite number (a measured value to show)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt_ppl(x) -> str:
    if not finite(x):
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def model_name(model: str | None) -> str:
    return DEFAULT_MODEL_NAME if model is None else str(model)


def _header(data: dict, points: Sequence[Point], measured: Sequence[Point], kernels: Sequence[dict]) -> str:
    """What the table measured: model, text, context length, tokens or items, machines and git revisions."""
    s, entries = data["settings"], data["points"]
    calib = next((p.config.calib for p in points if p.config is not None), None)
    out = [f"Model: {model_name(s['model'])}."]
    if calib is not None:
        out.append(f"Calibration: {calib.samples} windows x {calib.seq_len} tokens of the "
                   f"{corpus_label(calib.dataset)} calibration split.")
    tokens = {ds: sorted({entries[p.name].get(f"tokens_{ds}") for p in measured} - {None}) for ds in s["datasets"]}
    out.append(f"Evaluation: held-out {', '.join(map(corpus_label, s['datasets']))}, first {s['eval_max_tokens']} "
               f"tokens in windows of (context length) {s['eval_seq_len']}; predicted tokens scored: "
               + ", ".join(f"{corpus_label(ds)} {'/'.join(map(str, tokens[ds])) or '-'}" for ds in s["datasets"])
               + ".")
    if s["zeroshot"]:
        items = f"first {s['zeroshot_limit']} items of each" if s["zeroshot_limit"] else "all items"
        out.append(f"Zero-shot: mean accuracy over {', '.join(s['zeroshot'])}, {items} (gqsa.eval.zeroshot).")
        dense = next((entries[p.name]["zeroshot"] for p in measured if p.config is None
                      and (entries[p.name].get("zeroshot") or {}).get("source")), None)
        if dense:
            out.append(f"Dense zero-shot from `{dense['source']}`.")
    sources: dict[tuple[str, str, str], int] = {}
    for p in measured:
        e = entries[p.name]
        origin = (e["source"].split(":")[0], e.get("machine", "?"), e.get("git_revision", "?"))
        sources[origin] = sources.get(origin, 0) + 1
    out.append("Measured: " + "; ".join(
        f"{n} point(s) by this sweep on {mach}, gqsa {rev}" if origin == "sweep" else
        f"{n} point(s) imported from `{origin}` ({mach}; the file last written at gqsa {rev})"
        for (origin, mach, rev), n in sources.items()) + ".")
    if kernels:
        k = kernels[0]
        out.append(f"Kernel column: `{Path(k['path']).name}`, {kernel_shape(k, s.get('kernel_shape'))}, batch 1: "
                   "torch fp32 for dense, for the format the file measured the packed layer's call "
                   "(`gqsa-cpu-kernel-only`: the kernel bound to the layer, as `GQSALinear` calls it).")
    return " ".join(out)


def _points_table(data: dict, measured: Sequence[Point], kernels: Sequence[dict]) -> list[str]:
    s, entries = data["settings"], data["points"]
    datasets = s["datasets"]
    kernel = kernels[0] if kernels else None
    shape = kernel_shape(kernel, s.get("kernel_shape")) if kernel else None
    lines = ["| family | point | configuration | bits/weight | sparsity | "
             + " | ".join(f"{corpus_label(d)} ppl" for d in datasets) + " | zero-shot avg | "
             + (f"kernel ms ({shape}, batch 1) | " if kernel else "") + "source |",
             "|---|---|---|---:|---:|" + "---:|" * (len(datasets) + 1) + ("---:|" if kernel else "") + "---|"]
    for p in measured:
        e = entries[p.name]
        bpw, sp, zs = e.get("bits_per_weight"), e.get("sparsity"), e.get("zeroshot")
        cells = [p.family, p.name, describe(e.get("config")),
                 "32 (fp32)" if e.get("config") is None else "-" if bpw is None else f"{bpw:.2f}",
                 "-" if sp is None else f"{sp:.1%}", *(_fmt_ppl(e.get(f"ppl_{d}")) for d in datasets),
                 "-" if not zs else f"{zs['avg']:.3f}"]
        if kernel:
            ms = kernel_ms_for(e, kernel, shape)
            cells.append("-" if ms is None else f"{ms:.3f}")
        lines.append("| " + " | ".join(cells + [e["source"]]) + " |")
    return lines


def _kernel_table(kernel: dict, shape: str) -> list[str]:
    """Median ms per call of every candidate by batch size (speedup against torch fp32), with its machine."""
    m, ks = kernel.get("machine", {}), kernel.get("settings", {})
    series = kernel_series(kernel, shape)
    batches = sorted({b for values in series.values() for b, _ in values})
    fp32 = dict(series.get("torch-fp32", []))
    lines = [f"Kernel `{Path(kernel['path']).name}`, shape {shape} (out x in): {m.get('processor', '?')}, "
             f"{m.get('cpus', '?')} thread(s), torch {m.get('torch', '?')}, gqsa {m.get('git_revision', '?')} "
             f"(isa {m.get('gqsa_isa', '?')}), DRAM read {m.get('dram_read_gb_per_s', math.nan):.1f} GB/s; gqsa "
             f"weights W{ks.get('bits')} g{ks.get('group_size')}, {ks.get('sparsity', 0):.0%} of groups pruned; "
             "median ms per call (speedup vs torch fp32)." + "".join(f" Note: {n}" for n in ks.get("note", [])),
             "", "| candidate | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    for candidate, values in series.items():
        by_batch = dict(values)
        cells = ["-" if b not in by_batch else f"{by_batch[b]:.3f}" + (f" ({fp32[b] / by_batch[b]:.2f}x)" if b in fp32
                                                                       else "") for b in batches]
        lines.append(f"| {candidate} | " + " | ".join(cells) + " |")
    return lines


def render(data: dict, points: Sequence[Point], settings: EvalSettings, kernels: Sequence[dict],
           figures: Sequence[tuple[str, Path]], doc: Path) -> str:
    """The markdown block: the command, what was measured how, the points table, the kernel tables by batch size
    and the figures (linked relative to ``doc``)."""
    s, entries = data["settings"], data["points"]
    measured = measured_points(data, points, settings)
    na = {p.name: entries[p.name]["not_applicable"] for p in points
          if is_done(entries.get(p.name), p, settings) and entries[p.name].get("not_applicable")}
    missing = [p.name for p in points if p not in measured and p.name not in na]
    lines = [f"Made by: `{s['command']}` (gqsa {data.get('git_revision', '?')}).", "",
             _header(data, points, measured, kernels), "", *_points_table(data, measured, kernels), "",
             f"{len(measured)} of {len(points)} grid points measured."]
    if missing:
        lines[-1] += (f" Not measured yet ({len(missing)}; the command without `--render` measures them): "
                      + ", ".join(missing) + ".")
    if na:
        lines[-1] += " Not applicable to this model: " + "; ".join(f"{n} ({why})" for n, why in na.items()) + "."
    for k in kernels:
        lines += ["", *_kernel_table(k, kernel_shape(k, s.get("kernel_shape")))]
    if figures:
        lines += [""] + [f"![{alt}]({os.path.relpath(path, doc.parent)})" for alt, path in figures]
    return "\n".join(lines)
