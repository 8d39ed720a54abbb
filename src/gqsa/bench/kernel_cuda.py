"""CUDA mode of the kernel benchmark (``python -m gqsa.bench.kernel --device cuda``): the Triton backends of
``gqsa::linear`` against cuBLAS, torch's int4 kernel, 2:4 semi-structured sparsity and a dense W2 of our own format.

    python -m gqsa.bench.kernel --device cuda --shapes 7b,13b --batch 1,4,16 --sparsity 0.3,0.5,0.7 \
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

Everything CUDA-specific is used lazily: this module imports on a CPU-only machine, and ``bench_shape`` also runs
on CPU tensors (the Triton candidates under ``TRITON_INTERPRET=1``), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gqsa.bench.kernel_common import (
    MIB,
    Candidate,
    copies_needed,
    format_table,
    git_revision,
    int4_codes_and_scales,
    interleaved_times,
    measurement_row,
    packed_copies,
    random_group_mask,
    settings_dict,
    shapes_of,
    sparsity_text,
    sparsity_tag,
    write_outputs,
)
from gqsa.format import quantize_to_packed
from gqsa.ops import available_backends, gpu, packed_linear

logger = logging.getLogger(__name__)

BASELINE = "torch-fp16"
SPEEDUP_KEY = "speedup_vs_fp16"
INT4_GROUP_SIZE = 128
W2_GROUP_SIZES = (64, 128)
SEMI_STRUCTURED = "torch-2of4-fp16"
INT4 = f"torch-int4-g{INT4_GROUP_SIZE}"
A8_BACKEND = "triton-a8"  # approximate (int8 activations): measured only where gqsa.ops offers it
SPLITS = {"triton": "task", "triton-rowsplit": "rows"}  # how each backend's decode kernel splits the work
A8_NOTE = (f"gqsa-{A8_BACKEND} (int8 activations, approximate): its weight bytes, GB/s and % of bandwidth count the "
           "packed format's bytes; the backend reads a layout of its own, prepared once per weight copy")
COLD_MIN_MIB = 256
COLD_L2_FACTOR = 4
HBM_PROBE_MIN_BYTES = 1 << 30
UNEVEN_SPREAD = 0.8  # uneven rows keep density d +- UNEVEN_SPREAD * min(d, 1 - d): 90% / 10% of groups at d = 0.5
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


# ------------------------------------------------------------------------------------------------ weights


def rows_with_counts(counts: torch.Tensor, g_count: int, seed: int = 0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, G) bool keep-mask whose row r keeps exactly ``counts[r]`` groups, at random columns.

    Args:
        counts: (N,) integer, each in [0, G].
    """
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(counts), g_count, generator=gen).to(device)  # (N, G)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (N, G): a random permutation of 0..G-1 per row
    return ranks < counts.to(device)[:, None]


def uneven_row_counts(n_out: int, g_count: int, sparsity: float) -> torch.Tensor:
    """(N,) int64 kept groups per row: the first N // 2 rows keep ``d + spread`` of their groups, the others
    share what is left of ``round(d * N * G)`` as evenly as possible (counts differing by at most one), for
    density d = 1 - sparsity and spread = UNEVEN_SPREAD * min(d, 1 - d)."""
    d = 1.0 - sparsity
    spread = UNEVEN_SPREAD * min(d, 1.0 - d)
    total = round(d * n_out * g_count)
    heavy, light = n_out // 2, n_out - n_out // 2
    k_heavy = min(g_count, round((d + spread) * g_count))
    rest = total - heavy * k_heavy
    base, extra = divmod(rest, light)
    if base < 0 or base + (extra > 0) > g_count:
        raise ValueError(f"cannot spread {total} kept groups over {n_out} rows of {g_count} groups unevenly")
    counts = torch.full((n_out,), base, dtype=torch.int64)
    counts[:heavy] = k_heavy
    counts[heavy:heavy + extra] += 1
    return counts


def uneven_group_mask(n_out: int, g_count: int, sparsity: float, seed: int = 0,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, G) bool keep-mask with ``uneven_row_counts`` kept groups per row, at random columns. The heavy rows
    form one contiguous block, as an even split of the rows then gives its programs the most uneven work."""
    return rows_with_counts(uneven_row_counts(n_out, g_count, sparsity), g_count, seed, device)


def prune_2of4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (N, K), K a multiple of 4, with the two smallest-magnitude values of every 4 along K zeroed."""
    n_out, k = weight.shape
    quads = weight.reshape(n_out, k // 4, 4)  # (N, K/4, 4)
    keep = torch.zeros_like(quads, dtype=torch.bool).scatter_(-1, quads.abs().topk(2, dim=-1).indices, True)
    return (quads * keep).reshape(n_out, k)


# ------------------------------------------------------------------------------------------------ candidates


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _skip(notes: list[str], name: str, shape: tuple[int, ...], exc: BaseException) -> None:
    notes.append(f"{name} skipped for {shape[0]}x{shape[1]}: {type(exc).__name__}: {_first_line(exc)}")


def dense_candidates(weight: torch.Tensor, cold_bytes: int) -> list[Candidate]:
    """cuBLAS fp16 and bf16 (``F.linear``) on ``weight`` (N, K) cast to each."""
    out = []
    for name, dtype in ((BASELINE, torch.float16), ("torch-bf16", torch.bfloat16)):
        w = weight.to(dtype)
        n = copies_needed(w.nbytes, cold_bytes)
        ws = [w.clone() for _ in range(n)]
        out.append(Candidate(name, lambda i, x, ws=ws: F.linear(x, ws[i]), n, w.nbytes, dtype,
                             {"bits": 16, "sparsity": 0.0}))
    return out


def pack_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (N, K) packed for torch's int4 CUDA kernel (tinygemm), on the weight's device: asymmetric
    min-max int4 codes in groups of ``group_size`` along K (``int4_codes_and_scales``), as (N, K / 2) uint8 (even
    column in the high nibble) through ``_convert_weight_to_int4pack(w, inner_k_tiles)``.

    Returns:
        (packed, scales_and_zeros (K / group_size, N, 2) bf16) for ``_weight_int4pack_mm(x bf16 (M, K), packed,
        group_size, scales_and_zeros)``, which gives (M, N) bf16.

    Raises:
        ValueError: K not a multiple of ``group_size`` or of 32; whatever torch raises where it has no such
            kernel for this build or device.
    """
    k = weight.shape[1]
    if k % group_size:
        raise ValueError(f"in_features is not a multiple of {group_size}")
    inner = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
    if inner is None:
        raise ValueError("in_features is not a multiple of 32")
    codes, szs = int4_codes_and_scales(weight, group_size)  # (N, K) int32, (K/gs, N, 2) bf16
    nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (N, K/2)
    return torch.ops.aten._convert_weight_to_int4pack(nibbles, inner), szs


def int4_candidate(weight: torch.Tensor, cold_bytes: int, notes: list[str],
                   group_size: int = INT4_GROUP_SIZE) -> list[Candidate]:
    """torch's int4 CUDA kernel (tinygemm) on ``weight`` packed by ``pack_int4``. Skipped with a note where it
    raises."""
    name = f"torch-int4-g{group_size}"
    k = weight.shape[1]
    try:
        packed, szs = pack_int4(weight, group_size)
        torch.ops.aten._weight_int4pack_mm(torch.zeros(1, k, dtype=torch.bfloat16, device=weight.device), packed,
                                           group_size, szs)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available for this torch, device or shape"
        _skip(notes, name, weight.shape, exc)
        return []
    nbytes = packed.nbytes + szs.nbytes
    n = copies_needed(nbytes, cold_bytes)
    copies = [(packed, szs)] + [(packed.clone(), szs.clone()) for _ in range(n - 1)]

    def run(i, x):
        return torch.ops.aten._weight_int4pack_mm(x, copies[i][0], group_size, copies[i][1])

    return [Candidate(name, run, n, nbytes, torch.bfloat16, {"bits": 4, "sparsity": 0.0, "group_size": group_size})]


def semi_structured_candidate(weight: torch.Tensor, cold_bytes: int, notes: list[str]) -> list[Candidate]:
    """2:4 fp16 through ``to_sparse_semi_structured`` and ``F.linear``. Its weight bytes are nominal: the kept
    half of the fp16 values plus 4 bits of indices per 4 values (N * K * 9 / 8), what any 2:4 kernel reads."""
    n_out, k = weight.shape
    try:
        from torch.sparse import to_sparse_semi_structured

        w = prune_2of4(weight).to(torch.float16)
        nbytes = n_out * k * 9 // 8
        n = copies_needed(nbytes, cold_bytes)
        ws = [to_sparse_semi_structured(w) for _ in range(n)]
        F.linear(torch.zeros(1, k, dtype=torch.float16, device=weight.device), ws[0])
    except Exception as exc:  # noqa: BLE001 - any failure means "not available for this torch, device or shape"
        _skip(notes, SEMI_STRUCTURED, weight.shape, exc)
        return []
    kind = f"{SEMI_STRUCTURED} runs as {type(ws[0]).__name__}"
    if kind not in notes:
        notes.append(kind)
    return [Candidate(SEMI_STRUCTURED, lambda i, x: F.linear(x, ws[i]), n, nbytes, torch.float16,
                      {"bits": 16, "sparsity": 0.5})]


def gqsa_candidates(weight: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int, cold_bytes: int,
                    names: dict[str, str], info: dict) -> list[Candidate]:
    """Our format (``mask`` (N, G) kept groups of ``weight`` (N, K), quantized to ``bits``) through each backend
    of ``names`` ({backend: candidate name}); the candidates share one set of weight copies."""
    packed = quantize_to_packed(weight, mask.to(weight.device), bits, group_size)
    n = copies_needed(packed.nbytes(), cold_bytes)
    copies = packed_copies(packed, n)
    info = info | {"bits": bits, "group_size": group_size, "sparsity": packed.sparsity}
    return [Candidate(name, lambda i, x, b=backend: packed_linear(x, copies[i], backend=b), n, packed.nbytes(),
                      torch.float16, info | {"split": SPLITS.get(backend), "backend": backend})
            for backend, name in names.items()]


def a8_available() -> bool:
    """Whether gqsa.ops offers the approximate ``triton-a8`` backend (int8 activations) for CUDA tensors here."""
    return A8_BACKEND in available_backends("cuda", approximate=True, named_only=True)


def w2_candidates(weight: torch.Tensor, cold_bytes: int, notes: list[str]) -> list[Candidate]:
    """Dense W2 (every group kept) in our format with groups of 64 and 128, task-centric Triton backend."""
    n_out, k = weight.shape
    out = []
    for gs in W2_GROUP_SIZES:
        name = f"gqsa-triton-w2g{gs}"
        if k % gs:
            notes.append(f"{name} skipped for {n_out}x{k}: in_features not a multiple of {gs}")
            continue
        mask = torch.ones(n_out, k // gs, dtype=torch.bool)
        out += gqsa_candidates(weight, mask, 2, gs, cold_bytes, {"triton": name}, {"rows": "dense"})
    return out


def sparse_candidates(weight: torch.Tensor, args: argparse.Namespace, cold_bytes: int) -> list[Candidate]:
    """W{bits}S{s} for every ``args.sparsity``: both splits on random rows (and ``triton-a8`` where
    ``a8_available``, on the same weight copies), then both splits on uneven rows."""
    n_out, k = weight.shape
    g_count = k // args.group_size
    a8 = a8_available()
    out = []
    for s in args.sparsity:
        tag = sparsity_tag(s)
        for rows, mask in (("random", random_group_mask(n_out, g_count, s)),
                           ("uneven", uneven_group_mask(n_out, g_count, s, device=weight.device))):
            middle = "" if rows == "random" else "-uneven"
            names = {"triton": f"gqsa-triton{middle}{tag}", "triton-rowsplit": f"gqsa-triton-rowsplit{middle}{tag}"}
            if a8 and rows == "random":
                names[A8_BACKEND] = f"gqsa-{A8_BACKEND}{tag}"
            out += gqsa_candidates(weight, mask, args.bits, args.group_size, cold_bytes, names, {"rows": rows})
    return out


def all_candidates(weight: torch.Tensor, args: argparse.Namespace, cold_bytes: int,
                   notes: list[str]) -> list[Candidate]:
    """Every candidate on ``weight`` (N, K), baselines first."""
    sparse = sparse_candidates(weight, args, cold_bytes)
    if any(c.info["backend"] == A8_BACKEND for c in sparse) and A8_NOTE not in notes:
        notes.append(A8_NOTE)
    return [*dense_candidates(weight, cold_bytes), *int4_candidate(weight, cold_bytes, notes),
            *w2_candidates(weight, cold_bytes, notes), *semi_structured_candidate(weight, cold_bytes, notes),
            *sparse]


# ------------------------------------------------------------------------------------------------ timing


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
            notes.append(f"{c.name}: CUDA graph capture failed ({type(exc).__name__}: {_first_line(exc)}); "
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
    del src, dst
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
                _skip(notes, f"{c.name} (batch {batch})", shape, exc)
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
    """The CUDA benchmark for parsed arguments of gqsa.bench.kernel (``--device cuda``).

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
