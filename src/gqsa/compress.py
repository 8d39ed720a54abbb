"""The compression pipeline: one call per stage, in order.

    model -> check every layer fits the config -> [calibration windows] -> choose masks and quantize (the
    method; "gqsa" goes block by block) -> swap in GQSALinear -> report (per-layer errors, sparsity, bits per
    weight, time, memory)
"""

from __future__ import annotations

import logging
import resource
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from gqsa.config import CompressConfig
from gqsa.format.packed import PackedWeight
from gqsa.models.adapter import compressible_linears
from gqsa.models.compressed import model_summary, set_submodule
from gqsa.nn.packed_linear import GQSALinear

logger = logging.getLogger(__name__)


def check_layers(linears: dict[str, nn.Linear], config: CompressConfig) -> None:
    """Raise ValueError naming the first layer whose in_features the group size does not divide."""
    for name, m in linears.items():
        config.quant.check_in_features(m.in_features, layer=name)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def layer_report(name: str, weight: torch.Tensor, packed: PackedWeight, hessian: torch.Tensor | None = None) -> dict:
    """Errors and storage of one compressed layer.

    ``relative_error`` is ||W - Wq||_F / ||W||_F; with calibration statistics H, ``output_error`` is the relative
    error of the layer's output on the calibration inputs, tr(D H D^T) / tr(W H W^T) with D = W - Wq.
    """
    w = weight.detach().float()
    diff = packed.dequantize().to(w.device) - w
    report = {
        "layer": name,
        "shape": [packed.out_features, packed.in_features],
        "relative_error": float(diff.norm() / w.norm().clamp_min(1e-12)),
        "sparsity": packed.sparsity,
        "bits_per_weight": packed.bits_per_weight(),
    }
    if hessian is not None:
        num = ((diff @ hessian) * diff).sum()
        den = ((w @ hessian) * w).sum().clamp_min(1e-12)
        report["output_error"] = float(num / den)
    return report


def calibration_ids(tokenizer, config: CompressConfig) -> torch.Tensor:
    """(samples, seq_len) calibration windows from the calibration part of the configured text."""
    from gqsa.data.corpora import load_text
    from gqsa.data.windows import calibration_windows, tokenize_text
    from gqsa.eval.heldout import HELDOUT_FRACTION

    c = config.calib
    tokens = tokenize_text(tokenizer, load_text(c.dataset, "calibration", heldout_fraction=HELDOUT_FRACTION))
    return calibration_windows(tokens, c.samples, c.seq_len, c.seed)


def _packed_module(linear: nn.Linear, packed: PackedWeight) -> GQSALinear:
    bias = None if linear.bias is None else linear.bias.detach()
    return GQSALinear.from_packed(packed.to(linear.weight.device), bias)


def _compress_magnitude(
    model: nn.Module, linears: dict[str, nn.Linear], config: CompressConfig, progress: bool
) -> list[dict]:
    from gqsa.algorithms.magnitude import magnitude_pack

    packed = magnitude_pack(linears, config)
    reports = []
    for name in tqdm(linears, desc="packing layers", disable=not progress):
        reports.append(layer_report(name, linears[name].weight, packed[name]))
        set_submodule(model, name, _packed_module(linears[name], packed[name]))
    return reports


def _compress_gqsa(model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor, progress: bool) -> list[dict]:
    from gqsa.algorithms.blockwise import compress_blockwise
    from gqsa.algorithms.hessian import damped_inverse_cholesky
    from gqsa.algorithms.oneshot import gqsa_oneshot_linear

    q, sp, os_ = config.quant, config.sparsity, config.oneshot

    def compress_linear(name, linear, stats):
        hinv, hinv_chol, _ = damped_inverse_cholesky(stats.hessian, os_.damp, layer=name)
        packed = gqsa_oneshot_linear(
            linear.weight, stats.hessian, hinv, hinv_chol, q.bits, q.group_size, sp.ratio, sp.allocation,
            os_.saliency, q.symmetric, q.qparam_method, os_.block_size,
        )
        return _packed_module(linear, packed), layer_report(name, linear.weight, packed, stats.hessian)

    return compress_blockwise(model, calib_ids, compress_linear, progress=progress)


def compress_model(
    model: nn.Module, config: CompressConfig, calib_ids: torch.Tensor | None = None, progress: bool = True
) -> dict:
    """Compress every decoder linear layer of ``model`` in place.

    Args:
        model: a supported transformers causal LM (see gqsa.models.adapter).
        config: the resolved CompressConfig.
        calib_ids: (samples, seq_len) calibration token windows (``calibration_ids``); needed by method "gqsa".
        progress: show progress bars.

    Returns:
        A report: the config, per-layer results, model summary, wall time and peak memory.

    Raises:
        ValueError: a layer the config does not fit, or a calibrated method without calibration windows.
    """
    start = time.perf_counter()
    linears = compressible_linears(model)
    check_layers(linears, config)
    if config.method == "magnitude":
        layers = _compress_magnitude(model, linears, config, progress)
    elif config.method == "gqsa":
        if calib_ids is None:
            raise ValueError("method 'gqsa' needs calibration windows (calib_ids); see gqsa.compress.calibration_ids")
        layers = _compress_gqsa(model, config, calib_ids, progress)
    else:  # CompressConfig validates the method; this guards a method added there but not here
        raise ValueError(f"compression method {config.method!r} is not implemented")
    return {
        "config": config.to_dict(),
        "layers": layers,
        "summary": model_summary(model),
        "wall_time_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
