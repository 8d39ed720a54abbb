"""Kernel benchmark: ``gqsa::linear`` against torch's dense, quantized and sparse linears, on CPU or on CUDA.

    gqsa bench kernel --shapes default-model --batch 1,4,16 --sparsity 0.5 --bits 4 --group-size 16 \
        --repeats 20 --json out.json --markdown out.md
    gqsa bench kernel --device cuda --shapes 7b,13b --batch 1,4,16 --sparsity 0.3,0.5,0.7 \
        --json out.json --markdown out.md

(from a source checkout: ``gqsa bench`` runs this file from the repository's benchmarks/ directory; without the
``gqsa`` command, ``PYTHONPATH=src python -m benchmarks.bench.kernel ...`` from the repository root does the same).

On CPU (the default) the candidates are torch's fp32 and bf16 linears, its dynamic int8 linear, its int4 CPU
kernel and the native "cpu", "cpu-rowsplit" and "cpu-a8" backends of ``gqsa::linear``. ``--device cuda`` measures
the Triton backends against cuBLAS, torch's int4 kernel, 2:4 semi-structured sparsity and dense W2: see
kernel_cuda.py (the run and its report), kernel_cuda_candidates.py and kernel_cuda_timing.py.

Candidates are interleaved (round robin inside each repeat) and run on cold weights: every candidate cycles
through enough copies of its weight to exceed the last-level cache (``--cold-mib``: 64 MiB on CPU; on CUDA four
times the L2, at least 256 MiB), so every call streams its weight from memory, as a decoder layer does during
generation. The memory read bandwidth (DRAM, or HBM on CUDA) is measured in the same run and every candidate's
weight bytes per second are reported as a percentage of it. Times are medians per call; ``speedup_vs_fp32`` (CPU)
or ``speedup_vs_fp16`` (CUDA) is the dense baseline's median over the candidate's, for the same shape and batch.
``--sparsity`` takes a comma-separated list: with several values every GQSA candidate is measured at each, its name
ending in ``-s<percent>`` (with one value on CPU the names carry no suffix).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench.kernel_common import (
    Candidate,
    copies_needed,
    DEVICE_DEFAULTS,
    format_table,
    git_revision,
    int4_codes_and_scales,
    INT4_GROUP_SIZES,
    interleaved_times,
    measurement_row,
    MIB,
    packed_copies,
    random_group_mask,
    settings_dict,
    SHAPES,
    shapes_of,
    sparsity_tag,
    sparsity_text,
    write_outputs,
)
from gqsa.format import quantize_to_packed
from gqsa.ops import available_backends, packed_linear

def _dense_candidates(weight: torch.Tensor, cold_bytes: int) -> list[Candidate]:
    out = []
    for name, dtype in (("torch-fp32", torch.float32), ("torch-bf16", torch.bfloat16)):
        w = weight.to(dtype)
        n = copies_needed(w.nbytes, cold_bytes)
        ws = [w.clone() for _ in range(n)]
        out.append(Candidate(name, lambda i, x, ws=ws: F.linear(x, ws[i]), n, w.nbytes, dtype))
    return out


def _int8_candidate(weight: torch.Tensor, cold_bytes: int, notes: list[str]) -> list[Candidate]:
    """torch.ao dynamic int8 linear (per-tensor int8 weight, activations quantized per call)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
            from torch.ao.quantization import quantize_dynamic

            def make():
                lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                lin.weight.data.copy_(weight)
                return quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)

            n = copies_needed(weight.numel(), cold_bytes)
            mods = [make() for _ in range(n)]
    except Exception as exc:  # noqa: BLE001 - any failure means "not available in this torch"
        notes.append(f"torch-int8-dynamic skipped: {type(exc).__name__}: {exc}")
        return []
    return [Candidate("torch-int8-dynamic", lambda i, x: mods[i](x), n, weight.numel())]


def _int4_candidates(weight: torch.Tensor, cold_bytes: int, notes: list[str]) -> list[Candidate]:
    """torch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``), bf16 activations, groups of 32 and 128."""
    out = []
    n_out, k = weight.shape
    for gs in INT4_GROUP_SIZES:
        if k % gs:
            notes.append(f"torch-int4-g{gs} skipped for {n_out}x{k}: in_features not a multiple of {gs}")
            continue
        try:
            codes, szs = int4_codes_and_scales(weight, gs)  # (N, K), (K/gs, N, 2)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            nbytes = packed.nbytes + szs.nbytes
            n = copies_needed(nbytes, cold_bytes)
            copies = [(packed.clone(), szs.clone()) for _ in range(n)]
            torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, k, dtype=torch.bfloat16), packed, gs, szs)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            notes.append(f"torch-int4-g{gs} skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue

        def run(i, x, copies=copies, gs=gs):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, copies[i][0], gs, copies[i][1])

        out.append(Candidate(f"torch-int4-g{gs}", run, n, nbytes, torch.bfloat16))
    return out


def _gqsa_candidates(weight: torch.Tensor, args: argparse.Namespace, sparsity: float, suffix: str, cold_bytes: int,
                     notes: list[str]) -> list[Candidate]:
    n_out, k = weight.shape
    mask = random_group_mask(n_out, k // args.group_size, sparsity)  # (N, G), unstructured over groups
    packed = quantize_to_packed(weight, mask, args.bits, args.group_size)
    n = copies_needed(packed.nbytes(), cold_bytes)
    copies = packed_copies(packed, n)
    usable = available_backends("cpu", approximate=True)
    out = []
    for backend in ("cpu", "cpu-rowsplit", "cpu-a8"):
        if backend not in usable:
            notes.append(f"gqsa-{backend} skipped: the native extension is not built")
            continue
        out.append(Candidate(f"gqsa-{backend}{suffix}",
                             lambda i, x, b=backend: packed_linear(x, copies[i], backend=b), n, packed.nbytes()))
    if "cpu" in usable:  # the same kernel without the op's dispatch and argument checks
        from gqsa.ops.cpu import native_linear

        def direct(i, x):
            c = copies[i]
            return native_linear(x, c.crow_indices, c.col_indices, c.values, c.scale, c.zero_point, None, n_out, k,
                                 args.group_size, args.bits)

        out.append(Candidate(f"gqsa-cpu-kernel-only{suffix}", direct, n, packed.nbytes()))
    return out


def dram_read_gb_per_s(nbytes: int = 256 * MIB, repeats: int = 5) -> float:
    """Read bandwidth of a large float32 sum (torch's threads), best of ``repeats``, in GB/s (1e9 bytes)."""
    t = torch.ones(nbytes // 4)
    t.sum()
    best = min(_timed(lambda: t.sum()) for _ in range(repeats))
    return nbytes / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_shape(shape: tuple[int, int], args: argparse.Namespace, bandwidth: float, notes: list[str]) -> list[dict]:
    """Every CPU candidate on one (out, in) shape and every batch, interleaved; one dict per (candidate, batch)."""
    n_out, k = shape
    weight = torch.randn(n_out, k, generator=torch.Generator().manual_seed(1)) * 0.02  # (N, K)
    cold = args.cold_mib * MIB
    candidates = [*_dense_candidates(weight, cold), *_int8_candidate(weight, cold, notes),
                  *_int4_candidates(weight, cold, notes)]
    for s in args.sparsity:
        suffix = sparsity_tag(s) if len(args.sparsity) > 1 else ""
        candidates += _gqsa_candidates(weight, args, s, suffix, cold, notes)
    rows = []
    for batch in args.batch:
        xs = {c.name: torch.randn(batch, k).to(c.x_dtype) for c in candidates}
        for c in candidates:  # warm-up: one pass over the copies
            for i in range(c.copies):
                c.run(i, xs[c.name])

        def timer(c: Candidate) -> Callable[[], float]:
            calls = max(c.copies, args.min_calls)
            x = xs[c.name]
            return lambda: _timed(lambda: [c.run(i % c.copies, x) for i in range(calls)]) / calls

        times = interleaved_times(candidates, {c.name: timer(c) for c in candidates}, args.repeats)
        fp32 = statistics.median(times["torch-fp32"])
        for c in candidates:
            row = measurement_row(c, shape, batch, times[c.name], fp32, bandwidth, "speedup_vs_fp32")
            rows.append(row | {"threads": torch.get_num_threads()})
    return rows


def machine_info(bandwidth: float) -> dict:
    from gqsa.ops import cpu as cpu_kernels

    return {
        "machine": platform.machine(), "processor": _cpu_model(), "cpus": torch.get_num_threads(),
        "torch": torch.__version__, "git_revision": git_revision(), "gqsa_isa": cpu_kernels.isa(),
        "dram_read_gb_per_s": bandwidth,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------ arguments


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _sparsity_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every sparsity must be in [0, 1), got {text!r}")
    return list(dict.fromkeys(values))


def _shape_names(text: str) -> str:
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in SHAPES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown or text!r}; choose from {', '.join(sorted(SHAPES))}")
    return ",".join(names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gqsa bench kernel", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    p.add_argument("--shapes", type=_shape_names, default="default-model",
                   help=f"comma-separated names among {', '.join(sorted(SHAPES))}")
    p.add_argument("--batch", type=_int_list, default=[1, 4, 16], help="comma-separated rows of x")
    p.add_argument("--sparsity", type=_sparsity_list, default=[0.5],
                   help="fraction of groups pruned; comma-separated for several")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--repeats", type=int, help="timed rounds over the candidates (default: 10 CPU, 30 CUDA)")
    p.add_argument("--min-calls", type=int, help="calls timed together per candidate and repeat (default: 4 CPU, "
                   "20 CUDA; at least the number of weight copies)")
    p.add_argument("--cold-mib", type=int, help="bytes of weight copies cycled per candidate (default: 64 on CPU; "
                   "on CUDA 4 x the L2 cache, at least 256)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="CUDA: time the calls as launched from Python instead of replaying a CUDA graph of them")
    p.add_argument("--json", type=Path, help="write {'machine': ..., 'measurements': [...]} here")
    p.add_argument("--markdown", type=Path, help="write the machine description and the table here")
    p.add_argument("--note", action="append", default=[], help="a line about the conditions (repeatable)")
    args = p.parse_args(argv)
    for name, default in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("repeats", "min_calls", "cold_mib"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        from benchmarks.bench import kernel_cuda

        try:
            return kernel_cuda.main(args)
        except kernel_cuda.DeviceUnavailable as exc:
            print(f"kernel benchmark: error: {exc}", file=sys.stderr)
            return 2
    bandwidth = dram_read_gb_per_s()
    info = machine_info(bandwidth)
    notes: list[str] = list(args.note)
    rows = []
    for shape in shapes_of(args.shapes):
        rows.extend(bench_shape(shape, args, bandwidth, notes))
    settings = (f"shapes {args.shapes}, W{args.bits} group {args.group_size}, sparsity {sparsity_text(args)}, "
                f"{args.repeats} repeats, cold weights ({args.cold_mib} MiB of copies per candidate)")
    header = (f"{info['processor']}, {info['cpus']} threads, torch {info['torch']}, gqsa {info['git_revision']} "
              f"(kernel isa {info['gqsa_isa']}); DRAM read {bandwidth:.1f} GB/s")
    report = {"machine": info, "settings": settings_dict(args), "notes": notes, "measurements": rows}
    write_outputs(args, "gqsa CPU kernel benchmark", header, settings, format_table(rows), notes, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
