"""The candidates of ``gqsa bench e2e`` (see ``gqsa.bench.e2e`` for what each one is): their names, what a worker
loads for one, and one generation through its loop, timed token by token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gqsa.bench.e2e_clock import TokenClock

CANDIDATES = ("fp32-hf", "bf16-hf", "int8-dynamic-hf", "fp32-engine", "fp32-engine-hfstep", "gqsa-hf", "gqsa-op",
              "gqsa-hfstep", "gqsa", "gqsa-compile", "gqsa-lm4", "gqsa-lm8", "gqsa-lm4-emb4", "gqsa-lm8-emb8")
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
