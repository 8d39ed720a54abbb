"""The kernel benchmark in the sweep (benchmarks/sweep.py): reading a ``gqsa bench kernel --json`` file, the
times of one shape by batch size, the time of a point's format, and running the benchmark itself."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def load_kernel(path: Path) -> dict:
    """A ``gqsa bench kernel --json`` file, with its path recorded."""
    data = json.loads(Path(path).read_text())
    data["path"] = str(path)
    return data


def kernel_shape(kernel: dict, shape: str | None = None) -> str:
    """The shape to show from a kernel file: ``shape`` if it was measured there, else the first measured."""
    shapes = list(dict.fromkeys(m["shape"] for m in kernel["measurements"]))
    return shape if shape in shapes else shapes[0]


def kernel_series(kernel: dict, shape: str) -> dict[str, list[tuple[int, float]]]:
    """{candidate: [(batch, median ms), ...] by batch} for one shape of a kernel file."""
    out: dict[str, list[tuple[int, float]]] = {}
    for m in kernel["measurements"]:
        if m["shape"] == shape:
            out.setdefault(m["candidate"], []).append((m["batch"], m["median_ms"]))
    return {c: sorted(v) for c, v in out.items()}


def kernel_ms_for(entry: dict, kernel: dict, shape: str, batch: int = 1) -> float | None:
    """Batch-``batch`` kernel time of the point's format on ``shape``, if the kernel file measured it: the dense
    reference is torch's fp32 linear, a GQSA point is the packed layer's inference call (``gqsa-cpu-kernel-only``,
    the kernel bound to the layer; ``gqsa-cpu``, the registered op, in files without it) when its bits, group size
    and sparsity are those the file's packed weights were made with."""
    s = kernel.get("settings", {})
    series = kernel_series(kernel, shape)
    cfg = entry.get("config")
    if cfg is None:
        candidate = "torch-fp32"
    elif (cfg.get("quant") and cfg["sparsity"]["pattern"] == "group"
          and (cfg["quant"]["bits"], cfg["quant"]["group_size"]) == (s.get("bits"), s.get("group_size"))
          and math.isclose(cfg["sparsity"]["ratio"], s.get("sparsity", -1.0))):
        candidate = "gqsa-cpu-kernel-only" if "gqsa-cpu-kernel-only" in series else "gqsa-cpu"
    else:
        return None
    return next((ms for b, ms in series.get(candidate, []) if b == batch), None)


def run_kernel(args: argparse.Namespace, path: Path) -> Path:
    """The kernel benchmark (benchmarks/bench/kernel.py) on ``args.kernel_run`` shapes, its JSON written to ``path``."""
    from benchmarks.bench import kernel

    kernel.main(["--shapes", args.kernel_run, "--batch", args.kernel_batch, "--repeats", str(args.kernel_repeats),
                 "--cold-mib", str(args.kernel_cold_mib), "--json", str(path)])
    return path
