"""Atomic file and directory writes: a crash never leaves a half-written output where a complete one is expected.

Every temporary file or directory gqsa creates is named after its owner, ``<stem>~gqsa-<host>-<pid>-<random>``
plus ``.tmp`` (or ``.old`` for a directory being replaced), so that a later run can tell the leftovers of a killed
run (same host, process gone) from the work of a run still going, and remove them: ``remove_stale_temporaries``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# <stem>~gqsa-<host>-<pid>-<random>.tmp|.old; mkstemp/mkdtemp's random part is [a-z0-9_]
_OWNED = re.compile(r"~gqsa-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+\.(tmp|old)$")


def _host() -> str:
    return socket.gethostname().replace("~", "_") or "localhost"


def owned_prefix(stem: str) -> str:
    """The name prefix of a temporary owned by this process (mkstemp / mkdtemp add the random part)."""
    return f"{stem}~gqsa-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.lstat().st_size


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries that killed gqsa processes of this host left in ``directory``.

    Only entries named by ``owned_prefix`` whose process no longer runs are touched; those of live processes
    and of other hosts (a shared file system) stay. A directory that was being replaced (``.old``) whose
    replacement never arrived is moved back to its name instead.

    Args:
        directory: where to look (not recursive); a missing directory has nothing to remove.

    Returns:
        The removed paths (each one is also logged with its size).
    """
    directory = Path(directory)
    removed = []
    host = _host()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _OWNED.search(entry.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        target = directory / entry.name[1:match.start()]
        if entry.name.endswith(".old") and not target.exists():
            # killed between moving the previous output aside and moving the new one in: the previous one is
            # the only complete copy, so it goes back
            with contextlib.suppress(OSError):
                os.replace(entry, target)
                logger.warning("restored %s from %s, left by a gqsa process (pid %s) that was killed", target,
                               entry, match["pid"])
            continue
        with contextlib.suppress(OSError):
            size = _size(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
            logger.warning("removed %s (%.1f MiB), left by a gqsa process (pid %s) that was killed", entry,
                           size / 2**20, match["pid"])
    return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp's files are 0o600."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode a plainly created directory gets (0o777 less the umask); mkdtemp's directories are 0o700."""
    return 0o777 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename.

    The file gets the permissions an existing ``path`` had, else those of a plainly created file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = _default_mode()
    fd, tmp = tempfile.mkstemp(prefix=owned_prefix(f".{path.name}"), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    On any exception the temporary directory is removed and ``path`` is left exactly as it was. The new
    directory gets the mode of a plainly created one (the umask's), not the temporary's 0o700. Temporaries that
    killed runs left beside ``path`` are removed first (``remove_stale_temporaries``).

    Args:
        path: final directory.
        overwrite: replace an existing ``path``; without it an existing non-empty ``path`` is an error.

    Raises:
        FileExistsError: ``path`` exists, is not empty, and ``overwrite`` is False, or is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(f".{path.name}"), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, default_dir_mode())
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=owned_prefix(f".{path.name}"), suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def unreadable(what: str, error: type[ValueError] = ValueError) -> Iterator[None]:
    """Turn what a reader of files raises for files it cannot read (transformers, gguf, safetensors, tokenizers:
    many types) into one ``error`` (a ValueError): ``"<what>: <type>: <message>"``. Errors of the machine (out of
    memory, a failing disk: an OSError with an errno) pass through as they are."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno is not None):
            raise
        raise error(f"{what}: {type(exc).__name__}: {exc}") from exc
