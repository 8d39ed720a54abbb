"""E2E-OQP's loss measured: the next-token loss against distillation from the dense model, from one checkpoint.

    gqsa compress --preset w4s50 --e2e-epochs 0 --out runs/w4s50-bqpo        # one-shot + BQPO, no E2E-OQP
    OMP_NUM_THREADS=2 PYTHONPATH=src python3 benchmarks/e2e_distill.py runs/w4s50-bqpo --distill 0,0.5,1 \
        --json benchmarks/results/e2e_distill_smollm2.json --markdown benchmarks/results/e2e_distill_smollm2.md

Every variant starts from the same checkpoint (read again for each), trains with the checkpoint's own E2E
settings (``compress_config.json``: the preset's) except the epochs and the distillation weight given here, on
the checkpoint's calibration windows (same text, count, length and seed), and is scored by the documented held-out
perplexity protocol (``gqsa.eval.heldout``) on wiki and c4. The dense model's top-k is computed once, before the
variants. Variants run one after the other in one process, the order given.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/e2e_distill.py`: the root, for the package benchmarks
    sys.path.insert(0, str(ROOT))

from benchmarks.bench.kernel_common import git_revision  # noqa: E402
from gqsa.utils.io import atomic_write_text  # noqa: E402


def _markdown(result: dict) -> str:
    lines = [f"E2E-OQP variants from `{result['checkpoint']}` ({result['revision']}, {result['machine']}, "
             f"{result['threads']} threads); dense model {result['dense_ppl']}.", "",
             "| distill weight | epochs run | held-out objective before -> after | wiki ppl | c4 ppl | minutes |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['distill']:g} | {r['epochs_run']} | {r['loss_before']:.4f} -> {r['loss_after']:.4f} | "
                     f"{r['wiki']:.2f} | {r['c4']:.2f} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a gqsa checkpoint written without E2E-OQP (--e2e-epochs 0)")
    p.add_argument("--model", default=None, help="the dense model it was compressed from (default: the default)")
    p.add_argument("--distill", default="0,1", help="distillation weights to compare, comma-separated")
    p.add_argument("--epochs", type=int, default=3, help="E2E-OQP epochs of every variant")
    p.add_argument("--top-k", type=int, default=64, help="tokens of the dense distribution kept per position")
    p.add_argument("--lr", type=float, default=None, help="E2E-OQP learning rate (default: the checkpoint's)")
    p.add_argument("--eval-max-tokens", type=int, default=16384)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)

    from gqsa.algorithms.distill import teacher_top_k
    from gqsa.algorithms.e2e_oqp import e2e_oqp
    from gqsa.config import CompressConfig
    from gqsa.eval.heldout import heldout_perplexity
    from gqsa.models.checkpoints import load_compressed
    from gqsa.models.loading import load_model
    from gqsa.pipeline import calibration_ids

    config_path = Path(args.checkpoint) / "compress_config.json"
    if not config_path.is_file():
        p.error(f"{config_path} not found: the checkpoint must come from gqsa compress")
    config = CompressConfig.from_json(config_path.read_text())
    if config.e2e.epochs:
        p.error(f"{args.checkpoint} was already trained end to end (e2e.epochs {config.e2e.epochs}); "
                "compress it with --e2e-epochs 0")
    dense, tokenizer = load_model(args.model)
    calib = calibration_ids(tokenizer, config, dense)
    start = time.perf_counter()
    teacher = teacher_top_k(dense, calib, args.top_k, progress=True)
    teacher_s = time.perf_counter() - start
    dense_ppl = {ds: heldout_perplexity(dense, tokenizer, ds, max_tokens=args.eval_max_tokens)["ppl"]
                 for ds in ("wiki", "c4")}
    del dense
    rows = []
    for w in [float(v) for v in args.distill.split(",") if v]:
        model, _ = load_compressed(args.checkpoint)
        spec = config.e2e.replace(epochs=args.epochs, distill=w, distill_top_k=args.top_k,
                                  **({} if args.lr is None else {"lr": args.lr}))
        start = time.perf_counter()
        result = e2e_oqp(model, calib, spec, teacher=teacher if w > 0 else None)
        seconds = time.perf_counter() - start
        ppl = {ds: heldout_perplexity(model, tokenizer, ds, max_tokens=args.eval_max_tokens)["ppl"]
               for ds in ("wiki", "c4")}
        rows.append({"distill": w, **{k: result[k] for k in ("loss_before", "loss_after", "epochs_run", "steps",
                                                             "objective")},
                     **ppl, "seconds": seconds, "spec": spec.to_dict()})
        print(json.dumps(rows[-1]), flush=True)
    result = {"checkpoint": str(args.checkpoint), "revision": git_revision(), "machine": platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "teacher_seconds": teacher_s,
              "dense_ppl": {k: round(v, 2) for k, v in dense_ppl.items()}, "command": " ".join(sys.argv),
              "rows": rows}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    text = _markdown(result)
    if args.markdown:
        atomic_write_text(args.markdown, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
