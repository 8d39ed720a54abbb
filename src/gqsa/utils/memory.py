"""Give freed heap memory back to the operating system between the blocks of a long run.

glibc's allocator raises its mmap threshold after large frees (up to 32 MiB), so a block's dense tensors of a few
MiB each are then served from the heap, and once freed they stay in the process's resident memory: a run that
reads one block at a time would grow as if it held them all. ``trim_heap`` asks glibc to release what is free
(``malloc_trim``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> None:
    """Release free heap memory to the operating system (glibc ``malloc_trim(0)``), where the C library has it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
