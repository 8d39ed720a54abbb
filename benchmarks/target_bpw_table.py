"""The table of docs/RESULTS.md "Formats chosen for a size budget" from checkpoints written by ``gqsa compress``.

For each checkpoint directory: its command (given), bits per weight, the format search's choice, measurements and
cost (report.json), held-out wiki perplexity (measured again here unless report.json has it with the same protocol)
and c4 perplexity, and the compression's wall time. Rows are given as NAME=DIR=COMMAND.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/target_bpw_table.py \\
        --row "w3 per-layer 3.2=/work/runs/tbpw3.2-full=gqsa compress --preset w3s10-g64 --target-bpw 3.2 ..." \\
        --json benchmarks/results/target_bpw_smollm2.json --markdown benchmarks/results/target_bpw_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

PROTOCOL = {"seq_len": 2048, "max_tokens": 16384}


def _ppl(model, tokenizer, dataset: str) -> float:
    from gqsa.eval.heldout import heldout_perplexity

    return heldout_perplexity(model, tokenizer, dataset, seq_len=PROTOCOL["seq_len"],
                              max_tokens=PROTOCOL["max_tokens"])["ppl"]


def measure(name: str, directory: Path, command: str) -> dict:
    from gqsa.models.loading import load_model

    report = json.loads((directory / "report.json").read_text())
    row = {"name": name, "dir": str(directory), "command": command,
           "bits_per_weight": report["summary"]["bits_per_weight"],
           "compress_wall_s": report.get("wall_time_s"), "format_search": report.get("format_search"),
           "config": report["config"]}
    after = report.get("ppl_after") or {}
    model, tokenizer = load_model(str(directory))
    same = (after.get("dataset") == "wiki" and after.get("seq_len") == PROTOCOL["seq_len"]
            and after.get("max_tokens") == PROTOCOL["max_tokens"])
    row["ppl_wiki"] = after["ppl"] if same else _ppl(model, tokenizer, "wiki")
    row["ppl_c4"] = _ppl(model, tokenizer, "c4")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| run | bits per weight | wiki | c4 | formats | search s | compress s |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        fs = r["format_search"]
        mix = "uniform" if fs is None else f"{fs['choice']}: " + ", ".join(f"{n} {k}" for k, n in fs["formats"].items())
        search_s = "" if fs is None else f"{fs['time_s']['total']:.0f}"
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl_wiki']:.1f} | {r['ppl_c4']:.1f} | {mix} | "
                     f"{search_s} | {r['compress_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", required=True, help="NAME=DIR=COMMAND")
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args()
    rows = []
    for spec in args.row:
        name, directory, command = spec.split("=", 2)
        rows.append(measure(name, Path(directory), command))
        print(f"{name}: wiki {rows[-1]['ppl_wiki']:.2f} c4 {rows[-1]['ppl_c4']:.2f}", flush=True)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"git_revision_of_table": revision, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
           "protocol": PROTOCOL, "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    Path(args.markdown).write_text(markdown(rows))


if __name__ == "__main__":
    main()
