"""The process protocol of ``gqsa bench e2e``: one spawned worker process per candidate, which loads its model once
and then serves the parent's requests, and the parent's interleaved (round-robin) use of them.

Requests, answered ``("ok", payload)`` or ``("error", traceback)``: ``("run", prompt, n)`` one timed generation of
``n`` tokens; ``("profile", prompt, n)`` the decode-step profile of ``n`` steps; ``("stop",)`` the worker's memory,
then it exits. Before any request the worker sends ``("ready", info)`` once its model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from benchmarks.bench.e2e_candidates import CandidateSpec, load_candidate, run_once
from benchmarks.bench.e2e_memory import model_bytes, peak_rss_mb, rss_mb
from benchmarks.bench.e2e_profile import decode_profile

logger = logging.getLogger(__name__)


def _worker(conn, spec: CandidateSpec) -> None:
    """Worker process: load one candidate, then serve ("run", prompt, n) / ("profile", prompt, n) / ("stop",)."""
    try:
        torch.set_num_threads(spec.threads)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        base = rss_mb()
        start = time.perf_counter()
        model, backend = load_candidate(spec)
        total, streamed = model.model_bytes() if spec.loop == "llama.cpp" else model_bytes(model)
        conn.send(("ready", {"backend": backend, "load_s": time.perf_counter() - start, "base_rss_mb": base,
                             "model_bytes": total, "streamed_bytes": streamed, "loaded_rss_mb": rss_mb()}))
        while True:
            message = conn.recv()
            if message[0] == "run":
                conn.send(("ok", run_once(model, spec, message[1], message[2])))
            elif message[0] == "profile" and spec.loop == "llama.cpp":
                conn.send(("ok", None))  # llama.cpp's step is not ours to take apart
            elif message[0] == "profile":
                fused = spec.fused if spec.loop == "gqsa" else False  # transformers' loop: its own forward's parts
                conn.send(("ok", decode_profile(model, message[1], message[2], fused)))
            else:
                conn.send(("ok", {"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()}))
                return
    except Exception:  # noqa: BLE001 - reported to the parent, which notes it and goes on without this worker
        conn.send(("error", traceback.format_exc()))


@dataclass
class Worker:
    """The parent's handle on one worker process."""

    spec: CandidateSpec
    process: multiprocessing.Process
    conn: object
    info: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)

    def ask(self, *message):
        self.conn.send(message)
        try:
            status, payload = self.conn.recv()
        except EOFError as exc:
            self.process.join(5)
            raise RuntimeError(f"{self.spec.name} worker died during {message[0]!r} (exit code "
                               f"{self.process.exitcode})") from exc
        if status == "error":
            raise RuntimeError(f"{self.spec.name} worker failed:\n{payload}")
        return payload


def start_worker(spec: CandidateSpec) -> Worker:
    """Spawn a worker for ``spec`` and wait until its model is loaded."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_worker, args=(child, spec), name=f"gqsa-bench-{spec.name}", daemon=True)
    process.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError as exc:
        process.join(5)
        raise RuntimeError(f"{spec.name} worker died while loading (exit code {process.exitcode})") from exc
    if status == "error":
        process.join(5)
        raise RuntimeError(f"{spec.name} worker failed while loading:\n{payload}")
    return Worker(spec, process, parent, info=payload)


@contextlib.contextmanager
def started(specs: list[CandidateSpec], notes: list[str]) -> Iterator[list[Worker]]:
    """A loaded worker for every spec, started one after the other (a candidate that fails to load is noted in
    ``notes`` and left out); on exit every worker is joined, killed if it does not end."""
    workers = []
    try:
        for spec in specs:
            try:
                workers.append(start_worker(spec))
            except RuntimeError as exc:
                notes.append(f"{spec.name} skipped: {str(exc).strip().splitlines()[-1]}")
                logger.warning("%s", exc)
        if not workers:
            raise RuntimeError("no candidate could be loaded: " + "; ".join(notes))
        yield workers
    finally:
        for w in workers:
            w.process.join(10)
            if w.process.is_alive():
                w.process.kill()


def measure(workers: list[Worker], prompts: list[torch.Tensor], args: argparse.Namespace) -> tuple[dict, dict]:
    """Warm every worker up, then one generation of every candidate per prompt, round robin (into ``Worker.runs``);
    with ``args.profile`` the profiles on the first prompt; then stop them. (profiles, memory) by candidate."""
    for w in workers:  # warm-up: allocations, lazy kernel loading, one-off compilation
        w.ask("run", prompts[0], min(4, args.new_tokens))
    for prompt in prompts:
        for w in workers:  # round robin: one generation of every candidate per repeat
            w.runs.append(w.ask("run", prompt, args.new_tokens))
    profiles = {w.spec.name: w.ask("profile", prompts[0], args.profile) for w in workers} if args.profile else {}
    profiles = {name: p for name, p in profiles.items() if p is not None}
    return profiles, {w.spec.name: w.ask("stop") for w in workers}
