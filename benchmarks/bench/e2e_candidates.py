"""The candidates of ``gqsa bench e2e`` (see e2e.py for what each one is): their names, what a worker
loads for one, and one generation through its loop, timed token by token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.bench.e2e_clock import TokenClock

CANDIDATES = ("fp32-hf", "bf16-hf", "int8-dynamic-hf", "fp32-engine", "fp32-engine-hfstep", "gqsa-hf", "gqsa-op",
              "gqsa-hfstep", "gqsa", "gqsa-compile", "gqsa-lm4", "gqsa-lm8", "gqsa-lm4-emb4", "gqsa-lm8-emb8",
              "gqsa-a8", "gqsa-lm8-a8", "gqsa-lm4-a8", "llama.cpp")
LLAMA_CPP_CONTEXT = 4096  # tokens of llama.cpp's context: prompt + new tokens must fit
# llama.cpp's extra buffer types (AMX, weight repacking) off: with them, llama-cpp-python 0.3.36 built natively
# on an AMX Xeon died in ggml_backend_amx_mul_mat (SIGSEGV) on its first forward of this Q4_1 model.
LLAMA_CPP_EXTRA_BUFFERS = False
DEFAULT_CANDIDATES = ("fp32-hf", "bf16-hf", "int8-dynamic-hf", "gqsa")


@dataclass(frozen=True)
class CandidateSpec:
    """What a worker loads: ``name`` (one of CANDIDATES), the dense model and the compressed checkpoint."""

    name: str
    dense: str | None
    checkpoint: str | None
    threads: int

    @property
    def loop(self) -> str:
        if self.name == "llama.cpp":
            return "llama.cpp"
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
    if name == "llama.cpp":
        return LlamaCpp(spec), "llama.cpp (llama-cpp-python), the GGUF's own quantization"
    if name.startswith("gqsa"):
        model, _ = gqsa.load(spec.checkpoint)
        backend = use_fastest_backend(model, "cpu-a8" if name.endswith("-a8") else "auto")
        if name == "gqsa-op":
            from gqsa.nn import PackedLinear

            for m in model.modules():
                if isinstance(m, PackedLinear):
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


class LlamaCpp:
    """The ``llama.cpp`` candidate: the dense model's own GGUF file (the default model's Q4_1 file) through
    llama-cpp-python (an optional benchmark dependency), with the worker's thread count, greedy decoding."""

    def __init__(self, spec: CandidateSpec) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise RuntimeError("llama-cpp-python is not installed (an optional benchmark dependency: "
                               "pip install llama-cpp-python)") from exc
        if spec.dense is None:
            from gqsa.models.loading import default_model_path

            path = default_model_path()
        else:
            path = Path(spec.dense)
        if path.suffix != ".gguf" or not path.is_file():
            raise ValueError(f"llama.cpp runs a GGUF file; the dense model is {path}")
        self.path = path
        import llama_cpp.llama_cpp as low_level

        defaults = low_level.llama_model_default_params

        def model_params():  # llama-cpp-python's Llama() does not expose use_extra_bufts
            params = defaults()
            params.use_extra_bufts = LLAMA_CPP_EXTRA_BUFFERS
            return params

        low_level.llama_model_default_params = model_params
        try:
            self.llm = Llama(model_path=str(path), n_ctx=LLAMA_CPP_CONTEXT, n_threads=spec.threads,
                             n_threads_batch=spec.threads, n_batch=512, seed=0, verbose=False)
        finally:
            low_level.llama_model_default_params = defaults

    def model_bytes(self) -> tuple[int, int]:
        """(bytes of the GGUF file, the same: its tensors are what a step reads, the input embedding aside)."""
        size = self.path.stat().st_size
        return size, size

    def generate(self, prompt: torch.Tensor, new_tokens: int, clock: TokenClock) -> None:
        """Exactly ``new_tokens`` greedy tokens after ``prompt`` (1, T), each timestamped by ``clock``."""
        tokens = prompt[0].tolist()
        if len(tokens) + new_tokens > LLAMA_CPP_CONTEXT:
            raise ValueError(f"prompt + new tokens ({len(tokens) + new_tokens}) exceed llama.cpp's context of "
                             f"{LLAMA_CPP_CONTEXT} tokens")
        clock.put(prompt)  # the prompt goes in
        for i, _ in enumerate(self.llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True)):
            clock.put(1)
            if i + 1 == new_tokens:
                break


def run_once(model, spec: CandidateSpec, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Generate exactly ``new_tokens`` tokens after ``prompt`` (1, T); the TokenClock's measurements."""
    from gqsa.engine import GenerationSpec, generate

    clock = TokenClock()
    if spec.loop == "llama.cpp":
        model.generate(prompt, new_tokens, clock)
        return clock.result(prompt.shape[1]) | {"step": "llama.cpp eval"}
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
