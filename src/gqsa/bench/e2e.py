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
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gqsa.utils import jsonio

logger = logging.getLogger(__name__)

CANDIDATES = ("fp32-hf", "bf16-hf", "int8-dynamic-hf", "fp32-engine", "fp32-engine-hfstep", "gqsa-hf", "gqsa-op",
              "gqsa-hfstep", "gqsa", "gqsa-compile", "gqsa-lm4", "gqsa-lm8", "gqsa-lm4-emb4", "gqsa-lm8-emb8")
DEFAULT_CANDIDATES = ("fp32-hf", "bf16-hf", "int8-dynamic-hf", "gqsa")
# Llama-2-7B's shapes (hidden, MLP, heads, vocabulary), with few decoder blocks and random weights.
SHAPES_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096}
MIB = 1 << 20
PROFILE_METHOD = ("model forward step: forward hooks on its modules; fused step: its linear and LM head calls timed, "
                  "the rest by difference")


# ---- memory and sizes ------------------------------------------------------------------------------------


def _status_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (peak where the current value cannot be read)."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, in MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _is_dynamic_int8(module: nn.Module) -> bool:
    """A torch.ao dynamic quantized linear (not its inner ``LinearPackedParams``, which holds the same weight)."""
    return isinstance(getattr(module, "_packed_params", None), nn.Module) and hasattr(module, "_weight_bias")


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every tensor of the model, bytes a decode step reads), shared tensors counted once.

    The second leaves out the input embedding table unless it is also the LM head (tied): a decode step reads
    one row of it. torch.ao's dynamic int8 linears count their int8 weight and float bias.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = (embedding is not None and head is not None and getattr(head, "weight", None) is not None
            and head.weight is getattr(embedding, "weight", None))
    embedding_bytes = 0
    for module in model.modules():
        if _is_dynamic_int8(module):  # its weight and bias live in a packed object, unshared
            total += sum(t.numel() * t.element_size() for t in module._weight_bias() if t is not None)
        for t in [*module._parameters.values(), *module._buffers.values()]:
            key = None if t is None else (t.untyped_storage().data_ptr(), t.storage_offset())
            if key is None or key in seen:
                continue
            seen.add(key)
            nbytes = t.numel() * t.element_size()
            total += nbytes
            if module is embedding and not tied:
                embedding_bytes += nbytes
    return total, total - embedding_bytes


# ---- timing ----------------------------------------------------------------------------------------------


class TokenClock:
    """A streamer (``put`` / ``end``) that timestamps every new token; the first ``put`` is the prompt."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # time.process_time() at the same moments
        self._prompt_seen = False

    def put(self, value) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        count = max(1, int(getattr(value, "numel", lambda: 1)()))
        self.times.extend([now] * count)
        self.cpu_times.extend([cpu] * count)

    def end(self) -> None:
        pass

    def result(self, prompt_len: int) -> dict:
        if not self.times:
            raise RuntimeError("no token was generated")
        ttft = self.times[0] - self.start
        decode = self.times[-1] - self.times[0]
        steps = len(self.times) - 1
        cpu = self.cpu_times[-1] - self.cpu_times[0]
        return {"new_tokens": len(self.times), "ttft_s": ttft, "prefill_tok_s": prompt_len / ttft,
                "decode_s": decode, "decode_tok_s": steps / decode if steps and decode > 0 else float("nan"),
                "decode_cpu_ms": 1e3 * cpu / steps if steps else float("nan")}


# ---- candidates (built and run inside the workers) -------------------------------------------------------


@dataclass(frozen=True)
class CandidateSpec:
    """What a worker loads: ``name`` (one of CANDIDATES), the dense model and the compressed checkpoint."""

    name: str
    dense: str | None
    checkpoint: str | None
    threads: int

    @property
    def loop(self) -> str:
        return "transformers" if self.name.endswith("-hf") else "gqsa"

    @property
    def fused(self) -> bool | None:
        """``GenerationSpec.fused`` of gqsa's loop: the model's own forward for the ``-hfstep`` and ``-op``
        ablations, else the fused step where the model is supported."""
        return False if self.name.endswith(("-hfstep", "-op")) else None


def load_candidate(spec: CandidateSpec) -> tuple[nn.Module, str]:
    """The candidate's model, ready to generate, and the backend its linear layers use."""
    import gqsa
    from gqsa.engine import use_fastest_backend
    from gqsa.models.loading import load_model

    name = spec.name
    if name.startswith("gqsa"):
        model, _ = gqsa.load(spec.checkpoint)
        backend = use_fastest_backend(model)
        if name == "gqsa-op":
            from gqsa.nn import GQSALinear

            for m in model.modules():
                if isinstance(m, GQSALinear):
                    m.fast_path = False
            backend += " (op)"
        return model.eval(), backend
    dtype = torch.bfloat16 if name == "bf16-hf" else torch.float32
    if spec.dense is not None and Path(spec.dense).is_dir():  # no tokenizer needed (the 7b-shaped model has none)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec.dense, dtype=dtype, local_files_only=True)
    else:
        model, _ = load_model(spec.dense, dtype=dtype)
    if name == "int8-dynamic-hf":
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
            model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return model.eval(), "torch.ao dynamic int8 (fbgemm)"
    return model.eval(), f"torch dense {str(dtype).removeprefix('torch.')}"


def run_once(model: nn.Module, spec: CandidateSpec, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Generate exactly ``new_tokens`` tokens after ``prompt`` (1, T); the TokenClock's measurements."""
    from gqsa.engine import GenerationSpec, generate

    clock = TokenClock()
    if spec.loop == "transformers":
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                           pad_token_id=0, streamer=clock)
        step = "transformers generate"
    else:
        spec_ = GenerationSpec(max_new_tokens=new_tokens, stop_at_eos=False, compile=spec.name == "gqsa-compile",
                               fused=spec.fused)
        step = {"fused": "fused", "fused, cuda graph": "fused, cuda graph", "model": "model forward"}[
            generate(model, prompt, spec_, streamer=clock).step]
    return clock.result(prompt.shape[1]) | {"step": step}


def component_of(model: nn.Module, module: nn.Module) -> str | None:
    """Which part of a decode step a module's own time (without its hooked children) is counted in."""
    from gqsa.nn import GQSALinear

    if module is model.get_output_embeddings():
        return "lm head"
    if isinstance(module, (nn.Linear, GQSALinear)) or _is_dynamic_int8(module):
        return "linear layers"
    if isinstance(module, nn.Embedding):
        return "embedding"
    cls = type(module).__name__
    for key, component in (("Norm", "norms"), ("Attention", "attention (rotary, KV cache, SDPA)"),
                           ("MLP", "MLP activation"), ("Rotary", "rotary tables"),
                           ("DecoderLayer", "residual adds (decoder layer glue)")):
        if key in cls:
            return component
    if module is model.get_decoder():
        return "mask and model glue"
    if module is model:
        return "LM wrapper"
    return None


def decode_profile(model: nn.Module, prompt: torch.Tensor, steps: int, fused: bool | None = False) -> dict:
    """Milliseconds per decode step by component, through gqsa's decode loop, eager.

    ``fused`` as ``GenerationSpec.fused``: where the fused step runs, see :func:`fused_decode_profile`; the rest of
    this docstring is about the model's own forward (forward hooks).

    Every hooked module's own time (its total minus its hooked children's) goes to its component;
    "loop, sampling and the rest" is the step time minus all hooked time. Hooks cost time themselves, so
    ``step_ms_hooked`` is reported beside ``step_ms`` (the same steps without hooks).

    Args:
        prompt: (1, T) prompt ids, prefilled first (not profiled).
        steps: decode steps measured.
    """
    from gqsa.engine.generate import GenerationSpec, decode_one_token, fused_decoder_for, new_cache, prefill
    from gqsa.engine.sampling import sample

    if fused_decoder_for(model, GenerationSpec(fused=fused), prompt.shape[1] + steps + 1) is not None:
        return fused_decode_profile(model, prompt, steps)
    recording = [False]  # hooks fire during prefill too; only decode steps are counted

    def run() -> float:
        recording[0] = False
        cache = new_cache(model, prompt.shape[1] + steps + 1)
        token = sample(prefill(model, prompt, cache)).view(1, 1)
        recording[0] = True
        elapsed = 0.0
        for i in range(steps):
            position = torch.tensor([[prompt.shape[1] + i]])
            start = time.perf_counter()
            token = sample(decode_one_token(model, token, position, cache)).view(1, 1)
            int(token)
            elapsed += time.perf_counter() - start
        return elapsed

    totals: dict[str, float] = defaultdict(float)
    stack: list[list[float]] = []

    def pre(module, args):
        stack.append([time.perf_counter(), 0.0])

    def post(module, args, output, component):
        start, children = stack.pop()
        took = time.perf_counter() - start
        if recording[0]:
            totals[component] += took - children
        if stack:
            stack[-1][1] += took

    with torch.inference_mode():
        run()  # warm-up
        plain = run()
        handles = []
        for module in model.modules():
            component = component_of(model, module)
            if component is not None:
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(lambda m, a, o, c=component: post(m, a, o, c)))
        try:
            hooked = run()
        finally:
            for h in handles:
                h.remove()
    per_step = {k: 1e3 * v / steps for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    per_step["loop, sampling and the rest"] = 1e3 * hooked / steps - sum(per_step.values())
    return {"steps": steps, "step": "model forward", "step_ms": 1e3 * plain / steps,
            "step_ms_hooked": 1e3 * hooked / steps, "components_ms": per_step}


def fused_decode_profile(model: nn.Module, prompt: torch.Tensor, steps: int) -> dict:
    """Milliseconds per step of the fused decode step (``gqsa.engine.fused``) by component.

    The linear layers and the LM head are timed around their calls; everything else (norms, rotary, KV cache
    writes, attention, residual adds, the MLP activation: a few torch calls each, plus sampling and the loop)
    is the step time minus those. ``step_ms_hooked`` is the timed run, ``step_ms`` the same steps untimed.

    Args:
        prompt: (1, T) prompt ids, prefilled first (not profiled).
        steps: decode steps measured.
    """
    from gqsa.engine.fused import fused_decoder
    from gqsa.engine.sampling import sample

    decoder = fused_decoder(model)
    totals: dict[str, float] = defaultdict(float)
    recording = [False]  # the prefill calls the same layers

    def wrap(component, fn):
        def timed(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = fn(x)
            if recording[0]:
                totals[component] += time.perf_counter() - start
            return y
        return timed

    def run(step) -> float:
        recording[0] = False
        cache = decoder.new_cache(prompt.shape[1] + steps + 1)
        token = sample(decoder.prefill(prompt, cache)).view(1, 1)
        recording[0] = True
        elapsed = 0.0
        for i in range(steps):
            start = time.perf_counter()
            token = sample(step(token, prompt.shape[1] + i, cache)).view(1, 1)
            int(token)
            elapsed += time.perf_counter() - start
        return elapsed

    with torch.inference_mode():
        run(decoder.decode_one_token)  # warm-up
        plain = run(decoder.decode_one_token)
        timed = run(decoder.instrumented_decode_one_token(wrap))
    per_step = {k: 1e3 * v / steps for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    per_step["norms, rotary, KV cache, attention, residuals, sampling (torch ops) and the loop"] = \
        1e3 * timed / steps - sum(per_step.values())
    return {"steps": steps, "step": "fused", "step_ms": 1e3 * plain / steps, "step_ms_hooked": 1e3 * timed / steps,
            "components_ms": per_step}


def _worker(conn, spec: CandidateSpec) -> None:
    """Worker process: load one candidate, then serve ("run", prompt, n) / ("profile", prompt, n) / ("stop",)."""
    try:
        torch.set_num_threads(spec.threads)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        base = rss_mb()
        start = time.perf_counter()
        model, backend = load_candidate(spec)
        total, streamed = model_bytes(model)
        conn.send(("ready", {"backend": backend, "load_s": time.perf_counter() - start, "base_rss_mb": base,
                             "model_bytes": total, "streamed_bytes": streamed, "loaded_rss_mb": rss_mb()}))
        while True:
            message = conn.recv()
            if message[0] == "run":
                conn.send(("ok", run_once(model, spec, message[1], message[2])))
            elif message[0] == "profile":
                fused = spec.fused if spec.loop == "gqsa" else False  # transformers' loop: its own forward's parts
                conn.send(("ok", decode_profile(model, message[1], message[2], fused)))
            else:
                conn.send(("ok", {"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()}))
                return
    except Exception:  # noqa: BLE001 - reported to the parent, which notes it and goes on without this worker
        conn.send(("error", traceback.format_exc()))


@dataclass
class Worker:
    """The parent's handle on one worker process."""

    spec: CandidateSpec
    process: multiprocessing.Process
    conn: object
    info: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)

    def ask(self, *message):
        self.conn.send(message)
        status, payload = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.spec.name} worker failed:\n{payload}")
        return payload


def start_worker(spec: CandidateSpec) -> Worker:
    """Spawn a worker for ``spec`` and wait until its model is loaded."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_worker, args=(child, spec), name=f"gqsa-bench-{spec.name}", daemon=True)
    process.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError as exc:
        process.join(5)
        raise RuntimeError(f"{spec.name} worker died while loading (exit code {process.exitcode})") from exc
    if status == "error":
        process.join(5)
        raise RuntimeError(f"{spec.name} worker failed while loading:\n{payload}")
    return Worker(spec, process, parent, info=payload)


# ---- models to compare -----------------------------------------------------------------------------------


def _compress_data_free(model: nn.Module, tokenizer, out: Path) -> Path:
    """Magnitude W4 g16, 50% of groups pruned, saved as a gqsa checkpoint (seconds; speed needs no accuracy)."""
    import gqsa
    from gqsa.compress import compress_model
    from gqsa.config import CompressConfig, QuantSpec, SparsitySpec

    config = CompressConfig(method="magnitude", quant=QuantSpec(bits=4, group_size=16),
                            sparsity=SparsitySpec(ratio=0.5))
    compress_model(model, config, progress=False)
    gqsa.save(model, tokenizer, out, compression=config.to_dict())
    return out


def with_packed_lm_head(checkpoint: str, bits: int, scratch: Path, embedding: bool = False) -> str:
    """A copy of ``checkpoint`` whose LM head is stored packed (W``bits`` g16, sparsity 0): the ``gqsa-lm`` rows;
    with ``embedding`` its input embedding table too (the ``gqsa-lmB-embB`` rows)."""
    import gqsa
    from gqsa.models.packing import pack_embedding, pack_lm_head

    model, tokenizer = gqsa.load(checkpoint)
    pack_lm_head(model, bits=bits)
    if embedding:
        pack_embedding(model, bits=bits)
    out = scratch / f"{Path(checkpoint).name}-lm{bits}{f'-emb{bits}' if embedding else ''}"
    gqsa.save(model, tokenizer, out)
    return str(out)


def build_7b_stack(out: Path, layers: int, seed: int = 0) -> tuple[str, str]:
    """A Llama-2-7B-shaped model with ``layers`` blocks and random weights: (dense dir, W4S50 g16 checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, **SHAPES_7B)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    dense = out / f"llama2-7b-shaped-{layers}l"
    model.save_pretrained(dense)
    checkpoint = _compress_data_free(model, None, out / f"llama2-7b-shaped-{layers}l-w4s50")
    return str(dense), str(checkpoint)


def resolve_models(args: argparse.Namespace, scratch: Path) -> tuple[str | None, str, str]:
    """(dense model or None for the default, gqsa checkpoint, a label) from the command line."""
    from gqsa.models.loading import COMPRESSED_CONFIG_NAME, load_model

    if args.shapes == "7b":
        if args.model or args.checkpoint:
            raise ValueError("--shapes 7b builds its own model; do not also give MODEL_OR_DIR or --checkpoint")
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
        dense, checkpoint = build_7b_stack(scratch, args.layers, args.seed)
        return dense, checkpoint, f"Llama-2-7B-shaped, {args.layers} blocks, random weights"
    model = args.model
    if model and (Path(model) / COMPRESSED_CONFIG_NAME).is_file():
        if args.checkpoint:
            raise ValueError("MODEL_OR_DIR is a gqsa checkpoint already; give the dense model with --dense")
        return args.dense, model, str(model)
    if args.dense:
        raise ValueError("--dense only applies when MODEL_OR_DIR is a gqsa checkpoint")
    if args.checkpoint:
        if not (Path(args.checkpoint) / COMPRESSED_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a gqsa checkpoint directory")
        return model, args.checkpoint, str(model or "default model (SmolLM2-135M-Instruct)")
    dense_model, tokenizer = load_model(model)
    checkpoint = _compress_data_free(dense_model, tokenizer, scratch / "w4s50-magnitude")
    del dense_model
    return model, str(checkpoint), str(model or "default model (SmolLM2-135M-Instruct)")


# ---- the run ---------------------------------------------------------------------------------------------


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
    from gqsa.bench.kernel import dram_read_gb_per_s, machine_info

    args = parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    notes: list[str] = list(args.note)
    with tempfile.TemporaryDirectory(prefix="gqsa-e2e-") as scratch:
        dense, checkpoint, label = resolve_models(args, Path(scratch))
        checkpoints = {name: with_packed_lm_head(checkpoint, bits, Path(scratch), embedding)
                       for bits in (4, 8) for embedding in (False, True)
                       if (name := f"gqsa-lm{bits}" + (f"-emb{bits}" if embedding else "")) in args.candidates}
        workers = []
        for name in args.candidates:
            spec = CandidateSpec(name, dense, checkpoints.get(name, checkpoint), threads)
            try:
                workers.append(start_worker(spec))
            except RuntimeError as exc:
                notes.append(f"{name} skipped: {str(exc).strip().splitlines()[-1]}")
                logger.warning("%s", exc)
        if not workers:
            raise RuntimeError("no candidate could be loaded: " + "; ".join(notes))
        try:
            bandwidth = dram_read_gb_per_s()
            gen = torch.Generator().manual_seed(args.seed)
            vocab = _vocab_size(checkpoint)
            prompts = [torch.randint(3, vocab, (1, args.prompt_len), generator=gen) for _ in range(args.repeats)]
            for w in workers:  # warm-up: allocations, lazy kernel loading, one-off compilation
                w.ask("run", prompts[0], min(4, args.new_tokens))
            for prompt in prompts:
                for w in workers:  # round robin: one generation of every candidate per repeat
                    w.runs.append(w.ask("run", prompt, args.new_tokens))
            profiles = {w.spec.name: w.ask("profile", prompts[0], args.profile) for w in workers} if args.profile \
                else {}
            memory = {w.spec.name: w.ask("stop") for w in workers}
        finally:
            for w in workers:
                w.process.join(10)
                if w.process.is_alive():
                    w.process.kill()
    rows = [summarize(w, memory[w.spec.name], args, bandwidth) for w in workers]
    add_ratios(rows)
    info = machine_info(bandwidth) | {"threads": threads}
    settings = {"model": label, "shapes": args.shapes, "layers": args.layers if args.shapes == "7b" else None,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "candidates": args.candidates, "seed": args.seed,
                "command": shlex.join(["gqsa", "bench", "e2e", *(sys.argv[1:] if argv is None else argv)]),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    report = {"machine": info, "settings": settings, "notes": notes, "rows": rows, "profiles": profiles}
    header = (f"{info['processor']}, {threads} thread(s), torch {info['torch']}, gqsa {info['git_revision']} "
              f"(kernel isa {info['gqsa_isa']}); DRAM read {bandwidth:.1f} GB/s")
    text = (f"{label}: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batch 1, greedy, "
            f"{args.repeats} repeats (medians), candidates interleaved, one process each")
    table = format_table(rows)
    profile_table = format_profiles(profiles) if profiles else ""
    if args.json is not None:
        payload = jsonio.dumps(report, indent=1) + "\n"
        if args.json == "-":
            print(payload, end="")
        else:
            Path(args.json).write_text(payload)
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
        args.markdown.write_text(body + "".join(f"\n* {n}" for n in notes) + ("\n" if notes else ""))
    return 0


def _vocab_size(checkpoint: str) -> int:
    """Vocabulary of the compared models, read from the checkpoint's config."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint, local_files_only=True).get_text_config().vocab_size


if __name__ == "__main__":
    raise SystemExit(main())
