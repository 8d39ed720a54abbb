"""What the CPU and CUDA kernel benchmarks share (kernel.py, kernel_cuda*.py): shapes, the
candidate record, cold weight copies, interleaved timing, result rows and tables, and the outputs' writing; and
what every benchmark script shares (benchmarks/*.py): the git revision, the machine line, the results JSON and
the splicing of a generated block into a markdown document.

Both import it; neither imports the other at module level (kernel.py dispatches ``--device cuda`` lazily).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gqsa.format import PackedWeight
from gqsa.utils import jsonio
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
DEVICE_DEFAULTS = {  # per --device: repeats, calls timed together per candidate and repeat, cold MiB (None: auto)
    "cpu": {"repeats": 10, "min_calls": 4, "cold_mib": 64},
    "cuda": {"repeats": 30, "min_calls": 20, "cold_mib": None},
}


@dataclass
class Candidate:
    """One implementation on one shape: ``run(i, x)`` multiplies x by weight copy i.

    ``info`` holds what the measurement rows report about the candidate besides its name (sparsity, split, ...).
    """

    name: str
    run: Callable[[int, torch.Tensor], torch.Tensor]
    copies: int
    weight_bytes: int  # bytes of one copy, everything the kernel reads from the weight (metadata included)
    x_dtype: torch.dtype = torch.float32
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ shared helpers


def copies_needed(nbytes: int, cold_bytes: int) -> int:
    """Copies needed so that cycling through them touches more than ``cold_bytes``."""
    return max(1, math.ceil(cold_bytes / max(nbytes, 1)))


def packed_copies(packed: PackedWeight, n: int) -> list[PackedWeight]:
    """``packed`` and ``n - 1`` copies of it with their own storage (on its device)."""
    return [packed] + [PackedWeight(**{name: None if t is None else t.clone()
                                       for name, t in packed.tensors_with_none().items()},
                                    out_features=packed.out_features, in_features=packed.in_features,
                                    group_size=packed.group_size, bits=packed.bits) for _ in range(n - 1)]


def random_group_mask(n_out: int, g_count: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """(N, G) bool keep-mask, every group pruned independently with probability ``sparsity`` (CPU generator)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_out, g_count, generator=gen) >= sparsity  # (N, G)


def sparsity_tag(sparsity: float) -> str:
    """``-s50`` for 0.5: the suffix of a GQSA candidate's name."""
    return f"-s{round(sparsity * 100)}"


def int4_codes_and_scales(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max int4 codes of ``weight`` and the scales and zeros of torch's int4 kernels.

    Args:
        weight: (N, K) float, K a multiple of ``group_size``.

    Returns:
        codes (N, K) int32 in [0, 15] and scales_and_zeros (K // group_size, N, 2) bf16, for the kernels' rule
        ``w = (q - 8) * scale + zero``.
    """
    n_out, k = weight.shape
    groups = weight.float().reshape(n_out, k // group_size, group_size)  # (N, K/gs, gs)
    lo, hi = groups.amin(-1), groups.amax(-1)  # (N, K/gs)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    codes = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    szs = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # z = lo + 8 s
    return codes.reshape(n_out, k), szs


def interleaved_times(candidates: list[Candidate], timers: dict[str, Callable[[], float]],
                      repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every candidate, ``repeats`` times, round robin: every candidate once per repeat.

    ``timers[name]()`` runs the candidate's timed calls once and returns the seconds per call.
    """
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for _ in range(repeats):
        for c in candidates:
            times[c.name].append(timers[c.name]())
    return times


def measurement_row(c: Candidate, shape: tuple[int, int], batch: int, seconds: list[float],
                    baseline_median: float | None, bandwidth: float, speedup_key: str) -> dict:
    """One (candidate, shape, batch) result: median and min ms per call, weight GB/s, % of ``bandwidth`` (GB/s) and
    the speedup over ``baseline_median`` (seconds; None: no baseline measured)."""
    n_out, k = shape
    med = statistics.median(seconds)
    gbs = c.weight_bytes / med / 1e9
    return {
        "candidate": c.name, "shape": f"{n_out}x{k}", "out_features": n_out, "in_features": k, "batch": batch,
        "median_ms": med * 1e3, "min_ms": min(seconds) * 1e3, "weight_bytes": c.weight_bytes, "gb_per_s": gbs,
        "bandwidth_pct": 100.0 * gbs / bandwidth,
        speedup_key: None if baseline_median is None else baseline_median / med, "copies": c.copies, **c.info,
    }


def format_table(rows: list[dict], speedup_key: str = "speedup_vs_fp32", memory: str = "DRAM") -> str:
    """Markdown table of the measurements (``memory`` names the bandwidth they are a percentage of)."""
    baseline = speedup_key.removeprefix("speedup_vs_")
    head = f"| shape (out x in) | batch | candidate | median ms | GB/s | % {memory} bw | speedup vs {baseline} |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        speedup = "n/a" if r[speedup_key] is None else f"{r[speedup_key]:.2f}"
        lines.append(f"| {r['shape']} | {r['batch']} | {r['candidate']} | {r['median_ms']:.3f} | "
                     f"{r['gb_per_s']:.1f} | {r['bandwidth_pct']:.0f} | {speedup} |")
    return "\n".join(lines)


def settings_dict(args: argparse.Namespace) -> dict:
    """The resolved arguments for the JSON report (one sparsity as a number, as files of one sparsity have it)."""
    out = vars(args) | {"json": str(args.json), "markdown": str(args.markdown)}
    if len(args.sparsity) == 1:
        out["sparsity"] = args.sparsity[0]
    return out


def sparsity_text(args: argparse.Namespace) -> str:
    return str(args.sparsity[0]) if len(args.sparsity) == 1 else ",".join(str(s) for s in args.sparsity)


def write_outputs(args: argparse.Namespace, title: str, header: str, settings: str, body: str, notes: list[str],
                  report: dict) -> None:
    """Print the header, settings, body (tables) and notes; write ``report`` to --json and the text to --markdown."""
    print(header)
    print(settings)
    print(body)
    for note in notes:
        print(f"note: {note}")
    if args.json:
        atomic_write_text(args.json, jsonio.dumps(report, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, f"# {title}\n\n{header}\n\n{settings}\n\n{body}\n\n"
                          + "".join(f"* {n}\n" for n in notes))


# ------------------------------------------------------------------------------------- every benchmark script


def git_revision(uncommitted: bool = False, cwd: Path | None = None) -> str:
    """The short hash of HEAD of the checkout holding ``cwd`` (default: this file's directory), "unknown" without
    git or a checkout; with ``uncommitted``, "+uncommitted" appended when tracked files differ from HEAD."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True,
                              cwd=cwd or Path(__file__).resolve().parent).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD") or "unknown"
        return rev + ("+uncommitted" if uncommitted and git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_summary() -> str:
    """The machine line of a results file: architecture, torch's threads and torch's version."""
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_results(path: Path, empty: dict) -> dict:
    """A script's results JSON, or ``empty`` where the file does not exist yet."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else empty


def save_results(path: Path, data: dict) -> None:
    """Write a script's results JSON atomically (keys sorted, indent 1), so that a killed run leaves the last one."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def block_markers(name: str) -> tuple[str, str]:
    """The lines that delimit the generated block ``name`` in a markdown document."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with ``body`` between the markers of block ``name`` (the first pair), or, without them, with the
    block appended after a blank line."""
    begin, end = block_markers(name)
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_doc_blocks(doc: Path, blocks: dict[str, str]) -> None:
    """Splice every ``{name: body}`` of ``blocks`` into the markdown file ``doc`` (a new one starts "# Results")."""
    text = doc.read_text() if doc.exists() else "# Results\n"
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    atomic_write_text(doc, text)


# ------------------------------------------------------------------------------------------------ CPU candidates


def shapes_of(names: str) -> list[tuple[int, int]]:
    """The (out, in) shapes of comma-separated SHAPES names, in order, without repeats."""
    return list(dict.fromkeys(s for name in names.split(",") for s in SHAPES[name]))
