"""CUDA mode of the kernel benchmark (``gqsa bench kernel --device cuda``): the Triton backends of
``gqsa::linear`` against cuBLAS, torch's int4 kernel, 2:4 semi-structured sparsity and a dense W2 of our own format.

    gqsa bench kernel --device cuda --shapes 7b,13b --batch 1,4,16 --sparsity 0.3,0.5,0.7 \
        --json out.json --markdown out.md

Candidates, per (out, in) shape:

* ``torch-fp16``, ``torch-bf16``: ``F.linear`` (cuBLAS); ``torch-fp16`` is the baseline of ``speedup_vs_fp16``.
* ``torch-int4-g128``: torch's int4 CUDA kernel (``_convert_weight_to_int4pack`` + ``_weight_int4pack_mm``),
  dense W4 with groups of 128, bf16 activations.
* ``gqsa-triton-w2g64``, ``gqsa-triton-w2g128``: dense W2 (sparsity 0, 2 bits, groups of 64 / 128) in our format
  through the ``triton`` backend: a W2 kernel of the same design as ours.
* ``torch-2of4-fp16``: an fp16 weight pruned 2:4 by magnitude, ``torch.sparse.to_sparse_semi_structured``
  (cuSPARSELt, or CUTLASS where torch has no cuSPARSELt) through ``F.linear``.
* for every ``--sparsity`` s (tag ``-s50`` for 0.5), W{--bits} with groups of --group-size: ``gqsa-triton-s50``
  (task-centric split) and ``gqsa-triton-rowsplit-s50`` (rows split evenly: data-centric) on a mask pruning
  every group independently, and ``gqsa-triton-uneven-s50`` / ``gqsa-triton-rowsplit-uneven-s50`` on a mask
  whose first half of the rows keeps many more groups than the second half (``uneven_group_mask``), with the
  same overall sparsity: the case where splitting rows evenly leaves some programs with far more work.
* ``gqsa-triton-a8-s50``, only where gqsa.ops offers the approximate ``triton-a8`` backend (int8 activations;
  ``a8_available``): the random-rows weight of ``gqsa-triton-s50`` through that backend.

Activations are fp16 except for the bf16 candidates. Timing: after a warm-up pass over the weight copies (which
also compiles the Triton kernels), a CUDA graph of ``calls`` calls (a multiple of the copies, at least
``--min-calls``) is captured per candidate and batch, and every repeat replays it between two CUDA events, so
the times are those of the kernels, without Python's launch overhead (``--no-cuda-graphs``: the calls as
launched from Python; a candidate whose capture fails is timed that way, with a note). Weight copies are cycled
so that every call reads its weight from HBM (``--cold-mib``, default 4 x the L2 cache, at least 256 MiB).

Memory bandwidth: ``hbm_read_gb_per_s`` is the bytes of a 1 GiB (at least 8 x L2) float32 tensor over the best
time of ``torch.sum`` on it (a pure read); every candidate's ``bandwidth_pct`` is its weight bytes per second as a
percentage of that. ``hbm_copy_gb_per_s`` (bytes read + written by a device-to-device copy) is reported too.

The targets of the issue (W4S50 at batch 1: >= 1.26x dense W2, >= 2.35x 2:4 fp16, >= 4x cuBLAS fp16, >= 75% of
the HBM bandwidth on the 7B MLP shapes; the task-centric split faster than the row split on uneven rows) are
computed from the measurements by ``target_ratios`` and reported in a section of their own, with the ``triton-a8``
candidate's speedups over cuBLAS fp16 and torch's int4 (reported, not judged) where it was measured.

Everything CUDA-specific is used lazily: these modules import on a CPU-only machine, and ``bench_shape`` also
runs on CPU tensors (the Triton candidates under ``TRITON_INTERPRET=1``), which is how the tests check it without a
GPU.

Files: kernel_cuda (this one: the run, its targets and its report), kernel_cuda_candidates (the candidates and
the weights and masks they are built from) and kernel_cuda_timing (CUDA-graph and event timing, the HBM
bandwidth, every candidate measured on one shape).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import platform

import torch

from benchmarks.bench.kernel_common import (
    MIB,
    format_table,
    git_revision,
    settings_dict,
    shapes_of,
    sparsity_tag,
    sparsity_text,
    write_outputs,
)
from benchmarks.bench.kernel_cuda_candidates import (
    A8_BACKEND,
    BASELINE,
    INT4,
    INT4_GROUP_SIZE,
    SEMI_STRUCTURED,
    W2_GROUP_SIZES,
)
from benchmarks.bench.kernel_cuda_timing import SPEEDUP_KEY, bench_shape, hbm_gb_per_s
from gqsa.ops import gpu

logger = logging.getLogger(__name__)

COLD_MIN_MIB = 256
COLD_L2_FACTOR = 4
HBM_PROBE_MIN_BYTES = 1 << 30
MLP_7B = ("11008x4096", "4096x11008")  # the shapes on which the bandwidth target is judged
# The targets for W4S50 at batch 1: speedups over dense W2, 2:4 fp16 and cuBLAS fp16, % of HBM bandwidth.
TARGET_W2 = 1.26
TARGET_2OF4 = 2.35
TARGET_FP16 = 4.0
TARGET_BANDWIDTH_PCT = 75.0


class DeviceUnavailable(RuntimeError):
    """The CUDA benchmark cannot run here (no CUDA device, or no triton)."""


def require_cuda() -> torch.device:
    """The current CUDA device, after checking that the benchmark can run on it.

    Raises:
        DeviceUnavailable: no CUDA device visible to torch, or triton not installed.
    """
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise DeviceUnavailable(f"--device cuda needs a CUDA GPU, but torch {torch.__version__} has none ({why}; "
                                "torch.cuda.is_available() is False)")
    if not gpu.available():
        raise DeviceUnavailable("--device cuda needs triton for the gqsa candidates, and it is not installed")
    return torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------------------------------------------------ targets


def target_ratios(rows: list[dict], bits: int = 4, sparsity: float = 0.5, batch: int = 1) -> list[dict]:
    """The issue's targets for W{bits}S{sparsity} at ``batch``, on every measured shape; where the approximate
    ``triton-a8`` candidate was measured, its speedups over cuBLAS fp16 and torch int4 too (threshold None).

    Returns:
        One dict per (shape, target): ``value`` (a speedup: the other candidate's median over ours, or ``%`` of
        the HBM bandwidth; None where a candidate was not measured), ``threshold`` (None: reported, not judged)
        and ``met`` (value >= threshold, or None).
    """
    tag = sparsity_tag(sparsity)
    label = f"W{bits}S{round(sparsity * 100)}"
    ours = f"gqsa-triton{tag}"
    by = {(r["shape"], r["batch"], r["candidate"]): r for r in rows}
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows if r["batch"] == batch):

        def ratio(slow: str, fast: str) -> float | None:
            a, b = by.get((shape, batch, slow)), by.get((shape, batch, fast))
            return None if a is None or b is None else a["median_ms"] / b["median_ms"]

        def add(target: str, value: float | None, threshold: float | None, unit: str = "x") -> None:
            met = None if value is None or threshold is None else value >= threshold
            out.append({"shape": shape, "batch": batch, "target": target, "value": value, "unit": unit,
                        "threshold": threshold, "met": met})

        for gs in W2_GROUP_SIZES:
            add(f"{label} vs dense W2 g{gs}", ratio(f"gqsa-triton-w2g{gs}", ours), TARGET_W2)
        add(f"{label} vs 2:4 fp16", ratio(SEMI_STRUCTURED, ours), TARGET_2OF4)
        add(f"{label} vs cuBLAS fp16", ratio(BASELINE, ours), TARGET_FP16)
        mine = by.get((shape, batch, ours))
        add(f"{label} % of HBM read bandwidth", None if mine is None else mine["bandwidth_pct"],
            TARGET_BANDWIDTH_PCT if shape in MLP_7B else None, "%")
        add(f"{label} task-centric vs row split, uneven rows",
            ratio(f"gqsa-triton-rowsplit-uneven{tag}", f"gqsa-triton-uneven{tag}"), 1.0)
        add(f"{label} task-centric vs row split, random rows", ratio(f"gqsa-triton-rowsplit{tag}", ours), None)
        a8 = f"gqsa-{A8_BACKEND}{tag}"
        if (shape, batch, a8) in by:  # approximate (int8 activations): its speedups are reported, not judged
            add(f"{label} {A8_BACKEND} vs cuBLAS fp16", ratio(BASELINE, a8), None)
            add(f"{label} {A8_BACKEND} vs torch int4 g{INT4_GROUP_SIZE}", ratio(INT4, a8), None)
    return out


def format_targets(targets: list[dict]) -> str:
    """Markdown table of ``target_ratios``, with a count of the judged targets met."""
    lines = ["| shape (out x in) | batch | target | value | target value | met |", "|---|---:|---|---:|---:|---|"]
    for t in targets:
        fmt = "{:.0f}%" if t["unit"] == "%" else "{:.2f}x"
        value = "n/a" if t["value"] is None else fmt.format(t["value"])
        threshold = "-" if t["threshold"] is None else ">= " + fmt.format(t["threshold"])
        met = {None: "-", True: "yes", False: "no"}[t["met"]]
        lines.append(f"| {t['shape']} | {t['batch']} | {t['target']} | {value} | {threshold} | {met} |")
    judged = [t for t in targets if t["met"] is not None]
    lines.append(f"\n{sum(t['met'] for t in judged)} of {len(judged)} judged targets met.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device, read_gb_s: float, copy_gb_s: float) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {
        "device": props.name, "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None), "memory_bytes": props.total_memory,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "git_revision": git_revision(), "host_machine": platform.machine(),
        "hbm_read_gb_per_s": read_gb_s, "hbm_copy_gb_per_s": copy_gb_s,
    }


def default_cold_mib(device: torch.device) -> int:
    """COLD_L2_FACTOR x the L2 cache of ``device`` in MiB, at least COLD_MIN_MIB."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return max(COLD_MIN_MIB, math.ceil(COLD_L2_FACTOR * l2 / MIB))


def main(args: argparse.Namespace) -> int:
    """The CUDA benchmark for parsed arguments of kernel.py (``--device cuda``).

    Raises:
        DeviceUnavailable: see ``require_cuda``.
    """
    device = require_cuda()
    if args.cold_mib is None:
        args.cold_mib = default_cold_mib(device)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    read_bw, copy_bw = hbm_gb_per_s(device, max(HBM_PROBE_MIN_BYTES, 8 * l2))
    info = machine_info(device, read_bw, copy_bw)
    notes: list[str] = list(args.note)
    rows = []
    for shape in shapes_of(args.shapes):
        logger.info("shape %dx%d", *shape)
        rows.extend(bench_shape(shape, args, read_bw, notes, device))
    timing = "CUDA graphs of the calls" if args.cuda_graphs else "calls launched from Python"
    settings = (f"shapes {args.shapes}, W{args.bits} group {args.group_size}, sparsity {sparsity_text(args)}, "
                f"{args.repeats} repeats of at least {args.min_calls} calls ({timing}), cold weights "
                f"({args.cold_mib} MiB of copies per candidate); fp16 activations (bf16 for torch-bf16 and int4)")
    l2_text = "?" if info["l2_cache_bytes"] is None else f"{info['l2_cache_bytes'] / MIB:.0f} MiB"
    header = (f"{info['device']} (sm {info['capability']}, {info['sm_count']} SMs, L2 {l2_text}), torch "
              f"{info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, gqsa {info['git_revision']}; "
              f"HBM read {read_bw:.0f} GB/s (copy {copy_bw:.0f} GB/s)")
    body = format_table(rows, SPEEDUP_KEY, "HBM")
    targets: list[dict] = []
    if 0.5 in args.sparsity:
        targets = target_ratios(rows, args.bits, 0.5, 1)
        body += f"\n\n## Targets (batch 1, W{args.bits}S50)\n\n" + format_targets(targets)
    report = {"machine": info, "settings": settings_dict(args), "notes": notes, "measurements": rows,
              "targets": targets}
    write_outputs(args, "gqsa CUDA kernel benchmark", header, settings, body, notes, report)
    return 0
