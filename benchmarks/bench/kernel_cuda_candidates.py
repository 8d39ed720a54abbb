"""The candidates of the CUDA kernel benchmark (kernel_cuda.py says what each one is): the weights and masks they
are built from (uneven rows, 2:4 pruning, torch's int4 packing) and the candidates themselves, each cycling
through enough weight copies to read its weight from HBM on every call."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.bench.kernel_common import (
    Candidate,
    copies_needed,
    int4_codes_and_scales,
    packed_copies,
    random_group_mask,
    sparsity_tag,
)
from gqsa.format import quantize_to_packed
from gqsa.ops import available_backends, packed_linear

BASELINE = "torch-fp16"
INT4_GROUP_SIZE = 128
W2_GROUP_SIZES = (64, 128)
SEMI_STRUCTURED = "torch-2of4-fp16"
INT4 = f"torch-int4-g{INT4_GROUP_SIZE}"
A8_BACKEND = "triton-a8"  # approximate (int8 activations): measured only where gqsa.ops offers it
SPLITS = {"triton": "task", "triton-rowsplit": "rows"}  # how each backend's decode kernel splits the work
A8_NOTE = (f"gqsa-{A8_BACKEND} (int8 activations, approximate): its weight bytes, GB/s and % of bandwidth count the "
           "packed format's bytes; the backend reads a layout of its own, prepared once per weight copy")
UNEVEN_SPREAD = 0.8  # uneven rows keep density d +- UNEVEN_SPREAD * min(d, 1 - d): 90% / 10% of groups at d = 0.5


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


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= limit else text[:limit] + "..."


def skip_note(notes: list[str], name: str, shape: tuple[int, ...], exc: BaseException) -> None:
    notes.append(f"{name} skipped for {shape[0]}x{shape[1]}: {type(exc).__name__}: {first_line(exc)}")


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
        skip_note(notes, name, weight.shape, exc)
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
        skip_note(notes, SEMI_STRUCTURED, weight.shape, exc)
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
