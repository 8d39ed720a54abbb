"""An exclusive lock on an output path, so that two runs never write the same output (or its resume state).

The lock is an advisory ``flock`` on ``.<name>.gqsa-lock`` beside the output; it is released when its holder
exits, however it exits (the kernel drops the lock of a killed process), so a stale lock never blocks a later
run. The file records who holds it (pid, host, start time, command line) for the message a second run gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: no advisory locks
    fcntl = None


class OutputLockedError(FileExistsError):
    """Another process holds the lock on this output (a FileExistsError: the output is taken)."""


def lock_path(output: str | Path) -> Path:
    """The lock file of ``output``: ``.<name>.gqsa-lock`` in the same directory."""
    output = Path(output)
    return output.parent / f".{output.name}.gqsa-lock"


class OutputLock:
    """Hold an exclusive lock on ``output`` (a file or directory that need not exist yet) while in the ``with``.

    Creating the lock file is also the first write beside the output: a directory that cannot be created or
    written fails here, before any work, with the OSError that names it.

    Args:
        output: the path to be written.
        what: the holder's description stored in the lock file (default: this process's command line).

    Raises:
        OutputLockedError: another live process holds the lock (the message names it).
        OSError: the lock file cannot be created (read-only file system, permissions, ...).
    """

    def __init__(self, output: str | Path, what: str | None = None) -> None:
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.what = what if what is not None else " ".join(sys.argv)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"{self.output} is being written by another gqsa run ({holder}); wait for it to finish or "
                    "choose another output"
                ) from None
            # the holder before us may have removed the file between our open and our lock: lock the file that
            # is at the path now
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": self.what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "holder unknown"
        return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
                f"{info.get('command')}")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiting process then locks a fresh file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
