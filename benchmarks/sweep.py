"""Sweep: GQSA over a grid of sparsity, bits and group size against the baselines, on one model, into one table
and two kinds of plots.

Every point compresses a fresh copy of the model with one configuration (a preset plus overrides, built the way
benchmarks/accuracy_table.py builds its rows: one-shot unless ``--bqpo-epochs`` / ``--e2e-epochs`` ask for
training), then measures held-out perplexity (gqsa.eval.heldout) on each corpus, optionally the zero-shot mean
accuracy over a task list (gqsa.eval.zeroshot), and takes bits per weight from the compression report. Results
are appended to a JSON file after every point, so an interrupted run resumes where it stopped (points already
measured with the same configuration and evaluation settings are skipped). Kernel speed is read from the JSON
files of ``gqsa bench kernel --json``.

Outputs: the results JSON, PNG plots in docs/figures/ (perplexity against bits per weight with the Pareto front,
one per corpus; kernel time and rows per second against batch size, one per kernel file) and a markdown table
between ``<!-- sweep-table:begin -->`` and ``<!-- sweep-table:end -->`` in docs/RESULTS.md.

    python benchmarks/sweep.py                                 # the default grid (days on 2 cores)
    python benchmarks/sweep.py --sparsity 0,0.5 --bits 4 --group-size 16 --baselines 2of4-sparsegpt
    python benchmarks/sweep.py --render --from-accuracy-table  # no compression: rows the accuracy table measured
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sweep_smollm2.json"
ACCURACY = ROOT / "benchmarks" / "results" / "accuracy_smollm2.json"
DOC = ROOT / "docs" / "RESULTS.md"
FIGURES = ROOT / "docs" / "figures"
BEGIN, END = "<!-- sweep-table:begin -->", "<!-- sweep-table:end -->"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (dequantized from Q4_1, fp32)"

# Dense group quantization (GPTQ at W2 with static qparams, as its preset; W3/W4 re-fitted), round to nearest,
# and the float pruning baselines at their fp16 sparse storage.
DEFAULT_BASELINES = ("w2g64", "w3g64", "w4g64", "rtn-w2g64", "rtn-w3g64", "rtn-w4g64",
                     "2of4-sparsegpt", "2of4-wanda", "s50-sparsegpt", "s50-wanda")
FLOAT_NAMES = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude"}


# ----------------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep: ``config`` is None for the dense reference."""

    name: str
    family: str
    config: Any  # gqsa.config.CompressConfig | None


@dataclass(frozen=True)
class Grid:
    """The sweep's configurations: GQSA over sparsity x bits x group size, plus named baseline presets.

    Attributes:
        sparsity: fractions of groups pruned, each in [0, 1) (0 is GPTQ with groups).
        bits: code widths (gqsa.config.SUPPORTED_BITS).
        group_size: group sizes (powers of two, 8..256).
        baselines: preset names (gqsa.presets.PRESETS), compressed with the same calibration.
        calib_dataset, calib_samples, calib_seq_len: the calibration of every point.
        bqpo_epochs, e2e_epochs: training after the one-shot step (0: one-shot); BQPO applies to every
            calibrated method, E2E-OQP to method "gqsa" only.
        dense: also measure the uncompressed model as the reference.
    """

    sparsity: tuple[float, ...] = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6)
    bits: tuple[int, ...] = (2, 3, 4)
    group_size: tuple[int, ...] = (16, 32, 64, 128)
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    calib_dataset: str = "wiki"
    calib_samples: int = 32
    calib_seq_len: int = 512
    bqpo_epochs: int = 0
    e2e_epochs: int = 0
    dense: bool = True

    def __post_init__(self) -> None:
        from gqsa.config import SUPPORTED_BITS, QuantSpec
        from gqsa.presets import PRESETS

        for name in ("sparsity", "bits", "group_size", "baselines"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"Grid.{name} lists a value twice: {values}")
        if any(not 0.0 <= s < 1.0 for s in self.sparsity):
            raise ValueError(f"Grid.sparsity values must be in [0, 1), got {self.sparsity}")
        if any(b not in SUPPORTED_BITS for b in self.bits):
            raise ValueError(f"Grid.bits must be among {SUPPORTED_BITS}, got {self.bits}")
        for g in self.group_size:
            QuantSpec(group_size=g)  # raises ValueError naming the rule
        unknown = [b for b in self.baselines if b not in PRESETS]
        if unknown:
            raise ValueError(f"Grid.baselines: unknown preset(s) {unknown}; presets: {sorted(PRESETS)}")
        if self.bqpo_epochs < 0 or self.e2e_epochs < 0:
            raise ValueError("Grid: bqpo_epochs and e2e_epochs must be >= 0")

    def _finish(self, cfg):
        """The point's config with this grid's calibration and training."""
        cfg = cfg.replace(calib=cfg.calib.replace(dataset=self.calib_dataset, samples=self.calib_samples,
                                                  seq_len=self.calib_seq_len),
                          bqpo=cfg.bqpo.replace(epochs=self.bqpo_epochs if cfg.method != "magnitude" else 0),
                          e2e=cfg.e2e.replace(epochs=self.e2e_epochs if cfg.method == "gqsa" else 0))
        return cfg

    def _suffix(self, cfg) -> str:
        return (f"+bqpo{cfg.bqpo.epochs}" if cfg.bqpo.epochs else "") + (f"+e2e{cfg.e2e.epochs}" if cfg.e2e.epochs
                                                                          else "")

    def points(self) -> list[Point]:
        """Every point, dense first, then GQSA by bits, group size and sparsity, then the baselines.

        A baseline whose configuration equals a grid point's (``measurement_key``) is left out: it is measured once,
        under the grid point's name.
        """
        from gqsa.presets import preset

        out = [Point("dense", "dense", None)] if self.dense else []
        seen: set[str] = set()
        for b in self.bits:
            for g in self.group_size:
                for s in self.sparsity:
                    base = preset("w4s50")
                    cfg = self._finish(base.replace(quant=base.quant.replace(bits=b, group_size=g),
                                                    sparsity=base.sparsity.replace(ratio=s)))
                    name = f"w{b}s{round(s * 100)}-g{g}" if s else f"gptq-w{b}g{g}"  # sparsity 0 is GPTQ
                    out.append(Point(name + self._suffix(cfg), family_of(cfg), cfg))
                    seen.add(measurement_key(cfg.to_dict()))
        for name in self.baselines:
            cfg = self._finish(preset(name))
            if measurement_key(cfg.to_dict()) not in seen:
                seen.add(measurement_key(cfg.to_dict()))
                out.append(Point(name + self._suffix(cfg), family_of(cfg), cfg))
        return out


def family_of(cfg) -> str:
    """The plot family of a baseline configuration ("GPTQ W2", "RTN W4", "SparseGPT 2:4", ...)."""
    if cfg is None:
        return "dense"
    sp = cfg.sparsity
    if sp.pattern == "group":
        if cfg.method == "gqsa":
            if sp.ratio == 0:
                return f"GPTQ W{cfg.quant.bits}" + (" static" if cfg.oneshot.static_qparams else "")
            return f"GQSA W{cfg.quant.bits} g{cfg.quant.group_size}"
        return f"RTN W{cfg.quant.bits}" if sp.ratio == 0 else f"magnitude groups W{cfg.quant.bits}"
    return f"{FLOAT_NAMES[cfg.method]} {sp.pattern if sp.pattern != 'unstructured' else f'{sp.ratio:.0%}'}"


def describe(cfg: dict | None) -> str:
    """A short description of a configuration dict: method, format, and what differs from the defaults."""
    if cfg is None:
        return "uncompressed"
    q, sp, one = cfg.get("quant"), cfg["sparsity"], cfg.get("oneshot", {})
    parts = [cfg["method"]]
    if q:
        parts.append(f"W{q['bits']} g{q['group_size']}" + (" sym" if q.get("symmetric") else ""))
    parts.append(f"{sp['ratio']:.0%} " + ("of groups" if sp["pattern"] == "group" else sp["pattern"]))
    if cfg["method"] == "gqsa":
        if one.get("saliency", "obs") != "obs":
            parts.append(one["saliency"])
        if one.get("static_qparams"):
            parts.append("static qparams")
    for stage in ("bqpo", "e2e"):
        if cfg.get(stage, {}).get("epochs"):
            parts.append(f"{stage.upper()} {cfg[stage]['epochs']} ep")
    return ", ".join(parts)


def measurement_key(config: dict | None) -> str:
    """What a measurement depends on: the config normalised (fields added since it was written take their
    defaults), without its version and without the training specs of stages that do not run (epochs 0)."""
    if config is None:
        return "dense"
    from gqsa.config import CompressConfig

    d = CompressConfig.from_dict(config).to_dict()
    d.pop("version")
    for stage in ("bqpo", "e2e"):
        if not d[stage]["epochs"]:
            d.pop(stage)
    return json.dumps(d, sort_keys=True)


# ------------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class EvalSettings:
    """How every point is evaluated (a point measured with other settings is measured again)."""

    model: str | None = None  # None: the default model
    datasets: tuple[str, ...] = ("wiki", "c4")
    seq_len: int = 2048
    max_tokens: int = 8192
    zeroshot: tuple[str, ...] = ()
    zeroshot_limit: int | None = None
    zeroshot_batch_size: int = 16
    progress: bool = True

    def to_dict(self) -> dict:
        return {"model": self.model, "datasets": list(self.datasets), "eval_seq_len": self.seq_len,
                "eval_max_tokens": self.max_tokens, "zeroshot": list(self.zeroshot),
                "zeroshot_limit": self.zeroshot_limit}


def is_done(entry: dict | None, point: Point, settings: EvalSettings, zeroshot: bool = True) -> bool:
    """Whether ``entry`` already measures ``point`` with ``settings`` (or found it not applicable).

    Args:
        zeroshot: also require the requested zero-shot tasks (False: perplexity is enough, as for the table).
    """
    if entry is None or entry.get("key") != measurement_key(None if point.config is None else point.config.to_dict()):
        return False
    if entry.get("model") != settings.model:
        return False
    if entry.get("not_applicable"):
        return True
    if (entry.get("eval_seq_len"), entry.get("eval_max_tokens")) != (settings.seq_len, settings.max_tokens):
        return False
    if any(entry.get(f"ppl_{ds}") is None for ds in settings.datasets):
        return False
    if settings.zeroshot and zeroshot:
        zs = entry.get("zeroshot") or {}
        return zs.get("tasks") == list(settings.zeroshot) and zs.get("limit") == settings.zeroshot_limit
    return True


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import torch

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def zeroshot_summary(results: Sequence[dict], tasks: Sequence[str], limit: int | None) -> dict:
    """The zero-shot record of a point: per-task results and the mean accuracy over the tasks."""
    return {"tasks": list(tasks), "limit": limit, "results": list(results),
            "avg": sum(r["acc"] for r in results) / len(results), "items": sum(r["n"] for r in results)}


def measure_point(point: Point, settings: EvalSettings) -> dict:
    """Compress a fresh copy of the model with ``point.config`` (unless dense), then evaluate it.

    Returns:
        The point's entry: key, config, bits per weight, sparsity, compression times, ``ppl_<dataset>`` and
        ``tokens_<dataset>``, zero-shot results, machine and git revision.

    Raises:
        ValueError: the configuration does not fit the model (for example a group size that does not divide a
            layer's in_features).
    """
    import torch

    from gqsa.compress import calibration_ids, compress_model
    from gqsa.eval.heldout import heldout_perplexity
    from gqsa.models.loading import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(settings.model)
    cfg = point.config
    entry: dict[str, Any] = {"name": point.name, "family": point.family, "model": settings.model,
                             "config": None if cfg is None else cfg.to_dict(), "source": "sweep",
                             "threads": torch.get_num_threads()}
    entry["key"] = measurement_key(entry["config"])
    if cfg is not None:
        calib = calibration_ids(tokenizer, cfg) if cfg.method != "magnitude" else None
        cpu0 = time.process_time()  # with one thread, the wall time of a quiet machine
        report = compress_model(model, cfg, calib_ids=calib, progress=settings.progress)
        s = report["summary"]
        entry.update(bits_per_weight=s["bits_per_weight"], sparsity=s["sparsity"],
                     compress_time_s=report["wall_time_s"], compress_cpu_s=time.process_time() - cpu0)
    entry.update(eval_seq_len=settings.seq_len, eval_max_tokens=settings.max_tokens)
    for ds in settings.datasets:
        r = heldout_perplexity(model, tokenizer, ds, seq_len=settings.seq_len, max_tokens=settings.max_tokens,
                               progress=settings.progress)
        entry[f"ppl_{ds}"], entry[f"tokens_{ds}"] = r["ppl"], r["tokens"]
    if settings.zeroshot:
        from gqsa.eval.zeroshot import evaluate_tasks

        results = evaluate_tasks(model, tokenizer, list(settings.zeroshot), limit=settings.zeroshot_limit,
                                 batch_size=settings.zeroshot_batch_size, progress=settings.progress)
        entry["zeroshot"] = zeroshot_summary([r.to_dict() for r in results], settings.zeroshot,
                                             settings.zeroshot_limit)
    entry.update(total_time_s=time.perf_counter() - t0, machine=machine(), git_revision=_git_revision())
    return entry


# ------------------------------------------------------------------------------------------------- imports


def import_accuracy_rows(accuracy: dict, points: Sequence[Point], settings: EvalSettings,
                         label: str = "accuracy_smollm2.json") -> dict[str, dict]:
    """Entries for the points that the accuracy table already measured with the same configuration and evaluation.

    A row matches a point when its stored config has the point's ``measurement_key`` (so a row measured before
    a preset changed does not match it), the table's evaluation used the same window length and token count and
    every requested corpus; the accuracy table always uses the default model.

    Returns:
        {point name: entry}, with ``source`` naming the row it came from.
    """
    s = accuracy.get("settings", {})
    if settings.model is not None or (s.get("eval_seq_len"), s.get("eval_max_tokens")) != (settings.seq_len,
                                                                                          settings.max_tokens):
        return {}
    if not set(settings.datasets) <= set(s.get("datasets", [])):
        return {}
    by_key: dict[str, tuple[str, dict]] = {}
    for row, e in accuracy.get("rows", {}).items():
        if row != "dense" and e.get("config") is None:  # a peer library's output directory: no config of ours
            continue
        try:
            key = "dense" if row == "dense" else measurement_key(e["config"])
        except ValueError:  # a config this gqsa cannot read (another schema version)
            continue
        by_key.setdefault(key, (row, e))
    out = {}
    for p in points:
        key = measurement_key(None if p.config is None else p.config.to_dict())
        if key not in by_key:
            continue
        row, e = by_key[key]
        entry = {k: e[k] for k in ("bits_per_weight", "sparsity", "compress_time_s", "compress_cpu_s", "threads")
                 if k in e}
        for ds in settings.datasets:
            entry[f"ppl_{ds}"], entry[f"tokens_{ds}"] = e.get(f"ppl_{ds}"), e.get(f"tokens_{ds}")
        entry.update(name=p.name, family=p.family, model=None, config=e.get("config"), key=key,
                     eval_seq_len=settings.seq_len, eval_max_tokens=settings.max_tokens,
                     source=f"{label}: {row}", machine=accuracy.get("machine", "?"),
                     git_revision=accuracy.get("git_revision", "?"))
        out[p.name] = entry
    return out


def import_dense_zeroshot(report: dict, settings: EvalSettings) -> dict | None:
    """The dense model's zero-shot record from a ``gqsa eval zeroshot --json`` report on the default model, if it
    holds every requested task with the requested limit."""
    if settings.model is not None or not settings.zeroshot:
        return None
    results = {r["task"]: r for r in report.get("results", []) if r.get("model") == "default"
               and r.get("limit") == settings.zeroshot_limit}
    if not set(settings.zeroshot) <= set(results):
        return None
    zs = zeroshot_summary([results[t] for t in settings.zeroshot], settings.zeroshot, settings.zeroshot_limit)
    zs["source"] = f"{report.get('command', '?')} (gqsa {report.get('git_revision', '?')})"
    return zs


# ------------------------------------------------------------------------------------------------- kernel files


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


# ------------------------------------------------------------------------------------------------- plots


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
    pts = [e for e in entries if e.get("config") is not None and _finite(e.get(key))
           and _finite(e.get("bits_per_weight"))]
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
    dense = next((e for e in entries if e.get("config") is None and _finite(e.get(key))), None)
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


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------- markdown


def corpus_label(source: str) -> str:
    """A corpus name as it is, a text file by its file name."""
    return Path(source).name if ("/" in source or "." in source) else source


def _fmt_ppl(x) -> str:
    if not _finite(x):
        return "-"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def _model_name(model: str | None) -> str:
    return DEFAULT_MODEL_NAME if model is None else str(model)


def _header(data: dict, points: Sequence[Point], measured: Sequence[Point], kernels: Sequence[dict]) -> str:
    """What the table measured: model, text, context length, tokens or items, machines and git revisions."""
    s, entries = data["settings"], data["points"]
    calib = next((p.config.calib for p in points if p.config is not None), None)
    out = [f"Model: {_model_name(s['model'])}."]
    if calib is not None:
        out.append(f"Calibration: {calib.samples} windows x {calib.seq_len} tokens of the "
                   f"{corpus_label(calib.dataset)} calibration split.")
    tokens = {ds: sorted({entries[p.name].get(f"tokens_{ds}") for p in measured} - {None}) for ds in s["datasets"]}
    out.append(f"Evaluation: held-out {', '.join(map(corpus_label, s['datasets']))}, first {s['eval_max_tokens']} "
               f"tokens in windows of (context length) {s['eval_seq_len']}; predicted tokens scored: "
               + ", ".join(f"{corpus_label(ds)} {'/'.join(map(str, tokens[ds])) or '-'}" for ds in s["datasets"])
               + ".")
    if s["zeroshot"]:
        items = f"first {s['zeroshot_limit']} items of each" if s["zeroshot_limit"] else "all items"
        out.append(f"Zero-shot: mean accuracy over {', '.join(s['zeroshot'])}, {items} (gqsa.eval.zeroshot).")
        dense = next((entries[p.name]["zeroshot"] for p in measured if p.config is None
                      and (entries[p.name].get("zeroshot") or {}).get("source")), None)
        if dense:
            out.append(f"Dense zero-shot from `{dense['source']}`.")
    sources: dict[tuple[str, str, str], int] = {}
    for p in measured:
        e = entries[p.name]
        origin = (e["source"].split(":")[0], e.get("machine", "?"), e.get("git_revision", "?"))
        sources[origin] = sources.get(origin, 0) + 1
    out.append("Measured: " + "; ".join(
        f"{n} point(s) by this sweep on {mach}, gqsa {rev}" if origin == "sweep" else
        f"{n} point(s) imported from `{origin}` ({mach}; the file last written at gqsa {rev})"
        for (origin, mach, rev), n in sources.items()) + ".")
    if kernels:
        k = kernels[0]
        out.append(f"Kernel column: `{Path(k['path']).name}`, {kernel_shape(k, s.get('kernel_shape'))}, batch 1: "
                   "torch fp32 for dense, for the format the file measured the packed layer's call "
                   "(`gqsa-cpu-kernel-only`: the kernel bound to the layer, as `GQSALinear` calls it).")
    return " ".join(out)


def _points_table(data: dict, measured: Sequence[Point], kernels: Sequence[dict]) -> list[str]:
    s, entries = data["settings"], data["points"]
    datasets = s["datasets"]
    kernel = kernels[0] if kernels else None
    shape = kernel_shape(kernel, s.get("kernel_shape")) if kernel else None
    lines = ["| family | point | configuration | bits/weight | sparsity | "
             + " | ".join(f"{corpus_label(d)} ppl" for d in datasets) + " | zero-shot avg | "
             + (f"kernel ms ({shape}, batch 1) | " if kernel else "") + "source |",
             "|---|---|---|---:|---:|" + "---:|" * (len(datasets) + 1) + ("---:|" if kernel else "") + "---|"]
    for p in measured:
        e = entries[p.name]
        bpw, sp, zs = e.get("bits_per_weight"), e.get("sparsity"), e.get("zeroshot")
        cells = [p.family, p.name, describe(e.get("config")),
                 "32 (fp32)" if e.get("config") is None else "-" if bpw is None else f"{bpw:.2f}",
                 "-" if sp is None else f"{sp:.1%}", *(_fmt_ppl(e.get(f"ppl_{d}")) for d in datasets),
                 "-" if not zs else f"{zs['avg']:.3f}"]
        if kernel:
            ms = kernel_ms_for(e, kernel, shape)
            cells.append("-" if ms is None else f"{ms:.3f}")
        lines.append("| " + " | ".join(cells + [e["source"]]) + " |")
    return lines


def _kernel_table(kernel: dict, shape: str) -> list[str]:
    """Median ms per call of every candidate by batch size (speedup against torch fp32), with its machine."""
    m, ks = kernel.get("machine", {}), kernel.get("settings", {})
    series = kernel_series(kernel, shape)
    batches = sorted({b for values in series.values() for b, _ in values})
    fp32 = dict(series.get("torch-fp32", []))
    lines = [f"Kernel `{Path(kernel['path']).name}`, shape {shape} (out x in): {m.get('processor', '?')}, "
             f"{m.get('cpus', '?')} thread(s), torch {m.get('torch', '?')}, gqsa {m.get('git_revision', '?')} "
             f"(isa {m.get('gqsa_isa', '?')}), DRAM read {m.get('dram_read_gb_per_s', math.nan):.1f} GB/s; gqsa "
             f"weights W{ks.get('bits')} g{ks.get('group_size')}, {ks.get('sparsity', 0):.0%} of groups pruned; "
             "median ms per call (speedup vs torch fp32)." + "".join(f" Note: {n}" for n in ks.get("note", [])),
             "", "| candidate | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    for candidate, values in series.items():
        by_batch = dict(values)
        cells = ["-" if b not in by_batch else f"{by_batch[b]:.3f}" + (f" ({fp32[b] / by_batch[b]:.2f}x)" if b in fp32
                                                                       else "") for b in batches]
        lines.append(f"| {candidate} | " + " | ".join(cells) + " |")
    return lines


def measured_points(data: dict, points: Sequence[Point], settings: EvalSettings) -> list[Point]:
    """The points whose entries hold perplexities measured with ``settings`` (zero-shot may be missing)."""
    entries = data["points"]
    return [p for p in points if is_done(entries.get(p.name), p, settings, zeroshot=False)
            and not entries[p.name].get("not_applicable")]


def render(data: dict, points: Sequence[Point], settings: EvalSettings, kernels: Sequence[dict],
           figures: Sequence[tuple[str, Path]], doc: Path) -> str:
    """The markdown block: the command, what was measured how, the points table, the kernel tables by batch size
    and the figures (linked relative to ``doc``)."""
    s, entries = data["settings"], data["points"]
    measured = measured_points(data, points, settings)
    na = {p.name: entries[p.name]["not_applicable"] for p in points
          if is_done(entries.get(p.name), p, settings) and entries[p.name].get("not_applicable")}
    missing = [p.name for p in points if p not in measured and p.name not in na]
    lines = [f"Made by: `{s['command']}` (gqsa {data.get('git_revision', '?')}).", "",
             _header(data, points, measured, kernels), "", *_points_table(data, measured, kernels), "",
             f"{len(measured)} of {len(points)} grid points measured."]
    if missing:
        lines[-1] += (f" Not measured yet ({len(missing)}; the command without `--render` measures them): "
                      + ", ".join(missing) + ".")
    if na:
        lines[-1] += " Not applicable to this model: " + "; ".join(f"{n} ({why})" for n, why in na.items()) + "."
    for k in kernels:
        lines += ["", *_kernel_table(k, kernel_shape(k, s.get("kernel_shape")))]
    if figures:
        lines += [""] + [f"![{alt}]({os.path.relpath(path, doc.parent)})" for alt, path in figures]
    return "\n".join(lines)


def _replace_block(text: str, table: str) -> str:
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_doc(doc: Path, table: str) -> None:
    from gqsa.utils.io import atomic_write_text

    text = doc.read_text() if doc.exists() else "# Results\n"
    atomic_write_text(doc, _replace_block(text, table))


# ------------------------------------------------------------------------------------------------- command line


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"points": {}}


def save_results(path: Path, data: dict) -> None:
    from gqsa.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    g = Grid()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=_floats, default=g.sparsity, help="fractions of groups pruned, comma-separated")
    p.add_argument("--bits", type=_ints, default=g.bits)
    p.add_argument("--group-size", type=_ints, default=g.group_size)
    p.add_argument("--baselines", type=_names, default=g.baselines, help="preset names, comma-separated ('' none)")
    p.add_argument("--no-dense", action="store_true", help="do not measure the uncompressed reference")
    p.add_argument("--bqpo-epochs", type=int, default=0, help="train after the one-shot step (default: one-shot)")
    p.add_argument("--e2e-epochs", type=int, default=0)
    p.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--calib-dataset", default=g.calib_dataset)
    p.add_argument("--calib-samples", type=int, default=g.calib_samples)
    p.add_argument("--seq-len", type=int, default=g.calib_seq_len, help="calibration window length")
    p.add_argument("--datasets", type=_names, default=("wiki", "c4"), help="held-out corpora (names or text files)")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--zeroshot", type=_names, default=(), help="zero-shot tasks, comma-separated (default none)")
    p.add_argument("--zeroshot-limit", type=int, default=None, help="items per task (default all)")
    p.add_argument("--zeroshot-json", type=Path, action="append", default=[],
                   help="a `gqsa eval zeroshot --json` report of the default model: its results become the dense "
                        "point's zero-shot record when tasks and limit match")
    p.add_argument("--from-accuracy-table", nargs="?", type=Path, const=ACCURACY, default=None,
                   help=f"import the points measured by benchmarks/accuracy_table.py (default file {ACCURACY.name})")
    p.add_argument("--kernel-json", type=Path, action="append", default=None,
                   help="a `gqsa bench kernel --json` file (repeatable; default benchmarks/results/kernel_cpu_*.json)")
    p.add_argument("--kernel-shape", default=None, help="shape to show, e.g. 576x576 (default: the first measured)")
    p.add_argument("--kernel-run", default=None, metavar="SHAPES",
                   help="also run the kernel benchmark on these shapes (gqsa.bench.kernel SHAPES, e.g. tiny)")
    p.add_argument("--kernel-batch", default="1,4,16", help="batch sizes of --kernel-run")
    p.add_argument("--kernel-repeats", type=int, default=10, help="repeats of --kernel-run")
    p.add_argument("--kernel-cold-mib", type=int, default=64, help="weight copies per candidate of --kernel-run")
    p.add_argument("--render", action="store_true", help="measure nothing: import, then write table and plots")
    p.add_argument("--redo", action="store_true", help="measure points again even if present")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--figures", type=Path, default=FIGURES)
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the markdown block")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _command(argv: list[str]) -> str:
    return "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep.py " + " ".join(shlex.quote(a) for a in argv)


def run_kernel(args: argparse.Namespace, path: Path) -> Path:
    """The kernel benchmark (gqsa.bench.kernel) on ``args.kernel_run`` shapes, its JSON written to ``path``."""
    from gqsa.bench import kernel

    kernel.main(["--shapes", args.kernel_run, "--batch", args.kernel_batch, "--repeats", str(args.kernel_repeats),
                 "--cold-mib", str(args.kernel_cold_mib), "--json", str(path)])
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        grid = Grid(sparsity=args.sparsity, bits=args.bits, group_size=args.group_size, baselines=args.baselines,
                    calib_dataset=args.calib_dataset, calib_samples=args.calib_samples, calib_seq_len=args.seq_len,
                    bqpo_epochs=args.bqpo_epochs, e2e_epochs=args.e2e_epochs, dense=not args.no_dense)
        points = grid.points()
    except ValueError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    settings = EvalSettings(model=args.model, datasets=args.datasets, seq_len=args.eval_seq_len,
                            max_tokens=args.eval_tokens, zeroshot=args.zeroshot, zeroshot_limit=args.zeroshot_limit,
                            progress=not args.no_progress)
    data = load_results(args.results)
    entries = data["points"]
    if args.from_accuracy_table is not None:
        imported = import_accuracy_rows(load_results(args.from_accuracy_table), points, settings,
                                        label=args.from_accuracy_table.name)
        by_name = {p.name: p for p in points}
        for name, entry in imported.items():  # a point this sweep measured itself is kept
            if not is_done(entries.get(name), by_name[name], settings):
                entries[name] = entry
        print(f"imported {len(imported)} point(s) from {args.from_accuracy_table}", flush=True)
    dense = next((p for p in points if p.config is None), None)
    for path in args.zeroshot_json:
        zs = import_dense_zeroshot(json.loads(path.read_text()), settings)
        if dense is not None and zs is not None and dense.name in entries:
            entries[dense.name]["zeroshot"] = zs
    data["settings"] = {**settings.to_dict(), "kernel_shape": args.kernel_shape, "command": _command(argv)}
    data["git_revision"] = _git_revision()
    save_results(args.results, data)

    measured = 0
    if not args.render:
        import transformers

        transformers.logging.set_verbosity_error()
        for point in points:
            if is_done(entries.get(point.name), point, settings) and not args.redo:
                continue
            try:
                entry = measure_point(point, settings)
            except ValueError as exc:  # a configuration the model does not fit: recorded, not retried
                print(f"point {point.name}: {exc}", file=sys.stderr, flush=True)
                entry = {"name": point.name, "family": point.family, "model": settings.model,
                         "key": measurement_key(point.config.to_dict()), "config": point.config.to_dict(),
                         "not_applicable": str(exc), "source": "sweep"}
            entries[point.name] = entry
            measured += 1
            save_results(args.results, data)
            print(json.dumps({k: v for k, v in entry.items() if k not in ("config", "key", "zeroshot")}), flush=True)
    print(f"measured {measured} point(s)", flush=True)

    kernel_paths = args.kernel_json if args.kernel_json is not None else sorted(
        (ROOT / "benchmarks" / "results").glob("kernel_cpu_*.json"))
    if args.kernel_run:
        kernel_paths = [*kernel_paths, run_kernel(args, args.results.with_name(
            f"{args.results.stem}_kernel_{args.kernel_run}.json"))]
    kernels = [load_kernel(p) for p in kernel_paths]
    figures: list[tuple[str, Path]] = []
    stem = args.results.stem
    current = [entries[p.name] for p in measured_points(data, points, settings)]
    model = _model_name(args.model)
    for ds in settings.datasets:
        label = corpus_label(ds)
        path = plot_ppl_vs_bits(current, ds, args.figures / f"{stem}_{Path(label).stem}_ppl_vs_bits.png",
                                f"{model}: held-out {label} perplexity ({settings.max_tokens} tokens, windows of "
                                f"{settings.seq_len}) against bits per weight")
        figures.append((f"held-out {label} perplexity against bits per weight", path))
    for k in kernels:
        shape = kernel_shape(k, args.kernel_shape)
        ks, km = k.get("settings", {}), k.get("machine", {})
        path = plot_kernel_vs_batch(k, shape, args.figures / f"{Path(k['path']).stem}_{shape}_vs_batch.png",
                                    f"{Path(k['path']).name}: one {shape} linear layer (out x in), gqsa weights "
                                    f"W{ks.get('bits')} g{ks.get('group_size')} {ks.get('sparsity', 0):.0%} of "
                                    f"groups pruned, cold weights; {km.get('processor', '?')}, "
                                    f"{km.get('cpus', '?')} thread(s), torch {km.get('torch', '?')}, "
                                    f"gqsa {km.get('git_revision', '?')}")
        figures.append((f"kernel time against batch size, {shape}", path))
    table = render(data, points, settings, kernels, figures, args.doc)
    if not args.no_doc:
        write_doc(args.doc, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
