"""The results of ``gqsa bench e2e``: a row per candidate (medians over the repeats, ratios to fp32-hf), the
markdown tables of the rows and of the decode-step profiles, and the outputs (stdout, ``--json``, ``--markdown``)."""

from __future__ import annotations

import argparse
import math
import statistics

from benchmarks.bench.e2e_profile import PROFILE_METHOD
from benchmarks.bench.e2e_workers import Worker
from benchmarks.bench.kernel_common import MIB
from gqsa.utils import jsonio
from gqsa.utils.io import atomic_write_text


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def summarize(worker: Worker, memory: dict, args: argparse.Namespace, bandwidth: float) -> dict:
    runs = worker.runs
    decode = _median([r["decode_tok_s"] for r in runs])
    info = worker.info
    return {
        "candidate": worker.spec.name, "loop": worker.spec.loop,
        "step": "/".join(sorted({r["step"] for r in runs})), "backend": info["backend"],
        "decode_tok_s": decode, "decode_ms": 1e3 / decode,
        "decode_cpu_ms": _median([r["decode_cpu_ms"] for r in runs]),
        "prefill_tok_s": _median([r["prefill_tok_s"] for r in runs]),
        "ttft_ms": 1e3 * _median([r["ttft_s"] for r in runs]),
        "peak_rss_mb": memory["peak_rss_mb"], "rss_mb": memory["rss_mb"], "base_rss_mb": info["base_rss_mb"],
        "model_bytes": info["model_bytes"], "streamed_bytes": info["streamed_bytes"],
        "decode_gb_per_s": info["streamed_bytes"] * decode / 1e9,
        "bandwidth_pct": 100.0 * info["streamed_bytes"] * decode / 1e9 / bandwidth,
        "load_s": info["load_s"], "threads": worker.spec.threads, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": len(runs),
        "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
        "decode_cpu_ms_runs": [r["decode_cpu_ms"] for r in runs],
    }


def add_ratios(rows: list[dict]) -> None:
    """Decode speed-up and memory ratios against fp32-hf (when it ran)."""
    ref = next((r for r in rows if r["candidate"] == "fp32-hf"), None)
    for r in rows:
        r["decode_speedup_vs_fp32"] = r["decode_tok_s"] / ref["decode_tok_s"] if ref else None
        r["peak_rss_vs_fp32"] = r["peak_rss_mb"] / ref["peak_rss_mb"] if ref else None
        r["model_bytes_vs_fp32"] = r["model_bytes"] / ref["model_bytes"] if ref else None


def format_table(rows: list[dict]) -> str:
    """Markdown table of the summary rows."""
    head = ("| candidate | loop | step | decode tok/s | x fp32 | decode ms/token | CPU ms/token | prefill tok/s | "
            "TTFT ms | decode GB/s | % DRAM bw | peak RSS MiB (x fp32) | base RSS MiB | model MiB (x fp32) |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(v):
        return f"{v:.2f}" if v is not None else "-"

    for r in rows:
        lines.append(
            f"| {r['candidate']} | {r['loop']} | {r['step']} | {r['decode_tok_s']:.2f} | "
            f"{ratio(r['decode_speedup_vs_fp32'])} | {r['decode_ms']:.2f} | {r['decode_cpu_ms']:.2f} | "
            f"{r['prefill_tok_s']:.1f} | {r['ttft_ms']:.0f} | {r['decode_gb_per_s']:.2f} | "
            f"{r['bandwidth_pct']:.0f} | {r['peak_rss_mb']:.0f} ({ratio(r['peak_rss_vs_fp32'])}) | "
            f"{r['base_rss_mb']:.0f} | {r['model_bytes'] / MIB:.1f} ({ratio(r['model_bytes_vs_fp32'])}) |")
    return "\n".join(lines)


def format_profiles(profiles: dict[str, dict]) -> str:
    """Markdown table: ms per decode step by component, one column per profiled candidate."""
    names = list(profiles)
    components = list(dict.fromkeys(c for p in profiles.values() for c in p["components_ms"]))
    lines = ["| component | " + " | ".join(f"{n} ({profiles[n].get('step', 'model forward')} step) ms/token"
                                          for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for c in components:
        lines.append(f"| {c} | " + " | ".join(f"{profiles[n]['components_ms'].get(c, 0.0):.2f}" for n in names)
                     + " |")
    lines.append("| step, timed (sum) | " + " | ".join(f"{profiles[n]['step_ms_hooked']:.2f}" for n in names)
                 + " |")
    lines.append("| step, untimed | " + " | ".join(f"{profiles[n]['step_ms']:.2f}" for n in names) + " |")
    return "\n".join(lines)


def write_outputs(args: argparse.Namespace, report: dict, label: str) -> None:
    """Print the settings, the tables and the notes (unless the JSON goes to stdout: ``--json`` without a path);
    write ``report`` to ``--json`` and the same text, with the command line, to ``--markdown``."""
    info, settings, notes, profiles = report["machine"], report["settings"], report["notes"], report["profiles"]
    header = (f"{info['processor']}, {info['threads']} thread(s), torch {info['torch']}, gqsa {info['git_revision']} "
              f"(kernel isa {info['gqsa_isa']}); DRAM read {info['dram_read_gb_per_s']:.1f} GB/s")
    text = (f"{label}: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batch 1, greedy, "
            f"{args.repeats} repeats (medians), candidates interleaved, one process each")
    table = format_table(report["rows"])
    profile_table = format_profiles(profiles) if profiles else ""
    if args.json is not None:
        payload = jsonio.dumps(report, indent=1) + "\n"
        if args.json == "-":
            print(payload, end="")
        else:
            atomic_write_text(args.json, payload)
    if args.json != "-":
        print(header)
        print(text)
        print(table)
        if profile_table:
            print(f"\ndecode step by component ({args.profile} steps; {PROFILE_METHOD}):\n{profile_table}")
        for note in notes:
            print(f"note: {note}")
    if args.markdown:
        body = f"# gqsa end-to-end benchmark\n\n{header}\n\n{text}\n\n`{settings['command']}`\n\n{table}\n"
        if profile_table:
            body += f"\nDecode step by component ({args.profile} steps; {PROFILE_METHOD}):\n\n{profile_table}\n"
        atomic_write_text(args.markdown, body + "".join(f"\n* {n}" for n in notes) + ("\n" if notes else ""))
