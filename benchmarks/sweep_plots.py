"""The sweep's plots (benchmarks/sweep.py), PNG files written atomically: perplexity against bits per weight with
the Pareto front, one per corpus, and kernel time and rows per second against batch size, one per kernel file."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Sequence

from sweep_kernels import kernel_series, kernel_shape
from sweep_measure import EvalSettings
from sweep_render import corpus_label, finite, model_name


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower or equal in both coordinates, lower in one), by x.

    Args:
        points: (x, y) pairs, both to be minimised (bits per weight, perplexity).

    Returns:
        Indices into ``points`` of the front, sorted by increasing x (so decreasing y); of equal points the first.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _save_png(fig, path: Path) -> Path:
    """Render ``fig`` and write it to ``path`` atomically (temporary file in the same directory, then rename)."""
    from gqsa.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_GROUP_COLORS = {8: "tab:brown", 16: "tab:blue", 32: "tab:orange", 64: "tab:green", 128: "tab:red",
                 256: "tab:pink"}
_BITS_LINES = {2: ":", 3: "--", 4: "-", 8: "-."}
_BITS_COLORS = {2: "tab:purple", 3: "tab:brown", 4: "black", 8: "tab:gray"}
_KIND_MARKERS = {"GPTQ": "s", "RTN": "X", "magnitude": "D", "SparseGPT": "^", "Wanda": "v"}


def _baseline_style(family: str) -> dict:
    """Marker by method (GPTQ, RTN, SparseGPT, ...), color by bits (dense quantization) or by pattern (2:4 or
    unstructured float pruning); hollow for GPTQ with static qparams."""
    style = {"marker": _KIND_MARKERS.get(family.split()[0], "P"), "markersize": 8, "linestyle": "none"}
    bits = re.search(r"\bW(\d+)\b", family)
    if bits:  # dense quantization or magnitude groups: color by bits
        style["color"] = _BITS_COLORS.get(int(bits.group(1)), "gray")
    else:  # float pruning: color by pattern
        style["color"] = "tab:pink" if ":" in family else "tab:cyan"
    if family.endswith("static"):
        style["markerfacecolor"] = "none"
    return style


def _is_gqsa_line_member(cfg: dict) -> bool:
    """GQSA with the default one-shot settings (its sparsity-0 end is GPTQ with the same groups)."""
    one = cfg.get("oneshot", {})
    return (cfg["method"] == "gqsa" and cfg["sparsity"]["pattern"] == "group" and one.get("saliency", "obs") == "obs"
            and not one.get("static_qparams"))


def _label_clusters(points: Sequence[tuple[float, float, str]]) -> list[tuple[tuple[float, float], list[str]]]:
    """Points that would print on top of each other (same bits, perplexity within 25%) share one label."""
    clusters: list[tuple[tuple[float, float], list[str]]] = []
    for x, y, name in sorted(points):
        if clusters and abs(clusters[-1][0][0] - x) < 0.02 and abs(math.log10(y / clusters[-1][0][1])) < 0.1:
            clusters[-1][1].append(name)
        else:
            clusters.append(((x, y), [name]))
    return clusters


def plot_ppl_vs_bits(entries: Sequence[dict], dataset: str, path: Path, title: str) -> Path:
    """Perplexity (log) against bits per weight.

    GQSA is one line per (bits, group size) through its sparsities (circles; its sparsity-0 end is the GPTQ point
    with the same groups); every baseline family has its own marker; the dense model is a horizontal line, and
    the Pareto front over every compressed point is a step line.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(10, 6))
    key = f"ppl_{dataset}"
    pts = [e for e in entries if e.get("config") is not None and finite(e.get(key))
           and finite(e.get("bits_per_weight"))]
    lines: dict[tuple[int, int], list[dict]] = {}
    for e in pts:
        if _is_gqsa_line_member(e["config"]):
            q = e["config"]["quant"]
            lines.setdefault((q["bits"], q["group_size"]), []).append(e)
    for (bits, group), members in sorted(lines.items(), reverse=True):
        members.sort(key=lambda e: e["config"]["sparsity"]["ratio"])
        ratios = [round(e["config"]["sparsity"]["ratio"] * 100) for e in members]
        if not any(ratios):
            continue  # GPTQ only: drawn with the baselines
        ax.plot([e["bits_per_weight"] for e in members], [e[key] for e in members], marker="o",
                markevery=[i for i, r in enumerate(ratios) if r], color=_GROUP_COLORS.get(group, "gray"),
                linestyle=_BITS_LINES.get(bits, "-"), label=f"GQSA W{bits} g{group} (S{'-'.join(map(str, ratios))})")
        for e, r in zip(members, ratios):
            if r:
                ax.annotate(f"S{r}", (e["bits_per_weight"], e[key]), textcoords="offset points", xytext=(4, 3),
                            fontsize=7)
    families: dict[str, list[dict]] = {}
    for e in pts:
        if not e["family"].startswith("GQSA"):
            families.setdefault(e["family"], []).append(e)
    for fam, members in sorted(families.items()):
        ax.plot([e["bits_per_weight"] for e in members], [e[key] for e in members], label=fam,
                **_baseline_style(fam))
    for (x, y), names in _label_clusters([(e["bits_per_weight"], e[key], e["name"])
                                          for members in families.values() for e in members]):
        ax.annotate(" / ".join(names), (x, y), textcoords="offset points", fontsize=6, xytext=(7, -3))
    if pts:
        front = [pts[i] for i in pareto_front([(e["bits_per_weight"], e[key]) for e in pts])]
        fx, fy = [e["bits_per_weight"] for e in front], [e[key] for e in front]
        ax.plot(fx + [max(e["bits_per_weight"] for e in pts) + 0.3], fy + fy[-1:], drawstyle="steps-post",
                color="black", linewidth=3, alpha=0.2, label="Pareto front: " + ", ".join(e["name"] for e in front))
    dense = next((e for e in entries if e.get("config") is None and finite(e.get(key))), None)
    if dense is not None:
        ax.axhline(dense[key], color="gray", linestyle="--", linewidth=1, label=f"dense fp32 ({dense[key]:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (every index, scale and zero point counted; float pruning: fp16 sparse)")
    ax.set_ylabel(f"held-out {corpus_label(dataset)} perplexity (log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no point measured yet", transform=ax.transAxes, ha="center")
    try:
        return _save_png(fig, path)
    finally:
        plt.close(fig)


def plot_kernel_vs_batch(kernel: dict, shape: str, path: Path, title: str) -> Path:
    """Median time per call and rows per second against batch size, one line per candidate, for one shape."""
    plt = _figure()
    series = kernel_series(kernel, shape)
    fig, (ax_ms, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.5))
    for candidate, values in series.items():
        batches, ms = [b for b, _ in values], [t for _, t in values]
        style = dict(marker="o", linewidth=2.5 if candidate.startswith("gqsa") else 1.2,
                     linestyle="-" if candidate.startswith("gqsa") else "--")
        ax_ms.plot(batches, ms, label=candidate, **style)
        ax_rate.plot(batches, [b / (t / 1e3) for b, t in zip(batches, ms)], label=candidate, **style)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    batches = sorted({b for values in series.values() for b, _ in values})
    for ax in (ax_ms, ax_rate):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("batch size (rows of x)")
        ax.grid(True, which="both", alpha=0.3)
    ax_ms.set_ylabel(f"median ms per call, {shape} (lower is better)")
    ax_rate.set_ylabel("rows per second through this layer (higher is better)")
    ax_rate.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return _save_png(fig, path)
    finally:
        plt.close(fig)


def plot_all(entries: Sequence[dict], settings: EvalSettings, kernels: Sequence[dict], figures: Path, stem: str,
             kernel_shape_arg: str | None = None) -> list[tuple[str, Path]]:
    """Every figure of the sweep, in ``figures``: perplexity against bits per weight of ``entries`` for each corpus
    of ``settings`` (``<stem>_<corpus>_ppl_vs_bits.png``), then time against batch size for each kernel file on
    shape ``kernel_shape_arg`` where the file measured it, else its first shape.

    Returns:
        (alt text, path) of each figure, in that order.
    """
    out: list[tuple[str, Path]] = []
    model = model_name(settings.model)
    for ds in settings.datasets:
        label = corpus_label(ds)
        path = plot_ppl_vs_bits(entries, ds, figures / f"{stem}_{Path(label).stem}_ppl_vs_bits.png",
                                f"{model}: held-out {label} perplexity ({settings.max_tokens} tokens, windows of "
                                f"{settings.seq_len}) against bits per weight")
        out.append((f"held-out {label} perplexity against bits per weight", path))
    for k in kernels:
        shape = kernel_shape(k, kernel_shape_arg)
        ks, km = k.get("settings", {}), k.get("machine", {})
        path = plot_kernel_vs_batch(k, shape, figures / f"{Path(k['path']).stem}_{shape}_vs_batch.png",
                                    f"{Path(k['path']).name}: one {shape} linear layer (out x in), gqsa weights "
                                    f"W{ks.get('bits')} g{ks.get('group_size')} {ks.get('sparsity', 0):.0%} of "
                                    f"groups pruned, cold weights; {km.get('processor', '?')}, "
                                    f"{km.get('cpus', '?')} thread(s), torch {km.get('torch', '?')}, "
                                    f"gqsa {km.get('git_revision', '?')}")
        out.append((f"kernel time against batch size, {shape}", path))
    return out
