"""The compression pipeline: one call per stage, in order (``compress_model``).

    model -> check every layer fits the config -> [calibration windows] -> [allocation "model": a dense pass
    measures each layer's sensitivity and sets its share of the pruning] -> choose masks and quantize (the
    method; calibrated methods go block by block, ``gqsa.algorithms.driver``) [-> BQPO: train each block after
    its one-shot step] -> swap in PackedLinear (group pattern) or leave the pruned float weights in place
    (unstructured / N:M baselines) [-> E2E-OQP: train the scales end to end] -> report (per-layer errors,
    sparsity, bits per weight, time, memory)

``gqsa.compress`` re-exports it and adds ``run``, the whole job of ``gqsa compress``.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from gqsa.algorithms.reports import float_layer_report, layer_report
from gqsa.config import CompressConfig
from gqsa.format.packed import PackedWeight
from gqsa.models.adapter import compressible_linears
from gqsa.models.checks import check_context_length
from gqsa.models.checkpoints import model_summary
from gqsa.models.surgery import set_submodule
from gqsa.nn.packed_linear import PackedLinear
from gqsa.utils.finite import describe_nonfinite
from gqsa.utils.memory import trim_heap

logger = logging.getLogger(__name__)

_CALIB_WINDOW = "the calibration window length (calib.seq_len, --seq-len)"


def check_layers(linears: dict[str, nn.Linear], config: CompressConfig) -> None:
    """Check that every layer to be compressed fits the config and holds finite weights.

    Args:
        linears: name -> layer to be compressed.
        config: the resolved CompressConfig.

    Raises:
        ValueError: naming the first layer whose in_features the group size (or M of N:M) does not divide, or
            whose weight or bias holds NaN or Inf (a scale or a saliency computed from it would be meaningless).
    """
    nm = config.sparsity.nm
    unknown = sorted(set(config.layer_formats) - set(linears))
    if unknown:
        raise ValueError(f"layer_formats names {len(unknown)} layer(s) the model does not compress, e.g. "
                         f"{unknown[:3]}; compressed layers look like {sorted(linears)[:2]}")
    for name, m in linears.items():
        if config.quant is not None:
            config.layer_quant(name).check_in_features(m.in_features, layer=name)
        if nm is not None and m.in_features % nm[1]:
            raise ValueError(f"{name}: pattern {config.sparsity.pattern} needs in_features divisible by {nm[1]}, "
                             f"got {m.in_features}")
        for kind, tensor in (("weight", m.weight), ("bias", m.bias)):
            if tensor is None or tensor.device.type == "meta":
                continue  # a block not read yet (gqsa.models.lazy): checked when it is read
            problem = describe_nonfinite(tensor)
            if problem is not None:
                raise ValueError(f"{name}: the {kind} holds {problem}; gqsa compresses finite weights only")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def calibration_ids(tokenizer, config: CompressConfig, model: nn.Module | None = None) -> torch.Tensor:
    """(samples, seq_len) calibration windows from the calibration part of the configured text.

    Args:
        tokenizer: the model's tokenizer.
        config: the resolved CompressConfig (``config.calib`` says which text, how many windows, how long).
        model: the model to be calibrated, or its config; when given, windows longer than its context are refused
            before the text is read.

    Returns:
        (samples, seq_len) int64 token ids.

    Raises:
        ValueError: ``calib.seq_len`` exceeds the model's context, or the text is too short for the windows.
    """
    from gqsa.data.corpora import load_text
    from gqsa.data.windows import calibration_windows, tokenize_text
    from gqsa.eval.heldout import HELDOUT_FRACTION

    c = config.calib
    if model is not None:
        check_context_length(model, c.seq_len, _CALIB_WINDOW)
    tokens = tokenize_text(tokenizer, load_text(c.dataset, "calibration", heldout_fraction=HELDOUT_FRACTION))
    return calibration_windows(tokens, c.samples, c.seq_len, c.seed)


def _packed_module(linear: nn.Linear, packed: PackedWeight) -> PackedLinear:
    bias = None if linear.bias is None else linear.bias.detach()
    return PackedLinear.from_packed(packed.to(linear.weight.device), bias)


def _pruned_in_place(linear: nn.Linear, pruned: torch.Tensor) -> nn.Linear:
    linear.weight.data.copy_(pruned.to(linear.weight.dtype))
    return linear


def _compress_data_free(
    model: nn.Module, linears: dict[str, nn.Linear], config: CompressConfig, progress: bool
) -> list[dict]:
    """Method "magnitude": group pattern -> packed layers; unstructured / N:M -> layers pruned in float."""
    from gqsa.algorithms.float_pruning import magnitude_prune
    from gqsa.algorithms.magnitude import magnitude_pack
    from gqsa.models.lazy import lazy_weights

    sp = config.sparsity
    reports = []
    if sp.pattern != "group":
        if sp.allocation == "model":
            raise ValueError("magnitude pruning of single weights supports allocation 'row' or 'matrix', not 'model'")
        for name in tqdm(linears, desc="pruning layers", disable=not progress):
            w = linears[name].weight.detach().clone()
            pruned, mask = magnitude_prune(w, sp.ratio, sp.nm, sp.allocation)
            _pruned_in_place(linears[name], pruned)
            reports.append(float_layer_report(name, w, pruned, mask, sp.pattern))
        return reports
    for part in _lazy_parts(model, linears, config):
        packed = magnitude_pack(part, config)
        for name in tqdm(part, desc="packing layers", disable=not progress):
            reports.append(layer_report(name, part[name].weight, packed[name]))
            set_submodule(model, name, _packed_module(part[name], packed[name]))
            if lazy_weights(model) is not None:
                part[name].to("meta")  # the replaced dense layer's memory goes now, not with the last block
        if lazy_weights(model) is not None:
            trim_heap()
    return reports


def _lazy_parts(model: nn.Module, linears: dict[str, nn.Linear], config: CompressConfig):
    """The layers to pack by magnitude, all at once, or block by block for a lazily loaded model (each block read
    from its shards at its turn: gqsa.models.lazy)."""
    from gqsa.models.adapter import block_prefix, decoder_layers
    from gqsa.models.lazy import lazy_weights, materialize_block

    if lazy_weights(model) is None:
        yield linears
        return
    if config.sparsity.allocation == "model":
        raise ValueError("allocation 'model' compares every layer at once; it needs the model loaded whole "
                         "(without --lazy-load)")
    for b in range(len(decoder_layers(model))):
        materialize_block(model, b, "cpu")
        prefix = block_prefix(model, b) + "."
        yield {n: m for n, m in linears.items() if n.startswith(prefix)}  # the same modules, now read


def _layer_compressor(config: CompressConfig, prune_counts: dict[str, int] | None = None):
    """The per-layer step of a calibrated method: (name, nn.Linear, H statistics) -> (module, report).

    ``prune_counts`` (allocation "model") gives each layer's number of pruned groups; the groups are then chosen
    over the whole matrix.
    """
    from gqsa.algorithms.float_pruning import sparsegpt_prune, wanda_prune
    from gqsa.algorithms.hessian import damped_inverse_cholesky
    from gqsa.algorithms.oneshot import gqsa_oneshot_linear

    sp, os_ = config.sparsity, config.oneshot

    def gqsa_layer(name, linear, stats):
        q = config.layer_quant(name)
        ratio, allocation = config.layer_ratio(name), sp.allocation
        if prune_counts is not None:
            groups = linear.out_features * (linear.in_features // q.group_size)
            ratio, allocation = prune_counts[name] / groups, "matrix"
        hinv, hinv_chol, _ = damped_inverse_cholesky(stats.hessian, os_.damp, layer=name)
        packed = gqsa_oneshot_linear(
            linear.weight, stats.hessian, hinv, hinv_chol, q.bits, q.group_size, ratio, allocation,
            os_.saliency, q.symmetric, q.qparam_method, os_.block_size, static_qparams=os_.static_qparams,
        )
        del hinv, hinv_chol  # two (K, K) matrices, not needed by the report
        return _packed_module(linear, packed), layer_report(name, linear.weight, packed, stats.hessian)

    def float_layer(name, linear, stats):
        w = linear.weight.detach().clone()
        if config.method == "sparsegpt":
            _, hinv_chol, _ = damped_inverse_cholesky(stats.hessian, os_.damp, layer=name)
            pruned, mask = sparsegpt_prune(w, hinv_chol, sp.ratio, sp.nm, sp.allocation, os_.block_size)
        else:
            pruned, mask = wanda_prune(w, stats.hessian, sp.ratio, sp.nm, sp.allocation)
        report = float_layer_report(name, w, pruned, mask, sp.pattern, stats.hessian)
        return _pruned_in_place(linear, pruned), report

    return gqsa_layer if config.method == "gqsa" else float_layer


def _final_report(config: CompressConfig):
    """A layer's report after BQPO: packed layers by ``layer_report``, float-pruned ones by ``float_layer_report``."""

    def report(name: str, dense: torch.Tensor, module: nn.Module, hessian: torch.Tensor) -> dict:
        if isinstance(module, PackedLinear):
            return layer_report(name, dense, module.packed_weight(), hessian)
        w = module.weight.detach()
        return float_layer_report(name, dense, w, w != 0, config.sparsity.pattern, hessian)

    return report


def measure_sensitivity(model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor, progress: bool = True,
                        device: torch.device | None = None, **store) -> dict:
    """Per layer, the sorted normalised group saliencies of the dense model (``SensitivityCurve``).

    One block-by-block calibration pass that leaves the model unchanged.
    """
    from gqsa.algorithms.allocation import SensitivityCurve
    from gqsa.algorithms.blockwise import compress_blockwise
    from gqsa.algorithms.hessian import damped_inverse_cholesky
    from gqsa.quant.saliency import group_saliency

    curves = {}

    def measure(name, linear, stats):
        h = stats.hessian
        hinv, _, _ = damped_inverse_cholesky(h, config.oneshot.damp, layer=name)
        w = linear.weight.detach().float()
        scores = group_saliency(config.oneshot.saliency, w, h, hinv, config.quant.group_size)
        curves[name] = SensitivityCurve.from_scores(scores, float(((w @ h) * w).sum()))
        return linear, {"layer": name}

    compress_blockwise(model, calib_ids, measure, progress=progress, desc="measuring sensitivity", device=device,
                       **store)
    return curves


def _compress_calibrated(model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor, progress: bool,
                         store: dict, resume_dir: str | None = None, device: torch.device | None = None
                         ) -> tuple[list[dict], dict | None, list[dict] | None]:
    from gqsa.algorithms.allocation import allocate_counts
    from gqsa.algorithms.blockwise import compress_blockwise
    from gqsa.algorithms.resume import ResumeState, fingerprint

    counts = None
    if config.sparsity.allocation == "model":
        curves = measure_sensitivity(model, config, calib_ids, progress, device=device, **store)
        counts = allocate_counts(curves, config.sparsity.ratio, config.sparsity.model_spread)
    compress_linear = _layer_compressor(config, counts)
    resume = None
    if resume_dir is not None:
        resume = ResumeState(resume_dir, fingerprint(config.to_dict(), calib_ids, model), config=config.to_dict())
    if config.bqpo.epochs:
        from gqsa.algorithms.bqpo import compress_blockwise_bqpo

        layers, blocks = compress_blockwise_bqpo(model, calib_ids, compress_linear, config.bqpo,
                                                 _final_report(config), progress, resume=resume, device=device,
                                                 **store)
        return layers, counts, blocks
    layers = compress_blockwise(model, calib_ids, compress_linear, progress=progress, device=device, resume=resume,
                                **store)
    return layers, counts, None


def float_sparse_summary(model: nn.Module, layers: list[dict]) -> dict:
    """Totals over layers pruned in float (the counterpart of ``model_summary`` for packed layers)."""
    weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
    summary = model_summary(model)
    return {
        "num_layers": len(layers),
        "weights_in_pruned_layers": weights,
        "bits_per_weight": sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in layers) / weights,
        "sparsity": sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers) / weights,
        "model_bytes": summary["model_bytes"],
    }


def compress_model(
    model: nn.Module,
    config: CompressConfig,
    calib_ids: torch.Tensor | None = None,
    progress: bool = True,
    activation_budget_bytes: int | None = None,
    offload_dir: str | None = None,
    host_activation_budget_bytes: int = 0,
    resume_dir: str | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Compress every decoder linear layer of ``model`` in place.

    Args:
        model: a supported transformers causal LM (see gqsa.models.adapter).
        config: the resolved CompressConfig.
        calib_ids: (samples, seq_len) calibration token windows (``calibration_ids``); needed by every method
            but "magnitude".
        progress: show progress bars.
        activation_budget_bytes: memory for calibration activations where they are computed (``device``); past
            it a GPU's go to host memory up to ``host_activation_budget_bytes``, and the rest to ``offload_dir``
            (default: the system temporary directory). None = no limit.
        resume_dir: with a calibrated method, every finished block is saved here, and blocks already saved there
            by an interrupted run of the same settings on the same model are checked and replayed
            (``gqsa.algorithms.resume``); state of other settings is discarded.
        device: where calibrated methods compute (the model stays where it is; each decoder block visits the
            device for its turn, activations live there up to the budget) and where E2E-OQP trains the model.
            Default: the model's device. Data-free magnitude runs where the model is.

    Returns:
        A report: the config, per-layer results, model summary, wall time and peak memory; with allocation
        "model" the groups pruned per layer, with BQPO its per-block losses ("bqpo_blocks"), with E2E-OQP its
        held-out loss before and after ("e2e").

    Raises:
        ValueError: a layer the config does not fit or that holds NaN/Inf weights, a calibrated method without
            calibration windows, windows longer than the model's context, or calibration activations that
            become NaN/Inf (naming the block and layer).
    """
    start = time.perf_counter()
    check_layers(compressible_linears(model), config)  # not kept: each block's dense layers go once replaced
    if calib_ids is not None and calib_ids.dim() == 2:
        check_context_length(model, calib_ids.shape[1], _CALIB_WINDOW)
    counts = blocks = teacher = search = None
    if config.search.target_bpw and not config.layer_formats:
        config, search = _search_formats(model, config, calib_ids, device, progress)
    if config.e2e.epochs and config.e2e.distill > 0:
        teacher = _teacher(model, config, calib_ids, device, progress)
    if config.method == "magnitude":
        layers = _compress_data_free(model, compressible_linears(model), config, progress)
    else:
        if calib_ids is None:
            raise ValueError(f"method {config.method!r} needs calibration windows (calib_ids); "
                             "see gqsa.compress.calibration_ids")
        store = {"activation_budget_bytes": activation_budget_bytes, "offload_dir": offload_dir,
                 "host_activation_budget_bytes": host_activation_budget_bytes}
        layers, counts, blocks = _compress_calibrated(model, config, calib_ids, progress, store, resume_dir,
                                                      device)
    e2e = None
    if config.e2e.epochs:
        from gqsa.algorithms.e2e_oqp import e2e_oqp

        with on_device(model, device):  # the packed model: about a quarter of the dense one
            e2e = e2e_oqp(model, calib_ids, config.e2e, progress=progress, teacher=teacher)
    packed = config.sparsity.pattern == "group"
    report = {
        "config": config.to_dict(),
        "layers": layers,
        "summary": model_summary(model) if packed else float_sparse_summary(model, layers),
        "wall_time_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    for key, value in (("format_search", search), ("groups_pruned_per_layer", counts), ("bqpo_blocks", blocks),
                       ("e2e", e2e)):
        if value is not None:
            report[key] = value
    return report


def _search_formats(model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor | None,
                    device: torch.device | str | None, progress: bool) -> tuple[CompressConfig, dict]:
    """``config`` with every layer's format chosen for ``config.search.target_bpw`` (gqsa.algorithms.format_search),
    and the search's report."""
    from gqsa.algorithms.format_search import search_formats
    from gqsa.models.lazy import lazy_weights

    if calib_ids is None:
        raise ValueError("--target-bpw (search.target_bpw) measures formats on calibration windows (calib_ids)")
    if lazy_weights(model) is not None:
        raise ValueError("--target-bpw runs the dense model whole on calibration windows first; load it without "
                         "--lazy-load")
    with on_device(model, device):
        plan = search_formats(model, calib_ids, config, progress)
    logger.info("format search chose %s: %.3f bits per weight", plan.choice, plan.bits_per_weight)
    return config.replace(layer_formats=plan.layer_formats), plan.as_report()


def _teacher(model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor | None,
             device: torch.device | str | None, progress: bool):
    """The dense model's top-k next-token distributions on the calibration windows, for E2E-OQP's distillation
    (computed before the model is compressed in place)."""
    from gqsa.algorithms.distill import teacher_top_k
    from gqsa.models.lazy import lazy_weights

    if calib_ids is None:
        raise ValueError("E2E-OQP distillation needs calibration windows (calib_ids)")
    if lazy_weights(model) is not None:
        raise ValueError("E2E-OQP distillation runs the dense model whole on the calibration windows first; "
                         "load it without --lazy-load, or set the distillation weight to 0 (--e2e-distill 0)")
    return teacher_top_k(model, calib_ids, config.e2e.distill_top_k, device, progress)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | None):
    """The model on ``device`` for the block (None: where it is), then back."""
    home = next(model.parameters()).device
    model.to(home if device is None else device)
    try:
        yield model
    finally:
        model.to(home)
