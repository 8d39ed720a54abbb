"""Check that a GGUF file is whole before it is converted: its header parses and its tensors fit in the file.

transformers (through the ``gguf`` package) memory-maps the file and meets a truncated one as "cannot reshape
array of size ...", naming neither the file nor the cause. Reading the header here, with every read bounded by
the file's size, says instead where the file ends and how long its header says it should be.

GGUF layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic ``GGUF``, uint32 version, uint64
tensor count, uint64 key-value count; the key-value pairs; per tensor its name, uint32 rank, uint64 dims, uint32
ggml type and uint64 offset (relative to the data section); the data section starts at the next multiple of
``general.alignment`` (default 32). Little-endian, or big-endian as a whole file (the version then reads with
its low 16 bits zero).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_ALIGNMENT_KEY = "general.alignment"
# GGUF value type -> struct format of one scalar; 8 = string and 9 = array are read apart.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    """The file ends before the field being read."""


class _Corrupted(Exception):
    """A field holds a value no GGUF writer produces."""


class _Reader:
    """Bounded sequential reads of a binary file: reading past the end raises ``_Truncated`` naming the field."""

    def __init__(self, f, size: int, order: str = "<") -> None:
        self.f, self.size, self.order, self.pos = f, size, order, 0

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise _Truncated(f"it ends inside its header, in {what}")
        data = self.f.read(n)
        self.pos += n
        return data

    def unpack(self, fmt: str, what: str):
        return struct.unpack(self.order + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"the length of {what}")
        return self.read(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str):
        """One value of GGUF type ``vtype``; arrays are skipped (None), as only scalars are needed here."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype = self.unpack("I", f"the item type of {what}")
            count = self.unpack("Q", f"the length of {what}")
            if itype in _SCALARS:
                self.read(count * struct.calcsize(_SCALARS[itype]), what)
            elif itype in (_STRING, _ARRAY):
                for i in range(count):
                    self.value(itype, f"item {i} of {what}")
            else:
                raise _Corrupted(f"{what} has unknown item type {itype}")
            return None
        raise _Corrupted(f"{what} has unknown value type {vtype}")


def _block_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (values per block, bytes per block), from the ``gguf`` package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(kind): sizes for kind, sizes in GGML_QUANT_SIZES.items()}


def _parse(reader: _Reader) -> int:
    """Read the header; return the byte count the file needs (end of its last tensor's data)."""
    reader.read(4, "the magic bytes")
    version = reader.unpack("I", "the version")
    if version & 0xFFFF == 0:  # a big-endian file
        reader.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise _Corrupted(f"GGUF version {version} is not 2 or 3")
    n_tensors = reader.unpack("Q", "the tensor count")
    n_kv = reader.unpack("Q", "the metadata count")
    alignment = _DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = reader.string(f"metadata key {i} of {n_kv}")
        vtype = reader.unpack("I", f"the type of metadata {key!r}")
        value = reader.value(vtype, f"metadata {key!r}")
        if key == _ALIGNMENT_KEY:
            if not isinstance(value, int) or value <= 0:
                raise _Corrupted(f"{_ALIGNMENT_KEY} is {value!r}")
            alignment = value
    sizes = _block_sizes()
    end = 0
    for i in range(n_tensors):
        what = f"tensor info {i} of {n_tensors}"
        name = reader.string(what)
        rank = reader.unpack("I", f"the rank of tensor {name!r}")
        if rank > 8:
            raise _Corrupted(f"tensor {name!r} has rank {rank}")
        dims = [reader.unpack("Q", f"the shape of tensor {name!r}") for _ in range(rank)]
        kind = reader.unpack("I", f"the type of tensor {name!r}")
        offset = reader.unpack("Q", f"the offset of tensor {name!r}")
        if kind not in sizes:
            raise _Corrupted(f"tensor {name!r} has unknown ggml type {kind}")
        block, block_bytes = sizes[kind]
        count = math.prod(dims)
        if count % block:
            raise _Corrupted(f"tensor {name!r} of shape {dims} does not fill whole blocks of {block} values")
        end = max(end, offset + count // block * block_bytes)
    data_start = -(-reader.pos // alignment) * alignment
    return data_start + end


def check_gguf_file(path: str | Path) -> None:
    """Check that a GGUF file's header parses and that the file holds every byte of its tensors.

    Args:
        path: a file that starts with the GGUF magic bytes.

    Raises:
        ValueError: naming the file and its size, and either where the header is cut or corrupted, or the size
            its tensors need ("truncated: its tensors need N bytes but the file has M").
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        reader = _Reader(f, size)
        try:
            needed = _parse(reader)
        except _Truncated as exc:
            raise ValueError(f"GGUF file {path} ({size} bytes) is truncated: {exc}; download or copy it again") from exc
        except _Corrupted as exc:
            raise ValueError(f"GGUF file {path} ({size} bytes) is corrupted: {exc}; download or copy it again") from exc
    if needed > size:
        raise ValueError(f"GGUF file {path} is truncated: its tensors need {needed} bytes but the file has {size}; "
                         "download or copy it again")
