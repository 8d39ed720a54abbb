"""Compression as a library call: ``run`` does the whole job the CLI does; the stages are ``gqsa.pipeline``'s
(``compress_model``, ``calibration_ids``, ... re-exported here).

``run(out, "w4s50", model_dir, heldout=HeldoutSpec("wiki"))`` loads the model (whole, or block by block with
``lazy_load``), compresses it, measures it and saves the checkpoint with ``report.json`` and the resolved
``compress_config.json``, under the output's lock and with resume state beside it (what ``gqsa compress`` does;
the CLI calls it).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gqsa.config import CompressConfig
from gqsa.models.checkpoints import model_summary
from gqsa.pipeline import (
    calibration_ids,
    check_layers,
    compress_model,
    float_sparse_summary,
    measure_sensitivity,
    on_device,
    peak_rss_mb,
)

logger = logging.getLogger(__name__)

__all__ = ["HeldoutSpec", "calibration_ids", "check_layers", "compress_model", "default_activation_budget",
           "float_sparse_summary", "measure_sensitivity", "peak_rss_mb", "run"]


@dataclass(frozen=True)
class HeldoutSpec:
    """Held-out perplexity measured before and after compressing (``gqsa.eval.heldout.heldout_perplexity``):
    ``source`` a packaged corpus name or a .txt/.jsonl path; ``max_tokens`` None scores all held-out tokens."""

    source: str | Path = "wiki"  # a str that names a packaged corpus is that corpus; a Path is always a file
    seq_len: int = 2048
    max_tokens: int | None = 16384
    batch_size: int = 1


def default_activation_budget(device: torch.device | str | None = None) -> int:
    """Bytes of calibration activations kept on ``device`` when none is given: a quarter of its memory (of the
    machine's physical memory for the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def default_host_activation_budget(device: torch.device | str | None = None) -> int:
    """Bytes of a GPU's calibration activations kept in host memory past the device's budget when none is given:
    a quarter of physical memory; 0 for the CPU (its activations are in host memory already)."""
    if device is None or torch.device(device).type == "cpu":
        return 0
    return default_activation_budget("cpu")


def run(
    out: str | Path,
    config: CompressConfig | str = "w4s50",
    model: str | Path | None = None,
    *,
    fast: bool = False,
    overwrite: bool = False,
    heldout: HeldoutSpec | None = None,
    sample_prompt: str | None = None,
    activation_budget_bytes: int | None = None,
    offload_dir: str | None = None,
    host_activation_budget_bytes: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    lazy_load: bool = False,
    **overrides,
) -> dict:
    """Compress ``model`` into the checkpoint directory ``out``: what ``gqsa compress`` does, from Python.

    Args:
        out: the output directory (must not exist unless ``overwrite``; never the input model).
        config: a resolved CompressConfig, or a preset name (``gqsa.presets.PRESETS``) resolved with ``fast`` and
            ``overrides`` (``gqsa.presets.Overrides``: bits, sparsity, calib_samples, bqpo_epochs, ...).
        model: a Hugging Face model directory or .gguf file; None: the default model (SmolLM2-135M-Instruct).
        heldout: measure held-out perplexity before and after (``report["ppl_before"]``, ``["ppl_after"]``).
        sample_prompt: also generate 48 tokens after this prompt with the compressed model (``report["sample"]``).
        activation_budget_bytes: calibration activations kept on ``device`` (default: a quarter of its memory);
            past it a GPU's go to host memory up to ``host_activation_budget_bytes`` (default: a quarter of
            physical memory), the rest to ``offload_dir``.
        device: where the calibrated methods, E2E-OQP, the perplexity and the sample compute (``compress_model``);
            the model is loaded on the CPU and saved from there. Default: the CPU.
        lazy_load: read the dense model block by block from its safetensors shards (``gqsa.models.lazy``): host
            memory holds one dense block, not the model. The perplexity is then measured after compressing only.

    Returns:
        The report, also saved as ``out/report.json`` beside ``out/compress_config.json``.

    Raises:
        ValueError: bad settings or an unusable ``out`` (checked before the model loads), a model the config does
            not fit; FileExistsError: ``out`` exists and ``overwrite`` is False; gqsa.utils.lock.OutputLockedError:
            another run writes ``out``. An interrupted BQPO run keeps
            its finished blocks beside ``out``: the same call resumes from them.
    """
    from gqsa.models.loading import default_model_path
    from gqsa.models.outputs import check_output_dir, is_gqsa_output
    from gqsa.presets import resolve_config
    from gqsa.utils.io import remove_stale_temporaries
    from gqsa.utils.lock import OutputLock

    if isinstance(config, str):
        config = resolve_config(config, fast, **overrides)
    elif fast or overrides:
        raise ValueError("fast and overrides apply to a preset name, not to a resolved CompressConfig")
    inputs = [default_model_path() if model is None else Path(model)]
    if is_gqsa_output(inputs[0]):
        raise ValueError(f"{inputs[0]} is a gqsa compressed checkpoint; compress the dense model it came from")
    out = check_output_dir(out, overwrite, inputs=inputs)  # before any work
    with OutputLock(out):  # a second run on the same output fails here, naming this one
        remove_stale_temporaries(out.parent)
        check_output_dir(out, overwrite)  # again, now that no other run can be writing it
        device = None if device is None else torch.device(device)
        budget = default_activation_budget(device) if activation_budget_bytes is None else activation_budget_bytes
        host = (default_host_activation_budget(device) if host_activation_budget_bytes is None
                else host_activation_budget_bytes)
        return _run_locked(out, config, model, overwrite, heldout, sample_prompt, (budget, host), offload_dir,
                           progress, device, lazy_load)


def _run_locked(out: Path, config: CompressConfig, model_path, overwrite: bool, heldout: HeldoutSpec | None,
                sample_prompt: str | None, budgets: tuple[int, int], offload_dir: str | None, progress: bool,
                device: torch.device | None, lazy_load: bool) -> dict:
    """``run`` once the output is checked and locked: load, measure, compress, measure, save."""
    import gqsa
    from gqsa.models.checkpoints import save_pruned
    from gqsa.models.loading import load_model
    from gqsa.models.outputs import resume_dir
    from gqsa.utils import jsonio

    t0 = time.perf_counter()
    if lazy_load:
        from gqsa.models.lazy import load_model_lazily

        model, tokenizer = load_model_lazily(_hf_directory(model_path))
    else:
        model, tokenizer = load_model(None if model_path is None else str(model_path))
    dense = model_summary(model)["model_bytes"]
    report = {"model": str(model_path or "default (SmolLM2-135M-Instruct)"), "load_time_s": time.perf_counter() - t0}
    calibrated = config.method != "magnitude" or (config.search.target_bpw and not config.layer_formats)
    calib_ids = calibration_ids(tokenizer, config, model) if calibrated else None
    windows = None
    if heldout is not None:  # built (and checked) once, before any work; scored before and after compressing
        from gqsa.eval.heldout import heldout_windows

        windows = heldout_windows(model, tokenizer, heldout.source, heldout.seq_len, heldout.max_tokens)
    if heldout is not None and not lazy_load:  # a lazily loaded model is never whole before it is compressed
        with on_device(model, device):
            report["ppl_before"] = _heldout(model, tokenizer, heldout, windows)
    budget, host_budget = budgets
    report["activation_budget_bytes"] = budget
    report["host_activation_budget_bytes"] = host_budget
    resume = resume_dir(out) if calib_ids is not None and config.method != "magnitude" else None
    try:
        report.update(compress_model(model, config, calib_ids=calib_ids, progress=progress,
                                     activation_budget_bytes=budget, offload_dir=offload_dir,
                                     host_activation_budget_bytes=host_budget,
                                     resume_dir=None if resume is None else str(resume), device=device))
    except BaseException:
        if resume is not None and not any(resume.glob("block_*.json")):
            shutil.rmtree(resume, ignore_errors=True)  # nothing finished: nothing to resume
        elif resume is not None:
            logger.warning("finished blocks are kept in %s: the same command resumes from them (delete it to start "
                           "over)", resume)
        raise
    with on_device(model, device):
        if heldout is not None:
            report["ppl_after"] = _heldout(model, tokenizer, heldout, windows)
        if sample_prompt:
            from gqsa.engine import GenerationSpec, generate_text

            report["sample"] = {"prompt": sample_prompt,
                                "completion": generate_text(model, tokenizer, sample_prompt,
                                                            GenerationSpec(max_new_tokens=48))[0]}
    report["dense_model_bytes"] = dense
    config = CompressConfig.from_dict(report["config"])  # with the formats --target-bpw chose
    packed = config.sparsity.pattern == "group"
    extra = {"report.json": jsonio.dumps(report, indent=1) + "\n", "compress_config.json": config.to_json() + "\n"}
    save = gqsa.save if packed else save_pruned
    save(model, tokenizer, out, compression=config.to_dict(), overwrite=overwrite, extra_files=extra)
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)
    return report


def _hf_directory(model_path) -> Path:
    """The Hugging Face directory a model path reads from: itself, or a GGUF file's (or the default model's)
    converted copy."""
    from gqsa.models.loading import converted_gguf_dir, default_model_path

    path = default_model_path() if model_path is None else Path(model_path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return converted_gguf_dir(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: lazy loading reads a Hugging Face model directory (config.json and safetensors) "
                         "or a .gguf file")
    return path


def _heldout(model, tokenizer, spec: HeldoutSpec, windows) -> dict:
    from gqsa.eval.heldout import heldout_perplexity

    return heldout_perplexity(model, tokenizer, spec.source, seq_len=spec.seq_len, max_tokens=spec.max_tokens,
                              batch_size=spec.batch_size, windows=windows)
