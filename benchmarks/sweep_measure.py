"""Measuring the sweep's points (benchmarks/sweep.py): the evaluation settings, whether an entry already answers
them, and the compression and evaluation of a fresh copy of the model for one point."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sweep_grid import Point, measurement_key


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


def measured_points(data: dict, points: Sequence[Point], settings: EvalSettings) -> list[Point]:
    """The points whose entries hold perplexities measured with ``settings`` (zero-shot may be missing)."""
    entries = data["points"]
    return [p for p in points if is_done(entries.get(p.name), p, settings, zeroshot=False)
            and not entries[p.name].get("not_applicable")]


def revision() -> str:
    """gqsa's revision as the sweep records it: HEAD of this checkout, "+uncommitted" when tracked files differ."""
    from benchmarks.bench.kernel_common import git_revision

    return git_revision(uncommitted=True, cwd=Path(__file__).resolve().parent)


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

    from benchmarks.bench.kernel_common import machine_summary
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
    entry.update(total_time_s=time.perf_counter() - t0, machine=machine_summary(), git_revision=revision())
    return entry
