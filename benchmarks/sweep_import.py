"""What the sweep takes from other files instead of measuring it (benchmarks/sweep.py): the points the accuracy
table (benchmarks/accuracy_table.py) measured with the same configuration and evaluation, and the dense model's
zero-shot record from a ``gqsa eval zeroshot --json`` report."""

from __future__ import annotations

from typing import Sequence

from sweep_grid import Point, measurement_key
from sweep_measure import EvalSettings, zeroshot_summary


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
