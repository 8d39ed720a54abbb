"""What int8 activations (the ``cpu-a8`` kernels) cost in held-out perplexity, for a gqsa checkpoint.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/a8_ppl.py CHECKPOINT [--dataset wiki,c4] \
        [--json benchmarks/results/a8_ppl_smollm2.json]

``cpu-a8`` computes, for every 4-bit layer whose group size is a multiple of 16, exactly the op applied to x
quantized to int8 per 16 inputs (``gqsa.quant.int8_activations``; tests/ops/test_ops_cpu_a8.py holds the kernels
to that oracle). Perplexity windows are longer than the native kernels' batch limit, so this script applies the
oracle instead: a forward pre-hook on those layers replaces x by its int8 round trip, and every layer runs the
exact op. Perplexity is ``gqsa.eval.heldout.heldout_perplexity`` (README, "Perplexity protocol").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def int8_activation_hooks(model) -> int:
    """Round x through int8 per 16 inputs before every layer that ``cpu-a8`` runs with integer dot products;
    returns how many layers got the hook."""
    from gqsa.nn import PackedLinear
    from gqsa.quant.int8_activations import dequantize_activations, quantize_activations

    def hook(module, args):
        x = args[0]  # (..., in_features)
        x2 = x.reshape(-1, x.shape[-1]).float()  # (M, in_features)
        return (dequantize_activations(*quantize_activations(x2)).reshape(x.shape).to(x.dtype), *args[1:])

    count = 0
    for m in model.modules():
        if isinstance(m, PackedLinear) and m.bits == 4 and m.group_size % 16 == 0:
            m.register_forward_pre_hook(hook)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a gqsa checkpoint")
    p.add_argument("--dataset", default="wiki,c4", help="comma-separated packaged corpora")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import gqsa
    from gqsa.eval.heldout import heldout_perplexity

    rows = []
    for dataset in [d for d in args.dataset.split(",") if d]:
        for activations in ("float32", "int8 per 16"):
            model, tokenizer = gqsa.load(args.checkpoint)
            hooked = int8_activation_hooks(model) if activations != "float32" else 0
            start = time.perf_counter()
            ppl = heldout_perplexity(model, tokenizer, dataset, seq_len=args.seq_len, max_tokens=args.max_tokens)
            rows.append({"checkpoint": str(args.checkpoint), "dataset": dataset, "activations": activations,
                         "layers_int8": hooked, "ppl": ppl["ppl"], "tokens": ppl["tokens"],
                         "seconds": time.perf_counter() - start})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        from gqsa.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
