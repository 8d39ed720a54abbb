"""End-to-end generation benchmark: dense fp32/bf16, torch.ao dynamic int8 and gqsa, batch 1, on the CPU.

    gqsa bench e2e [MODEL_OR_DIR] [--checkpoint DIR] [--prompt-len 128] [--new-tokens 128] [--repeats 3] \
        [--candidates fp32-hf,bf16-hf,int8-dynamic-hf,gqsa] [--lm-head-bits 4] [--profile] [--json [PATH]] \
        [--markdown PATH]
    gqsa bench e2e --shapes 7b --layers 2 --prompt-len 64 --new-tokens 32

Candidates:

* ``fp32-hf``, ``bf16-hf``: the dense model through transformers' ``generate`` (its dynamic KV cache).
* ``int8-dynamic-hf``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (LM head included; int8
  per-tensor weights, activations quantized per call), through transformers' ``generate``.
* ``gqsa``: the compressed checkpoint through gqsa's decode loop (``gqsa.engine``) with its default step: the
  fused decode step (``gqsa.engine.fused``: its own static KV cache, q/k/v and gate/up in one packed call each,
  direct kernel calls) where the model is supported, else the model's own forward with a static cache; the
  ``step`` column says which ran. ``gqsa-lm4`` / ``gqsa-lm8`` (``--lm-head-bits``): the same checkpoint with its
  LM head stored packed, W4/W8 g16 at sparsity 0 (``gqsa.models.packing.pack_lm_head``, saved here before the
  workers load it); ``gqsa-lm4-emb4`` / ``gqsa-lm8-emb8``: the same with the input embedding table stored packed
  too, at the same width (``gqsa.models.packing.pack_embedding``: less memory, loading builds no dense table).
* ``gqsa-a8``, ``gqsa-lm8-a8``, ``gqsa-lm4-a8``: ``gqsa``, ``gqsa-lm8`` and ``gqsa-lm4`` with the int8-activation kernel (backend ``cpu-a8``:
  x quantized per 16 inputs, integer dot products, AVX-512 VNNI where the CPU has it; approximate).
* ``llama.cpp``: the dense model's own GGUF file (the default model: its Q4_1 file) through llama-cpp-python, an
  optional dependency (``pip install llama-cpp-python``; the candidate is skipped with a note without it), greedy,
  with the same threads: what a CPU user runs instead.
* ablations: ``fp32-engine`` (the dense model through gqsa's loop: what the loop alone gives), ``gqsa-hfstep`` and
  ``fp32-engine-hfstep`` (gqsa's loop, but every step through the model's own forward and transformers'
  ``StaticCache``: what the fused step gains), ``gqsa-hf`` (the compressed model through transformers'
  ``generate``), ``gqsa-op`` (gqsa's loop, every linear through the registered op instead of the direct kernel
  call: the model's own forward, since the fused step calls kernels directly), ``gqsa-compile`` (gqsa's loop with
  the decode step compiled by ``torch.compile``; compiled during the warm-up, whose KV cache has the same 256-slot
  bucket).

MODEL_OR_DIR is the dense model (a transformers directory, a ``.gguf`` file, nothing for the default model) or a
gqsa checkpoint. The compressed side is ``--checkpoint`` or a checkpoint given as MODEL_OR_DIR (its dense side is
then ``--dense``, default: the default model); without either, the dense model is compressed here, data-free
(magnitude, W4 g16, 50% of groups pruned: decoding speed does not depend on which groups are kept).
``--shapes 7b`` builds a Llama-2-7B-shaped model instead (hidden 4096, MLP 11008, 32 heads, vocabulary 32000,
``--layers`` decoder blocks, random weights) and compresses it the same way.

Method. Every candidate runs in its own worker process (spawned, so it inherits no memory), started one after
the other; each loads its model once and waits. The parent then sends the same prompts to the workers in turn
(round robin within each repeat): one generation runs at a time and every candidate meets the same machine
conditions. Peak memory is each worker's own high-water mark of resident memory (VmHWM), loading included; it
counts the interpreter and torch too, which ``base_rss_mb`` (measured before loading) shows. Prompts are random
token ids (speed does not depend on them); every candidate generates exactly ``--new-tokens`` tokens. A
streamer timestamps every token: time to first token is prompt in to first token out, prefill tok/s is the prompt
length over it, decode tok/s is (new tokens - 1) over the time from the first token to the last. Medians over
the repeats. ``decode_gb_per_s`` is the bytes a decode step must read (every tensor but an input embedding
that is not also the LM head) times decode tok/s; ``bandwidth_pct`` compares it with the DRAM read bandwidth
measured in the same run.

Files: ``e2e`` (this one: the command line and the run), ``e2e_candidates`` (what each worker loads and runs),
``e2e_workers`` (the worker processes and their protocol), ``e2e_models`` (the checkpoints compared),
``e2e_clock`` (token timestamps), ``e2e_memory`` (resident memory, model bytes), ``e2e_profile`` (``--profile``:
the decode step by component, timed from outside the engine) and ``e2e_report`` (rows, tables, outputs).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench.e2e_candidates import CANDIDATES, DEFAULT_CANDIDATES, CandidateSpec
from benchmarks.bench.e2e_clock import TokenClock
from benchmarks.bench.e2e_memory import model_bytes
from benchmarks.bench.e2e_models import SHAPES_7B, resolve_models, vocab_size, with_packed_lm_head
from benchmarks.bench.e2e_report import add_ratios, summarize, write_outputs
from benchmarks.bench.e2e_workers import measure, started

# what other scripts import from here (benchmarks/gpu_e2e.py: the 7B shapes, the token clock, the model's bytes)
__all__ = ["SHAPES_7B", "TokenClock", "main", "model_bytes", "parse_args"]


def _candidate_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    return list(dict.fromkeys(names))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gqsa bench e2e", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None,
                   help="dense model (dir, .gguf; default: SmolLM2-135M) or a gqsa checkpoint")
    p.add_argument("--checkpoint", help="gqsa checkpoint of the dense model (default: compress it here, data-free)")
    p.add_argument("--dense", help="the dense model when MODEL_OR_DIR is a gqsa checkpoint (default model)")
    p.add_argument("--shapes", choices=("model", "7b"), default="model",
                   help="'7b': a Llama-2-7B-shaped model with random weights instead of MODEL_OR_DIR")
    p.add_argument("--layers", type=int, default=2, help="decoder blocks of the --shapes 7b model")
    p.add_argument("--prompt-len", type=_positive, default=128)
    p.add_argument("--new-tokens", type=_positive, default=128)
    p.add_argument("--repeats", type=_positive, default=3)
    p.add_argument("--candidates", type=_candidate_list, default=list(DEFAULT_CANDIDATES),
                   help=f"comma-separated, from {','.join(CANDIDATES)} (default {','.join(DEFAULT_CANDIDATES)})")
    p.add_argument("--lm-head-bits", type=int, choices=(4, 8), action="append", default=[],
                   help="also run gqsa with the LM head packed at this width (repeatable)")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many decode steps of each candidate by component")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (and of the 7b-shaped weights)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="JSON output: to stdout without PATH (no table then), else also written to PATH")
    p.add_argument("--markdown", type=Path, help="write the settings, the table and the notes here")
    p.add_argument("--note", action="append", default=[], help="a line about the conditions (repeatable)")
    args = p.parse_args(argv)
    for bits in args.lm_head_bits:
        if f"gqsa-lm{bits}" not in args.candidates:
            args.candidates.append(f"gqsa-lm{bits}")
    if args.profile < 0:
        p.error(f"--profile must be >= 0, got {args.profile}")
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench.kernel import dram_read_gb_per_s, machine_info

    args = parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    notes: list[str] = list(args.note)
    with tempfile.TemporaryDirectory(prefix="gqsa-e2e-") as scratch:
        dense, checkpoint, label = resolve_models(args, Path(scratch))
        checkpoints = {name: with_packed_lm_head(checkpoint, bits, Path(scratch), embedding)
                       for bits in (4, 8) for embedding in (False, True)
                       if (name := f"gqsa-lm{bits}" + (f"-emb{bits}" if embedding else "")) in args.candidates
                       or f"{name}-a8" in args.candidates}
        checkpoints |= {f"{name}-a8": path for name, path in checkpoints.items()}
        specs = [CandidateSpec(name, dense, checkpoints.get(name, checkpoint), threads) for name in args.candidates]
        with started(specs, notes) as workers:
            bandwidth = dram_read_gb_per_s()
            gen = torch.Generator().manual_seed(args.seed)
            vocab = vocab_size(checkpoint)
            prompts = [torch.randint(3, vocab, (1, args.prompt_len), generator=gen) for _ in range(args.repeats)]
            profiles, memory = measure(workers, prompts, args)
    rows = [summarize(w, memory[w.spec.name], args, bandwidth) for w in workers]
    add_ratios(rows)
    settings = {"model": label, "shapes": args.shapes, "layers": args.layers if args.shapes == "7b" else None,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "candidates": args.candidates, "seed": args.seed,
                "command": shlex.join(["gqsa", "bench", "e2e", *(sys.argv[1:] if argv is None else argv)]),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    report = {"machine": machine_info(bandwidth) | {"threads": threads}, "settings": settings, "notes": notes,
              "rows": rows, "profiles": profiles}
    write_outputs(args, report, label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
