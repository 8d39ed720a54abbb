"""End-to-end greedy decode on one CUDA GPU: dense fp16 against gqsa W4S50 g16 through the Triton backends.

    PYTHONPATH=src python3 benchmarks/gpu_e2e.py --json out/gpu/e2e.json --markdown out/gpu/e2e.md
    PYTHONPATH=src python3 benchmarks/gpu_e2e.py --layers 4 --prompt-len 128 --new-tokens 128 --repeats 3 \
        --backends triton,triton-a8

``gqsa bench e2e`` measures on the CPU only (every candidate in its own process, resident memory); this is its
short GPU counterpart, sized for a rented-GPU session (``benchmarks/gpu_check.sh`` runs it).

Model: a Llama with Llama-2-7B shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000; the shapes of
``gqsa.bench.e2e.SHAPES_7B``), ``--layers`` decoder blocks, random weights, built in float32 on the device. Its
copy is compressed data-free with the library's pipeline (``gqsa.compress.compress_model``, method magnitude: W4,
groups of 16, 50% of groups pruned per row; decoding speed does not depend on which groups are kept), on the
device (on the CPU if that fails, with a note), then both models are cast to ``--dtype`` (the packed layers keep
their format and take only the device move).

Candidates: ``dense-fp16`` (torch's dense kernels) and ``gqsa-<backend>`` for every ``--backends`` entry that
gqsa.ops offers for CUDA here (``triton`` is exact; ``triton-a8``, int8 activations, is approximate and measured
only where registered). Every candidate decodes through gqsa's loop (``gqsa.engine.generate``: its fused decode
step where the model is supported, eager, no CUDA graph), greedy, exactly ``--new-tokens`` tokens after a random
``--prompt-len``-token prompt (the same prompt for all). Only the model under test is on the device while it runs;
one warm-up generation (Triton compilation, the a8 layout's preparation) precedes ``--repeats`` timed ones.

Reported per candidate (medians over the repeats): decode tok/s ((new tokens - 1) over the time from the first new
token to the last), time to first token (prompt in, first token out: the prefill), peak GPU memory
(``torch.cuda.max_memory_allocated`` over the warm-up and the timed runs: weights, KV cache, activations and any
layout a backend prepares), the model's tensor bytes, the speedup of decode tok/s over dense, and for the
approximate backends how many leading tokens agree with the exact ``triton`` run (the weights are random: the
tokens mean nothing, their agreement shows where the int8 activations first change a greedy choice).

Exit status: 0 when every candidate ran, 1 when one failed (its error is in the report; the others are measured),
2 when the device is unusable.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the repository's gqsa, installed or not (gpu_check.sh runs from a copy)
# Sizes of --shapes: "7b" is Llama-2-7B's (gqsa.bench.e2e.SHAPES_7B, read there); "tiny" is a smoke test that
# runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 2,
        "vocab_size": 1000, "max_position_embeddings": 512}
EXACT = "triton"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_e2e.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda; cpu only for smoke tests, with "
                   "TRITON_INTERPRET=1 and --shapes tiny)")
    p.add_argument("--shapes", choices=("7b", "tiny"), default="7b")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks (default 4)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per candidate, after one warm-up")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="activations and dense weights (default float16)")
    p.add_argument("--backends", default="triton,triton-a8",
                   help="gqsa backends to measure, comma-separated; those not offered here are skipped with a note")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--markdown", type=Path, help="write the table and notes here")
    args = p.parse_args(argv)
    for name in ("layers", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.backends = [b for b in args.backends.split(",") if b]
    return args


# ---- the models ------------------------------------------------------------------------------------------


def build_dense(args: argparse.Namespace, device):
    """The random-weight Llama of ``--shapes`` / ``--layers``, float32, built directly on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqsa.bench.e2e import SHAPES_7B

    shapes = SHAPES_7B if args.shapes == "7b" else TINY
    config = LlamaConfig(num_hidden_layers=args.layers, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **shapes)
    torch.manual_seed(args.seed)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def compressed_copy(dense, device):
    """A copy of ``dense`` on ``device`` with every decoder linear layer packed W4S50 g16 by magnitude."""
    import gqsa
    from gqsa.compress import compress_model

    config = gqsa.CompressConfig(method="magnitude", quant=gqsa.QuantSpec(bits=4, group_size=16),
                                 sparsity=gqsa.SparsitySpec(ratio=0.5))
    model = copy.deepcopy(dense).to(device)
    compress_model(model, config, progress=False)
    return model


def set_backend(model, backend: str) -> int:
    """Point every packed layer of ``model`` at ``backend``; returns how many there are."""
    from gqsa.nn.packed_linear import GQSALinear

    layers = [m for m in model.modules() if isinstance(m, GQSALinear)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


# ---- measuring -------------------------------------------------------------------------------------------


def measure(name: str, model, backend: str | None, prompt, args: argparse.Namespace, device) -> dict:
    """One warm-up and ``--repeats`` timed greedy generations of ``model`` (already on ``device``)."""
    import torch

    from gqsa.bench.e2e import model_bytes
    from gqsa.engine import GenerationSpec, generate

    if backend is not None:
        set_backend(model, backend)
    spec = GenerationSpec(max_new_tokens=args.new_tokens, stop_at_eos=False)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    warm = generate(model, prompt, spec)
    warmup_s = time.perf_counter() - start
    runs = [generate(model, prompt, spec) for _ in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return {
        "candidate": name, "backend": backend or "dense", "step": warm.step,
        "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
        "decode_tok_s_runs": [r.decode_tok_s for r in runs],
        "ttft_ms": statistics.median(r.first_token_s for r in runs) * 1e3,
        "ttft_ms_runs": [r.first_token_s * 1e3 for r in runs],
        "prefill_tok_s": statistics.median(r.prefill_tok_s for r in runs),
        "peak_gpu_mib": peak, "model_mib": model_bytes(model)[0] / 2**20, "warmup_s": warmup_s,
        "tokens": runs[-1].tokens.tolist(),
    }


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens of ``a`` and ``b`` are equal."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- report ----------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device) -> dict:
    import torch

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        rev = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "transformers": _version("transformers"), "git_revision": rev, "python": platform.python_version()}


def format_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# gqsa end to end on the GPU (benchmarks/gpu_e2e.py)", "",
        f"{m['device']}, torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, transformers "
        f"{m['transformers']}, gqsa {m['git_revision']}", "",
        f"Llama with {s['shapes']} shapes, {s['layers']} decoder blocks, random weights, {s['dtype']}; gqsa: W4S50 g16 "
        f"by magnitude (compressed on {report['compress_device']} in {report['compress_s']:.1f} s); greedy, prompt "
        f"{s['prompt_len']} tokens, {s['new_tokens']} new tokens, median of {s['repeats']} after one warm-up", "",
        "| candidate | step | decode tok/s | vs dense | time to first token ms | peak GPU MiB | model MiB | "
        "leading tokens equal to triton |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['candidate']} | failed: {r['error']} | | | | | | |")
            continue
        vs = "n/a" if r.get("speedup_vs_dense") is None else f"{r['speedup_vs_dense']:.2f}x"
        peak = "n/a" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        same = r.get("leading_tokens_equal_to_triton")
        same = "-" if same is None else f"{same} of {len(r['tokens'])}"
        lines.append(f"| {r['candidate']} | {r['step']} | {r['decode_tok_s']:.1f} | {vs} | {r['ttft_ms']:.1f} | "
                     f"{peak} | {r['model_mib']:.0f} | {same} |")
    lines += [""] + [f"* {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, args: argparse.Namespace) -> None:
    from gqsa.utils import jsonio
    from gqsa.utils.io import atomic_write_text

    text = format_markdown(report)
    print(text)
    if args.json:
        atomic_write_text(args.json, jsonio.dumps(report, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, text)


# ---- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from gqsa.ops import available_backends

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_e2e: error: --device {args.device} but torch {torch.__version__} sees no CUDA device",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    notes: list[str] = []
    offered = available_backends(device.type, approximate=True, named_only=True)
    backends = [b for b in args.backends if b in offered]
    notes += [f"backend {b} skipped: not offered by gqsa.ops for {device.type} here" for b in args.backends
              if b not in offered]

    dense = build_dense(args, device)
    start = time.perf_counter()
    compress_device = str(device)
    try:
        packed = compressed_copy(dense, device)
    except Exception as exc:  # noqa: BLE001 - the CPU path is the tested one: compress there instead
        notes.append(f"compression on {device} failed ({type(exc).__name__}: {exc}); compressed on the CPU")
        compress_device = "cpu"
        packed = compressed_copy(dense, "cpu")
    compress_s = time.perf_counter() - start
    dense.to(dtype=dtype).to("cpu")
    packed.to(dtype=dtype).to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    prompt = torch.randint(0, dense.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))

    results = []
    for model, runs in ((dense, [("dense-" + args.dtype.replace("float", "fp"), None)]),
                        (packed, [(f"gqsa-{b}", b) for b in backends])):
        if not runs:
            continue
        model.to(device)
        for name, backend in runs:
            try:
                results.append(measure(name, model, backend, prompt, args, device))
            except Exception as exc:  # noqa: BLE001 - report it and measure the others
                traceback.print_exc()
                results.append({"candidate": name, "backend": backend, "error": f"{type(exc).__name__}: {exc}"})
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ok = {r["candidate"]: r for r in results if "error" not in r}
    dense_row = next((r for r in ok.values() if r["backend"] == "dense"), None)
    exact = ok.get(f"gqsa-{EXACT}")
    for r in ok.values():
        r["speedup_vs_dense"] = None if dense_row is None else r["decode_tok_s"] / dense_row["decode_tok_s"]
        if r["backend"] not in ("dense", EXACT) and exact is not None:
            r["leading_tokens_equal_to_triton"] = leading_agreement(r["tokens"], exact["tokens"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"machine": machine_info(device), "settings": settings, "compress_device": compress_device,
              "compress_s": compress_s, "results": results, "notes": notes}
    write_report(report, args)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
