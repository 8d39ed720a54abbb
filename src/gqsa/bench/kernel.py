"""CPU kernel benchmark: ``gqsa::linear`` ("cpu", "cpu-rowsplit") against torch's dense and quantized linears.

    python -m gqsa.bench.kernel --shapes default-model --batch 1,4,16 --sparsity 0.5 --bits 4 --group-size 16 \
        --repeats 20 --json out.json --markdown out.md

Candidates are interleaved (round robin inside each repeat) and run on cold weights: every candidate cycles
through enough copies of its weight to exceed the last-level cache (``--cold-bytes``, default 64 MiB), so every
call streams its weight from DRAM, as a decoder layer does during generation. The DRAM read bandwidth is
measured in the same run (a sum over a large tensor) and every candidate's weight bytes per second are reported
as a percentage of it. Times are medians per call; ``speedup_vs_fp32`` is the dense fp32 median over the
candidate's, for the same shape and batch.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gqsa.format import quantize_to_packed
from gqsa.ops import available_backends, packed_linear
from gqsa.utils.io import atomic_write_text

# (out_features, in_features) of the three distinct linear shapes of each model.
SHAPES = {
    "default-model": [(576, 576), (1536, 576), (576, 1536)],  # SmolLM2-135M: q/o, gate/up, down
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],  # Llama-2-7B
    "13b": [(5120, 5120), (13824, 5120), (5120, 13824)],  # Llama-2-13B
    "tiny": [(48, 128), (32, 64)],  # smoke tests only
}
MIB = 1 << 20
INT4_GROUP_SIZES = (32, 128)


@dataclass
class Candidate:
    """One implementation on one shape: ``run(i, x)`` multiplies x by weight copy i."""

    name: str
    run: Callable[[int, torch.Tensor], torch.Tensor]
    copies: int
    weight_bytes: int  # bytes of one copy, everything the kernel reads from the weight (metadata included)
    x_dtype: torch.dtype = torch.float32


def _copies(nbytes: int, cold_bytes: int) -> int:
    """Copies needed so that cycling through them touches more than ``cold_bytes``."""
    return max(1, math.ceil(cold_bytes / max(nbytes, 1)))


def _dense_candidates(weight: torch.Tensor, cold_bytes: int) -> list[Candidate]:
    out = []
    for name, dtype in (("torch-fp32", torch.float32), ("torch-bf16", torch.bfloat16)):
        w = weight.to(dtype)
        n = _copies(w.nbytes, cold_bytes)
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

            n = _copies(weight.numel(), cold_bytes)
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
            groups = weight.reshape(n_out, k // gs, gs)  # (N, K/gs, gs)
            lo, hi = groups.amin(-1), groups.amax(-1)  # (N, K/gs)
            scale = ((hi - lo) / 15).clamp_min(1e-8)
            codes = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
            # the kernel computes (q - 8) * s + z: z = lo + 8 s
            szs = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(n_out, k), 1)
            nbytes = packed.nbytes + szs.nbytes
            n = _copies(nbytes, cold_bytes)
            copies = [(packed.clone(), szs.clone()) for _ in range(n)]
            torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, k, dtype=torch.bfloat16), packed, gs, szs)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            notes.append(f"torch-int4-g{gs} skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue

        def run(i, x, copies=copies, gs=gs):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, copies[i][0], gs, copies[i][1])

        out.append(Candidate(f"torch-int4-g{gs}", run, n, nbytes, torch.bfloat16))
    return out


def _gqsa_candidates(weight: torch.Tensor, args: argparse.Namespace, cold_bytes: int,
                     notes: list[str]) -> list[Candidate]:
    n_out, k = weight.shape
    g_count = k // args.group_size
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(n_out, g_count, generator=gen) >= args.sparsity  # (N, G), unstructured over groups
    packed = quantize_to_packed(weight, mask, args.bits, args.group_size)
    n = _copies(packed.nbytes(), cold_bytes)
    copies = [packed] + [type(packed)(**{name: None if t is None else t.clone()
                                         for name, t in packed.tensors_with_none().items()},
                                      out_features=n_out, in_features=k, group_size=args.group_size,
                                      bits=args.bits) for _ in range(n - 1)]
    usable = available_backends("cpu", approximate=True)
    out = []
    for backend in ("cpu", "cpu-rowsplit", "cpu-a8"):
        if backend not in usable:
            notes.append(f"gqsa-{backend} skipped: the native extension is not built")
            continue
        out.append(Candidate(f"gqsa-{backend}", lambda i, x, b=backend: packed_linear(x, copies[i], backend=b),
                             n, packed.nbytes()))
    if "cpu" in usable:  # the same kernel without the op's dispatch and argument checks
        from gqsa.ops.cpu import native_linear

        def direct(i, x):
            c = copies[i]
            return native_linear(x, c.crow_indices, c.col_indices, c.values, c.scale, c.zero_point, None, n_out, k,
                                 args.group_size, args.bits)

        out.append(Candidate("gqsa-cpu-kernel-only", direct, n, packed.nbytes()))
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
    """Every candidate on one (out, in) shape and every batch, interleaved; one dict per (candidate, batch)."""
    n_out, k = shape
    weight = torch.randn(n_out, k, generator=torch.Generator().manual_seed(1)) * 0.02  # (N, K)
    cold = args.cold_mib * MIB
    candidates = [*_dense_candidates(weight, cold), *_int8_candidate(weight, cold, notes),
                  *_int4_candidates(weight, cold, notes), *_gqsa_candidates(weight, args, cold, notes)]
    rows = []
    for batch in args.batch:
        xs = {c.name: torch.randn(batch, k).to(c.x_dtype) for c in candidates}
        times: dict[str, list[float]] = {c.name: [] for c in candidates}
        for c in candidates:  # warm-up: one pass over the copies
            for i in range(c.copies):
                c.run(i, xs[c.name])
        for _ in range(args.repeats):
            for c in candidates:  # round robin: every candidate once per repeat
                calls = max(c.copies, args.min_calls)
                elapsed = _timed(lambda c=c, calls=calls: [c.run(i % c.copies, xs[c.name]) for i in range(calls)])
                times[c.name].append(elapsed / calls)
        fp32 = statistics.median(times["torch-fp32"])
        for c in candidates:
            med = statistics.median(times[c.name])
            gbs = c.weight_bytes / med / 1e9
            rows.append({
                "candidate": c.name, "shape": f"{n_out}x{k}", "out_features": n_out, "in_features": k,
                "batch": batch, "median_ms": med * 1e3, "min_ms": min(times[c.name]) * 1e3,
                "weight_bytes": c.weight_bytes, "gb_per_s": gbs, "bandwidth_pct": 100.0 * gbs / bandwidth,
                "speedup_vs_fp32": fp32 / med, "copies": c.copies, "threads": torch.get_num_threads(),
            })
    return rows


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine_info(bandwidth: float) -> dict:
    from gqsa.ops import cpu as cpu_kernels

    return {
        "machine": platform.machine(), "processor": _cpu_model(), "cpus": torch.get_num_threads(),
        "torch": torch.__version__, "git_revision": _git_revision(), "gqsa_isa": cpu_kernels.isa(),
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


def format_table(rows: list[dict]) -> str:
    """Markdown table of the measurements."""
    head = "| shape (out x in) | batch | candidate | median ms | GB/s | % DRAM bw | speedup vs fp32 |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['candidate']} | {r['median_ms']:.3f} | "
                     f"{r['gb_per_s']:.1f} | {r['bandwidth_pct']:.0f} | {r['speedup_vs_fp32']:.2f} |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gqsa.bench.kernel", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="default-model")
    p.add_argument("--batch", type=_int_list, default=[1, 4, 16], help="comma-separated rows of x")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of groups pruned")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-calls", type=int, default=4, help="calls timed together per candidate and repeat")
    p.add_argument("--cold-mib", type=int, default=64, help="bytes of weight copies cycled per candidate")
    p.add_argument("--json", type=Path, help="write {'machine': ..., 'measurements': [...]} here")
    p.add_argument("--markdown", type=Path, help="write the machine description and the table here")
    p.add_argument("--note", action="append", default=[], help="a line about the conditions (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bandwidth = dram_read_gb_per_s()
    info = machine_info(bandwidth)
    notes: list[str] = list(args.note)
    rows = []
    for shape in SHAPES[args.shapes]:
        rows.extend(bench_shape(shape, args, bandwidth, notes))
    settings = (f"shapes {args.shapes}, W{args.bits} group {args.group_size}, sparsity {args.sparsity}, "
                f"{args.repeats} repeats, cold weights ({args.cold_mib} MiB of copies per candidate)")
    table = format_table(rows)
    header = (f"{info['processor']}, {info['cpus']} threads, torch {info['torch']}, gqsa {info['git_revision']} "
              f"(kernel isa {info['gqsa_isa']}); DRAM read {bandwidth:.1f} GB/s")
    print(header)
    print(settings)
    print(table)
    for note in notes:
        print(f"note: {note}")
    if args.json:
        report = {"machine": info, "settings": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)},
                  "notes": notes, "measurements": rows}
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, f"# gqsa CPU kernel benchmark\n\n{header}\n\n{settings}\n\n{table}\n\n"
                          + "".join(f"* {n}\n" for n in notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
