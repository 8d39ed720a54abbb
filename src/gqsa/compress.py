"""The compression pipeline: one call per stage, in order.

    model -> check every layer fits the config -> choose masks and quantize (the method) -> swap in
    GQSALinear -> report (per-layer error, sparsity, bits per weight, time, memory)
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


def layer_report(name: str, weight: torch.Tensor, packed: PackedWeight) -> dict:
    """Relative Frobenius error of the compressed weight and its storage, for one layer."""
    w = weight.detach().float()
    err = (packed.dequantize() - w).norm() / w.norm().clamp_min(1e-12)
    return {
        "layer": name,
        "shape": [packed.out_features, packed.in_features],
        "relative_error": float(err),
        "sparsity": packed.sparsity,
        "bits_per_weight": packed.bits_per_weight(),
    }


def compress_model(model: nn.Module, config: CompressConfig, progress: bool = True) -> dict:
    """Compress every decoder linear layer of ``model`` in place.

    Args:
        model: a supported transformers causal LM (see gqsa.models.adapter).
        config: the resolved CompressConfig.
        progress: show a progress bar.

    Returns:
        A report: the config, per-layer results, model summary, wall time and peak memory.
    """
    start = time.perf_counter()
    linears = compressible_linears(model)
    check_layers(linears, config)
    if config.method == "magnitude":
        from gqsa.algorithms.magnitude import magnitude_pack

        packed = magnitude_pack(linears, config)
    else:  # CompressConfig validates the method; this guards a method added there but not here
        raise ValueError(f"compression method {config.method!r} is not implemented")
    layers = []
    for name in tqdm(linears, desc="packing layers", disable=not progress):
        linear = linears[name]
        report = layer_report(name, linear.weight, packed[name])
        logger.info("%s: relative error %.4f, sparsity %.3f", name, report["relative_error"], report["sparsity"])
        layers.append(report)
        bias = None if linear.bias is None else linear.bias.detach()
        set_submodule(model, name, GQSALinear.from_packed(packed[name].to(linear.weight.device), bias))
    return {
        "config": config.to_dict(),
        "layers": layers,
        "summary": model_summary(model),
        "wall_time_s": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
