"""Timing of the CUDA kernel benchmark (kernel_cuda.py describes the method): a CUDA graph of a candidate's calls
replayed between two CUDA events (or the calls as launched, or wall-clock time on CPU tensors), the HBM bandwidth,
and every candidate measured on one shape."""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.bench.kernel_common import MIB, Candidate, interleaved_times, measurement_row
from benchmarks.bench.kernel_cuda_candidates import BASELINE, all_candidates, first_line, skip_note

logger = logging.getLogger(__name__)

SPEEDUP_KEY = "speedup_vs_fp16"


def calls_per_timing(copies: int, min_calls: int) -> int:
    """Calls timed together: a multiple of the copies (so that a timing starts on a weight not read for a whole
    cycle, hence not in L2), at least ``min_calls``."""
    return copies * math.ceil(min_calls / copies)


def _event_timer(launch: Callable[[], object], calls: int) -> Callable[[], float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        start.record()
        launch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls

    return timed


def prepare_timer(c: Candidate, x: torch.Tensor, calls: int, graphs: bool,
                  notes: list[str]) -> tuple[Callable[[], float], str]:
    """Warm ``c`` up (one pass over its copies) and return (a function timing ``calls`` calls on ``x`` in seconds
    per call, how: "cuda-graph", "eager" or, on CPU tensors, "wall")."""

    def run_calls():
        for i in range(calls):
            c.run(i % c.copies, x)

    if x.device.type != "cuda":
        for i in range(c.copies):
            c.run(i, x)

        def wall() -> float:
            start = time.perf_counter()
            run_calls()
            return (time.perf_counter() - start) / calls

        return wall, "wall"
    side = torch.cuda.Stream()  # warm up off the default stream, as CUDA graph capture wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(c.copies):
            c.run(i, x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if graphs:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run_calls()
            graph.replay()
            torch.cuda.synchronize()
            return _event_timer(graph.replay, calls), "cuda-graph"
        except Exception as exc:  # noqa: BLE001 - any capture failure: time the calls as launched instead
            torch.cuda.synchronize()
            notes.append(f"{c.name}: CUDA graph capture failed ({type(exc).__name__}: {first_line(exc)}); "
                         "timed as launched from Python")
    return _event_timer(run_calls, calls), "eager"


def hbm_gb_per_s(device: torch.device, nbytes: int, repeats: int = 10) -> tuple[float, float]:
    """(read, copy) bandwidth in GB/s (1e9 bytes): ``nbytes`` of float32 over the best time of ``torch.sum`` on
    them, and 2 * ``nbytes`` (read + write) over the best time of a device-to-device copy, of ``repeats``."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    read = _event_timer(lambda: src.sum(), 1)
    copy = _event_timer(lambda: dst.copy_(src), 1)
    read(), copy()
    best_read = min(read() for _ in range(repeats))
    best_copy = min(copy() for _ in range(repeats))
    src = dst = None  # frees the tensors, which the timers' closures hold, before emptying the cache
    torch.cuda.empty_cache()
    return nbytes / best_read / 1e9, 2 * nbytes / best_copy / 1e9


def bench_shape(shape: tuple[int, int], args: argparse.Namespace, bandwidth: float, notes: list[str],
                device: torch.device) -> list[dict]:
    """Every candidate on one (out, in) shape and every batch, interleaved; one dict per (candidate, batch).

    On a CPU ``device`` (tests) the Triton candidates need ``TRITON_INTERPRET=1`` and times are wall-clock.
    """
    n_out, k = shape
    gen = torch.Generator(device=device).manual_seed(1)
    weight = torch.randn(n_out, k, generator=gen, device=device) * 0.02  # (N, K)
    candidates = all_candidates(weight, args, args.cold_mib * MIB, notes)
    del weight
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, k, generator=gen, device=device)  # (M, K)
        xs = {dtype: x.to(dtype) for dtype in {c.x_dtype for c in candidates}}
        live, timers, how = [], {}, {}
        for c in candidates:
            calls = calls_per_timing(c.copies, args.min_calls)
            try:
                timers[c.name], how[c.name] = prepare_timer(c, xs[c.x_dtype], calls, args.cuda_graphs, notes)
            except Exception as exc:  # noqa: BLE001 - report the failure and measure the others
                skip_note(notes, f"{c.name} (batch {batch})", shape, exc)
                continue
            live.append(c)
        logger.info("%dx%d batch %d: timing %d candidates", n_out, k, batch, len(live))
        times = interleaved_times(live, timers, args.repeats)
        baseline = statistics.median(times[BASELINE]) if BASELINE in times else None
        for c in live:
            row = measurement_row(c, shape, batch, times[c.name], baseline, bandwidth, SPEEDUP_KEY)
            rows.append(row | {"calls": calls_per_timing(c.copies, args.min_calls), "timing": how[c.name]})
        del timers
    del candidates
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
