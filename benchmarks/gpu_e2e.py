"""End-to-end greedy decode on one CUDA GPU: dense fp16, transformers' generate, torch's int4 and gqsa W4S50 g16.

    PYTHONPATH=src python3 benchmarks/gpu_e2e.py --json out/gpu/e2e.json --markdown out/gpu/e2e.md
    PYTHONPATH=src python3 benchmarks/gpu_e2e.py --layers 4 --prompt-len 128 --new-tokens 128 --repeats 3 \
        --backends triton,triton-a8 --candidates dense,hf-generate,torch-int4,gqsa

``gqsa bench e2e`` measures on the CPU only (every candidate in its own process, resident memory); this is its
short GPU counterpart, sized for a rented-GPU session (``benchmarks/gpu_check.sh`` runs it).

Model: a Llama with Llama-2-7B shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 32000; the shapes of
``benchmarks.bench.e2e.SHAPES_7B``), ``--layers`` decoder blocks, random weights, built in float32 on the device. Its
copy is compressed data-free with the library's pipeline (``gqsa.compress.compress_model``, method magnitude: W4,
groups of 16, 50% of groups pruned per row; decoding speed does not depend on which groups are kept), on the
device (on the CPU if that fails, with a note), then both models are cast to ``--dtype`` (the packed layers keep
their format and take only the device move).

Candidates (``--candidates`` picks them by kind or by name, default all; every one not measured is listed in the
report with the reason, in its results and its notes):

* ``dense-fp16`` (kind ``dense``): the dense model, torch's dense kernels, through gqsa's loop.
* ``hf-generate-fp16`` (kind ``hf-generate``): the same dense model through transformers' own
  ``model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)``: eager, the attention
  implementation transformers picked for the model, its default (dynamic) KV cache.
* ``torch-int4-g128`` (kind ``torch-int4``): the dense model with every ``nn.Linear`` of the decoder blocks (not
  the LM head) replaced by torch's int4 weight-only kernel (``torch.ops.aten._weight_int4pack_mm``, tinygemm;
  asymmetric min-max int4 in groups of 128, packed by ``benchmarks.bench.kernel_cuda_candidates.pack_int4``, the
  kernel benchmark's packing), bf16 activations into and out of each call, the rest of the model in ``--dtype``;
  through gqsa's loop. The kernel exists for CUDA only: skipped with a note on other devices, and where packing
  or a trial call raises (a torch build without it).
* ``gqsa-<backend>`` (kind ``gqsa``) for every ``--backends`` entry that gqsa.ops offers for CUDA here
  (``triton`` is exact; ``triton-a8``, int8 activations, is approximate and measured only where registered).

gqsa's loop is ``gqsa.engine.generate``: its fused decode step where the model is supported (every linear layer
called through its kernel, ``F.linear`` or the module itself), on CUDA replayed from a CUDA graph (step "fused,
cuda graph"). Where a generation through the graph fails (a capture error), the candidate is measured again with
``cuda_graph=False``, with a note. Every candidate decodes greedily, exactly ``--new-tokens`` tokens after a
random ``--prompt-len``-token prompt (the same prompt for all). Only the model under test is on the device while
it runs; one warm-up generation (Triton compilation, CUDA graph capture, the a8 layout's preparation) precedes
``--repeats`` timed ones.

Timing, the same for both loops: each hands the prompt to a streamer, then every new token as it is chosen (read
to the host, so the times include the device's work). Time to first token is from the prompt's hand-over to the
first new token (the prefill and the first choice; gqsa's loop has allocated its KV cache before it, transformers'
prepares its logits processors and cache after it), decode tok/s is (new tokens - 1) over the time from the first
new token to the last. gqsa's loop reports both itself (``GenerationResult.first_token_s`` and ``decode_s``, taken
at those moments); transformers' generate is timed by a streamer that timestamps the same moments.

Reported per candidate (medians over the repeats): decode tok/s, time to first token, prefill tok/s, peak GPU memory
(``torch.cuda.max_memory_allocated`` over the warm-up and the timed runs, less what was allocated before the
candidate's model came onto the device, which earlier candidates' CUDA graphs and caches keep: weights, KV cache,
activations, graph pools and any layout a backend prepares), the model's tensor bytes, the ratios of decode tok/s,
time to first token and peak memory to dense's, and how many leading tokens agree with a reference run:
``hf-generate`` with ``dense`` (the same weights through another loop), the approximate gqsa backends with the
exact ``triton`` run (the weights are random: the tokens mean nothing, their agreement shows where a loop's
rounding or the int8 activations first change a greedy choice).

Exit status: 0 when every selected candidate ran or was skipped with a note, 1 when one failed (its error is in
the report; the others are measured), 2 when the device is unusable.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import importlib.metadata
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the repository's gqsa, installed or not (gpu_check.sh runs from a copy)
sys.path.insert(0, str(ROOT))  # the package benchmarks (benchmarks.bench: the kernel and e2e benchmarks' parts)
# Sizes of --shapes: "7b" is Llama-2-7B's (benchmarks.bench.e2e.SHAPES_7B, read there); "tiny" is a smoke test that
# runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 2,
        "vocab_size": 1000, "max_position_embeddings": 512}
EXACT = "triton"
KINDS = ("dense", "hf-generate", "torch-int4", "gqsa")  # in the order of the report
INT4_GROUP_SIZE = 128  # benchmarks.bench.kernel_cuda_candidates.INT4_GROUP_SIZE, the kernel benchmark's int4 candidate
INT4 = f"torch-int4-g{INT4_GROUP_SIZE}"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One row of the report: ``kind`` (one of KINDS), its ``name``, and for kind gqsa the ``backend``."""

    kind: str
    name: str
    backend: str | None = None


def all_candidates(dtype: str, backends: list[str]) -> list[Candidate]:
    """Every candidate that ``--dtype`` and ``--backends`` name, in the order of the report."""
    tag = dtype.replace("float", "fp")
    return [Candidate("dense", f"dense-{tag}"), Candidate("hf-generate", f"hf-generate-{tag}"),
            Candidate("torch-int4", INT4), *(Candidate("gqsa", f"gqsa-{b}", b) for b in backends)]


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
    p.add_argument("--candidates", default=",".join(KINDS),
                   help=f"candidates to measure, comma-separated, by kind ({', '.join(KINDS)}; gqsa: every "
                   f"--backends entry) or by name (dense-fp16, hf-generate-fp16, {INT4}, gqsa-triton, ...); the "
                   "others are listed as not selected (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--markdown", type=Path, help="write the table and notes here")
    args = p.parse_args(argv)
    for name in ("layers", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.backends = [b for b in args.backends.split(",") if b]
    args.candidates = [c for c in args.candidates.split(",") if c]
    known = {c.name for c in all_candidates(args.dtype, args.backends)} | set(KINDS)
    unknown = [c for c in args.candidates if c not in known]
    if unknown:
        p.error(f"--candidates: unknown {', '.join(unknown)} (kinds: {', '.join(KINDS)}; names: "
                f"{', '.join(c.name for c in all_candidates(args.dtype, args.backends))})")
    return args


# ---- the models ------------------------------------------------------------------------------------------


def build_dense(args: argparse.Namespace, device):
    """The random-weight Llama of ``--shapes`` / ``--layers``, float32, built directly on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.bench.e2e import SHAPES_7B

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


@functools.cache
def int4_linear_type():
    """The class of the int4 layers (made on first use: this script imports torch lazily)."""
    import torch
    from torch import nn

    class Int4Linear(nn.Module):
        """``nn.Linear``'s result through torch's int4 CUDA kernel: ``_weight_int4pack_mm`` on the weight packed by
        ``benchmarks.bench.kernel_cuda_candidates.pack_int4`` (groups of ``group_size``). The input is cast to bf16
        (the kernel's only activation type) and the output back to the input's dtype. Nothing in ``forward`` reads
        a value on the host, so a CUDA graph can capture it."""

        def __init__(self, linear: nn.Linear, group_size: int, device) -> None:
            from benchmarks.bench.kernel_cuda_candidates import pack_int4

            super().__init__()
            self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
            packed, szs = pack_int4(linear.weight.detach().to(device), group_size)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", szs)  # (K / group_size, N, 2) bf16
            bias = None if linear.bias is None else linear.bias.detach().to(device)
            self.register_buffer("bias", bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
            y = y.to(x.dtype)  # (M, N)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

    return Int4Linear


def int4_copy(dense, device, group_size: int = INT4_GROUP_SIZE):
    """A copy of ``dense`` (on the CPU) on ``device`` with every decoder-block ``nn.Linear`` (all but the LM head)
    an int4 layer of groups of ``group_size``.

    Raises:
        whatever packing or one trial call raises (a torch build without the kernel, a device or shape it refuses;
        ``_weight_int4pack_mm`` is a CUDA kernel).
    """
    import torch
    from torch import nn

    cls = int4_linear_type()
    model = copy.deepcopy(dense)
    head = model.get_output_embeddings()
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        layer = cls(linear, group_size, device)
        setattr(model.get_submodule(parent), attr, layer)
    model.to(device)
    probe = torch.zeros(1, targets[0][1].in_features, dtype=head.weight.dtype, device=device)
    model.get_submodule(targets[0][0])(probe)  # one call: the kernel exists for this build, device and layout
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return model


def set_backend(model, backend: str) -> int:
    """Point every packed layer of ``model`` at ``backend``; returns how many there are."""
    from gqsa.nn.packed_linear import GQSALinear

    layers = [m for m in model.modules() if isinstance(m, GQSALinear)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


# ---- measuring -------------------------------------------------------------------------------------------


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: " + (text if len(text) <= limit else text[:limit] + "...")


def _hf_clock():
    """A TokenClock (``benchmarks.bench.e2e``) whose time starts when the prompt is handed over, as gqsa's loop's."""
    from benchmarks.bench.e2e import TokenClock

    class PromptClock(TokenClock):
        prompt_put = False

        def put(self, value) -> None:
            if not self.prompt_put:  # the prompt: the clock starts
                self.prompt_put = True
                self.start = time.perf_counter()
            super().put(value)

    return PromptClock()


def hf_generate_once(model, prompt, new_tokens: int) -> dict:
    """Exactly ``new_tokens`` greedy tokens after ``prompt`` (1, T) by transformers' ``model.generate``."""
    import torch

    clock = _hf_clock()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=model.config.pad_token_id, streamer=clock)
    timing = clock.result(prompt.shape[1])
    return {"tokens": out[0, prompt.shape[1]:].cpu(), "first_token_s": timing["ttft_s"],
            "decode_tok_s": timing["decode_tok_s"], "prefill_tok_s": timing["prefill_tok_s"]}


def gqsa_generate_once(model, prompt, spec) -> dict:
    from gqsa.engine import generate

    r = generate(model, prompt, spec)
    return {"tokens": r.tokens, "first_token_s": r.first_token_s, "decode_tok_s": r.decode_tok_s,
            "prefill_tok_s": r.prefill_tok_s, "step": r.step}


def measure(c: Candidate, model, prompt, args: argparse.Namespace, device, base_bytes: int,
            notes: list[str]) -> dict:
    """One warm-up and ``--repeats`` timed greedy generations of ``model`` (already on ``device``) by ``c``'s
    loop; ``base_bytes``: what was allocated on the device before the model came onto it."""
    import torch

    from benchmarks.bench.e2e import model_bytes
    from gqsa.engine import GenerationSpec

    if c.backend is not None:
        set_backend(model, c.backend)
    cuda = device.type == "cuda"
    prompt = prompt.to(device)
    fallback, step = None, None
    if c.kind == "hf-generate":
        def once():
            return hf_generate_once(model, prompt, args.new_tokens)

        step = f"transformers generate ({getattr(model.config, '_attn_implementation', None) or 'default'})"
    else:
        spec = GenerationSpec(max_new_tokens=args.new_tokens, stop_at_eos=False)

        def once():
            return gqsa_generate_once(model, prompt, spec)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        warm = once()
    except Exception as exc:  # noqa: BLE001 - on CUDA: try again without the CUDA graph
        if not cuda or c.kind == "hf-generate":
            raise
        traceback.print_exc()
        fallback = _first_line(exc)
        spec = dataclasses.replace(spec, cuda_graph=False)
        try:
            torch.cuda.synchronize(device)
            warm = once()
        except Exception as again:  # noqa: BLE001 - report both
            raise RuntimeError(f"{fallback}; with cuda_graph=False: {_first_line(again)}") from again
        notes.append(f"{c.name}: generation through the CUDA graph failed ({fallback}); measured with "
                     "cuda_graph=False")
    warmup_s = time.perf_counter() - start
    runs = [once() for _ in range(args.repeats)]
    peak = (torch.cuda.max_memory_allocated(device) - base_bytes) / 2**20 if cuda else None
    row = {
        "candidate": c.name, "kind": c.kind, "backend": c.backend or ("torch int4 (_weight_int4pack_mm)"
                                                                       if c.kind == "torch-int4" else "dense"),
        "loop": "transformers generate" if c.kind == "hf-generate" else "gqsa.engine.generate",
        "step": warm.get("step", step),
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
        "ttft_ms": statistics.median(r["first_token_s"] for r in runs) * 1e3,
        "ttft_ms_runs": [r["first_token_s"] * 1e3 for r in runs],
        "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
        "peak_gpu_mib": peak, "model_mib": model_bytes(model)[0] / 2**20, "warmup_s": warmup_s,
        "tokens": runs[-1]["tokens"].tolist(),
    }
    if fallback is not None:
        row["cuda_graph_failure"] = fallback
    return row


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens of ``a`` and ``b`` are equal."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def add_comparisons(results: list[dict], candidates: list[Candidate]) -> None:
    """Ratios to dense (decode tok/s, time to first token, peak GPU memory) and leading-token agreement with each
    row's reference (hf-generate: dense; approximate gqsa backends: gqsa-triton), in place."""
    ok = {r["candidate"]: r for r in results if "decode_tok_s" in r}
    names = {c.kind: c.name for c in candidates}
    dense = ok.get(names["dense"])
    exact = ok.get(f"gqsa-{EXACT}")

    def ratio(r: dict, key: str) -> float | None:
        if dense is None or r[key] is None or not dense[key]:
            return None
        return r[key] / dense[key]

    for r in ok.values():
        r["speedup_vs_dense"] = ratio(r, "decode_tok_s")
        r["ttft_vs_dense"] = ratio(r, "ttft_ms")
        r["peak_gpu_vs_dense"] = ratio(r, "peak_gpu_mib")
        if r["kind"] == "hf-generate" and dense is not None:
            r["leading_tokens_equal_to_dense"] = leading_agreement(r["tokens"], dense["tokens"])
            r["reference"] = dense["candidate"]
        if r["kind"] == "gqsa" and r["backend"] != EXACT and exact is not None:
            r["leading_tokens_equal_to_triton"] = leading_agreement(r["tokens"], exact["tokens"])
            r["reference"] = exact["candidate"]


# ---- report ----------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device) -> dict:
    import torch

    from benchmarks.bench.kernel_common import git_revision

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "transformers": _version("transformers"), "git_revision": git_revision(),
            "python": platform.python_version()}


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    compressed = ("gqsa: not compressed (no gqsa candidate)" if report["compress_device"] is None else
                  f"gqsa: W4S50 g16 by magnitude (compressed on {report['compress_device']} in "
                  f"{report['compress_s']:.1f} s)")
    lines = [
        "# gqsa end to end on the GPU (benchmarks/gpu_e2e.py)", "",
        f"{m['device']}, torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, transformers "
        f"{m['transformers']}, gqsa {m['git_revision']}", "",
        f"Llama with {s['shapes']} shapes, {s['layers']} decoder blocks, random weights, {s['dtype']}; {compressed}; "
        f"greedy, prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens, median of {s['repeats']} after one "
        "warm-up; ratios are to the dense row (decode: higher is faster; first token and memory: lower is less)", "",
        "| candidate | step | decode tok/s | vs dense | time to first token ms | vs dense | peak GPU MiB | vs dense | "
        "model MiB | leading tokens equal to reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['candidate']} | failed: {r['error']} | | | | | | | | |")
            continue
        if "skipped" in r:
            lines.append(f"| {r['candidate']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        peak = "n/a" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        same = r.get("leading_tokens_equal_to_triton", r.get("leading_tokens_equal_to_dense"))
        same = "-" if same is None else f"{same} of {len(r['tokens'])} ({r['reference']})"
        lines.append(f"| {r['candidate']} | {r['step']} | {r['decode_tok_s']:.1f} | {_x(r.get('speedup_vs_dense'))} "
                     f"| {r['ttft_ms']:.1f} | {_x(r.get('ttft_vs_dense'))} | {peak} | "
                     f"{_x(r.get('peak_gpu_vs_dense'))} | {r['model_mib']:.0f} | {same} |")
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


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


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
    candidates = all_candidates(args.dtype, args.backends)
    skipped: dict[str, str] = {}  # candidate name -> why it is not measured
    offered = available_backends(device.type, approximate=True, named_only=True)
    for c in candidates:
        if c.kind not in args.candidates and c.name not in args.candidates:
            skipped[c.name] = "not selected (--candidates)"
        elif c.kind == "torch-int4" and device.type != "cuda":
            skipped[c.name] = f"torch's int4 kernel (_weight_int4pack_mm) is a CUDA kernel; the device is {device}"
        elif c.kind == "gqsa" and c.backend not in offered:
            skipped[c.name] = f"backend {c.backend} not offered by gqsa.ops for {device.type} here"
    todo = [c for c in candidates if c.name not in skipped]
    errors: dict[str, str] = {}
    measured: dict[str, dict] = {}

    def run(c: Candidate, model, base: int) -> None:
        try:
            measured[c.name] = measure(c, model, prompt, args, device, base, notes)
        except Exception as exc:  # noqa: BLE001 - report it and measure the others
            traceback.print_exc()
            errors[c.name] = _first_line(exc)

    dense = build_dense(args, device)
    compress_device, compress_s, packed = None, None, None
    if any(c.kind == "gqsa" for c in todo):
        start = time.perf_counter()
        compress_device = str(device)
        try:
            packed = compressed_copy(dense, device)
        except Exception as exc:  # noqa: BLE001 - the CPU path is the tested one: compress there instead
            notes.append(f"compression on {device} failed ({type(exc).__name__}: {exc}); compressed on the CPU")
            compress_device = "cpu"
            packed = compressed_copy(dense, "cpu")
        compress_s = time.perf_counter() - start
        packed.to(dtype=dtype).to("cpu")
    dense.to(dtype=dtype).to("cpu")
    _free(device)
    prompt = torch.randint(0, dense.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed))

    # dense: transformers' generate first, so that it does not count the dense row's CUDA graph (kept with the
    # model's fused decoder) in its peak memory
    dense_runs = sorted((c for c in todo if c.kind in ("dense", "hf-generate")), key=lambda c: c.kind != "hf-generate")
    if dense_runs:
        base = _allocated(device)
        dense.to(device)
        for c in dense_runs:
            run(c, dense, base)
        dense.to("cpu")
        _free(device)
    for c in (c for c in todo if c.kind == "torch-int4"):
        base, model = _allocated(device), None
        try:
            model = int4_copy(dense, device)
        except Exception as exc:  # noqa: BLE001 - no such kernel here: a skip, as in the kernel benchmark
            traceback.print_exc()
            skipped[c.name] = f"torch's int4 kernel unavailable: {_first_line(exc)}"
        if model is not None:
            run(c, model, base)
            model.to("cpu")  # off the device at once, whenever the collector frees the model and its graphs
        del model
        _free(device)
    gqsa_runs = [c for c in todo if c.kind == "gqsa"]
    if gqsa_runs:
        base = _allocated(device)
        packed.to(device)
        for c in gqsa_runs:
            run(c, packed, base)
        packed.to("cpu")
        _free(device)

    results = []
    for c in candidates:
        if c.name in skipped:
            results.append({"candidate": c.name, "kind": c.kind, "backend": c.backend, "skipped": skipped[c.name]})
            notes.append(f"{c.name} skipped: {skipped[c.name]}")
        elif c.name in errors:
            results.append({"candidate": c.name, "kind": c.kind, "backend": c.backend, "error": errors[c.name]})
            notes.append(f"{c.name} failed: {errors[c.name]}")
        else:
            results.append(measured[c.name])
    add_comparisons(results, candidates)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"machine": machine_info(device), "settings": settings, "compress_device": compress_device,
              "compress_s": compress_s, "results": results, "notes": notes}
    write_report(report, args)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
