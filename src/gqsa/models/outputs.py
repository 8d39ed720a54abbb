"""Where a compression's output goes: the checks on an output directory before any work, and its neighbours.

Beside an output directory ``out`` gqsa keeps two things of its own while a compression runs: the lock
(``.<out>.gqsa-lock``, ``gqsa.utils.lock``) and the resume state (``.<out>.gqsa-resume``,
``gqsa.algorithms.resume``). ``out`` itself appears only when the run has finished (atomically), so a failed or
interrupted run never leaves a half-written or resume-only output.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path

from gqsa.format.checkpoint import GQSA_CONFIG_NAME

PRUNED_CONFIG_NAME = "gqsa_pruned.json"


def resume_dir(out: str | Path) -> Path:
    """The resume directory of output ``out``: ``.<name>.gqsa-resume`` in the same directory."""
    out = Path(out)
    return out.parent / f".{out.name}.gqsa-resume"


def is_gqsa_output(path: str | Path) -> bool:
    """Whether directory ``path`` is a checkpoint gqsa wrote: a ``gqsa_config.json`` saying ``"format": "gqsa"``
    (packed) or a ``gqsa_pruned.json`` (float baselines)."""
    path = Path(path)
    if (path / PRUNED_CONFIG_NAME).is_file():
        return True
    try:
        return json.loads((path / GQSA_CONFIG_NAME).read_text()).get("format") == "gqsa"
    except (OSError, ValueError, AttributeError):
        return False


# What a gqsa checkpoint directory holds: what gqsa.save / save_pruned write (the weights, gqsa's and transformers'
# configs, the run's report and resolved config) and what a tokenizer's save_pretrained writes. --overwrite
# refuses a checkpoint that holds anything else: replacing it would delete the user's files.
_WRITTEN_NAMES = frozenset({
    GQSA_CONFIG_NAME, PRUNED_CONFIG_NAME, "config.json", "generation_config.json", "report.json",
    "compress_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "tekken.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model",
})


def foreign_entries(path: str | Path) -> list[str]:
    """Names in checkpoint directory ``path`` that gqsa does not write (any subdirectory, any other file)."""
    return sorted(p.name for p in Path(path).iterdir()
                  if p.is_dir() or not (p.name in _WRITTEN_NAMES or fnmatch.fnmatch(p.name, "model*.safetensors")))


def _first_names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Check, before any work, that a compression may write its output directory ``out``.

    Args:
        out: the output directory as the user gave it.
        overwrite: an existing output may be replaced; only one that gqsa wrote (``is_gqsa_output``).
        inputs: the input model's files or directories; ``out`` must neither be one of them nor contain one.

    Returns:
        ``out`` as an absolute path.

    Raises:
        ValueError: ``out`` is empty, or equals or contains an input.
        FileExistsError: ``out`` is a file, or a non-empty directory without ``overwrite``, or with ``overwrite``
            a directory that gqsa did not write, or a gqsa checkpoint that also holds files gqsa does not write
            (``foreign_entries``; they are named).
        PermissionError / OSError: the place where ``out`` would be created is not writable (or on a read-only
            file system).
    """
    if not str(out).strip():
        raise ValueError("the output directory is empty (''); name a directory to write the checkpoint to")
    path = Path(out).expanduser().resolve()
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if path == source or path in source.parents:
            raise ValueError(f"the output {path} {'is' if path == source else 'contains'} the input model "
                             f"{source}; writing there would replace it: choose another output directory")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"the output {path} is an existing file, not a directory; choose a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass --overwrite to replace it")
        if not is_gqsa_output(path):
            shown = _first_names(sorted(p.name for p in path.iterdir()))
            raise FileExistsError(f"{path} holds files gqsa did not write ({shown}); --overwrite replaces only a "
                                  "gqsa checkpoint: choose another output directory or empty this one")
        foreign = foreign_entries(path)
        if foreign:
            shown = _first_names(foreign)
            raise FileExistsError(f"{path} is a gqsa checkpoint but also holds files gqsa does not write ({shown}); "
                                  "--overwrite would delete them: move them out or choose another output directory")
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))
    return path
