"""What a packed LM head (and input embedding) costs in held-out perplexity: the dense model and a gqsa checkpoint.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_head_ppl.py --checkpoint /work/runs/engine-w4s50 \
        --json benchmarks/results/lm_head_ppl_smollm2.json --markdown benchmarks/results/lm_head_ppl_smollm2.md

The head is packed with ``gqsa.models.packing.pack_lm_head`` (group 16, every group kept, min-max round to
nearest per group; a tied head is untied, the input embeddings stay dense); with ``--embedding`` every width is
also measured with the input embedding packed the same way (``pack_embedding``). Perplexity is
``gqsa.eval.heldout.heldout_perplexity`` on the held-out wiki split (protocol: README, "Perplexity protocol").
"""

from __future__ import annotations

import argparse
import sys
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", default=None, help="dense model (default: the default model)")
    p.add_argument("--checkpoint", help="a gqsa checkpoint of the same model")
    p.add_argument("--bits", default="8,4", help="LM head widths to measure, comma-separated")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--embedding", action="store_true", help="also pack the input embedding at each width")
    p.add_argument("--dataset", default="wiki")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)

    import gqsa
    from gqsa.eval.heldout import heldout_perplexity
    from gqsa.models.checkpoints import model_summary
    from gqsa.models.packing import pack_embedding, pack_lm_head
    from gqsa.models.loading import load_model

    sources = [("dense", lambda: load_model(args.dense))]
    if args.checkpoint:
        sources.append((Path(args.checkpoint).name, lambda: gqsa.load(args.checkpoint)))
    rows = []
    for label, load in sources:
        widths = [int(b) for b in args.bits.split(",") if b]
        variants = [(None, False)] + [(b, False) for b in widths] + [(b, True) for b in widths if args.embedding]
        for bits, embedding in variants:
            model, tokenizer = load()
            if bits:
                pack_lm_head(model, bits=bits, group_size=args.group_size)
            if embedding:
                pack_embedding(model, bits=bits, group_size=args.group_size)
            start = time.perf_counter()
            ppl = heldout_perplexity(model, tokenizer, args.dataset, seq_len=args.seq_len, max_tokens=args.max_tokens)
            width = f"W{bits} g{args.group_size}" if bits else "dense fp32"
            rows.append({"model": label, "lm_head": width, "embedding": width if embedding else "dense fp32",
                         "ppl": ppl["ppl"], "tokens": ppl["tokens"], "model_bytes": model_summary(model)["model_bytes"],
                         "seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["lm_head"] == "dense fp32"
                    and b["embedding"] == "dense fp32")
        r["ppl_vs_dense_head"] = r["ppl"] / base["ppl"]
    lines = ["| model | LM head | input embedding | held-out ppl | x dense | model MiB |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['lm_head']} | {r['embedding']} | {r['ppl']:.3f} | {r['ppl_vs_dense_head']:.4f} | "
              f"{r['model_bytes'] / 2**20:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    from gqsa.utils.io import atomic_write_text

    settings = {"dataset": args.dataset, "seq_len": args.seq_len, "max_tokens": args.max_tokens}
    if args.json:
        atomic_write_text(args.json, json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        command = "python " + " ".join(sys.argv if argv is None else ["benchmarks/lm_head_ppl.py", *argv])
        atomic_write_text(
            args.markdown,
            f"# Packed LM head and input embedding: held-out perplexity\n\n{args.dataset}, windows of {args.seq_len}, first "
            f"{args.max_tokens} held-out tokens (`{command}`)\n\n"
            f"{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
