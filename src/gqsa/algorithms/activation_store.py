"""Calibration activations, one tensor per window: where they are computed up to a byte budget, then in host
memory (for a GPU's tensors) up to a second budget, then on disk.

Block-by-block calibration keeps every window's hidden states between blocks (n windows x L tokens x D floats,
twice: a block's inputs and its outputs). For large models or many windows that does not fit on the device; past
its budget, a GPU's tensors move to (pinned) host memory, and past that budget too, tensors are written to a
temporary directory and memory-mapped back when read, so resident memory stays bounded by the budgets plus one
window. Every tensor is read back on the device it came from. A spill directory is named after its process, so
the next run removes those of killed runs (``gqsa.utils.io.remove_stale_temporaries``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from gqsa.utils.io import owned_prefix, remove_stale_temporaries


def _on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory, pinned where a CUDA device can read it back asynchronously."""
    if not torch.cuda.is_available():
        return tensor.cpu()
    return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor)  # one copy, straight to pinned


class ActivationStore:
    """An append-only list of tensors: where they are up to ``budget_bytes``, in host memory up to
    ``host_budget_bytes`` (tensors not already there), on disk beyond.

    Args:
        budget_bytes: bytes kept where each tensor was made (the compute device); None = no limit, 0 = none.
        directory: where the spill directory is created (default: the system temporary directory).
        host_budget_bytes: bytes of a GPU's tensors kept in host memory once the device budget is full (0 = none:
            straight to disk). Host tensors never count here: for them ``budget_bytes`` is host memory.

    Use as a context manager (or call ``close``) so spilled files are removed.
    """

    def __init__(self, budget_bytes: int | None = None, directory: str | Path | None = None,
                 host_budget_bytes: int = 0) -> None:
        for name, value in (("budget_bytes", budget_bytes), ("host_budget_bytes", host_budget_bytes)):
            if value is not None and value < 0:
                raise ValueError(f"ActivationStore: {name} must be >= 0 or None, got {value}")
        self.budget_bytes = budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.directory = None if directory is None else Path(directory)
        # a tensor where it was made; (host copy, device) in host memory; (path, device) on disk
        self._items: list[torch.Tensor | tuple[torch.Tensor | Path, torch.device]] = []
        self._memory_bytes = 0
        self._host_bytes = 0
        self._spill: Path | None = None

    @property
    def memory_bytes(self) -> int:
        """Bytes held where the tensors were made."""
        return self._memory_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes of other devices' tensors held in host memory."""
        return self._host_bytes

    @property
    def on_host(self) -> int:
        """How many tensors of another device live in host memory."""
        return sum(isinstance(x, tuple) and isinstance(x[0], torch.Tensor) for x in self._items)

    @property
    def spilled(self) -> int:
        """How many tensors live on disk."""
        return sum(isinstance(x, tuple) and isinstance(x[0], Path) for x in self._items)

    def append(self, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (detached): where it is if it fits the budget, else in host memory if it comes from
        another device and fits the host budget, else on disk."""
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.budget_bytes is None or self._memory_bytes + size <= self.budget_bytes:
            self._items.append(tensor)
            self._memory_bytes += size
            return
        if not _on_host(tensor) and self._host_bytes + size <= self.host_budget_bytes:
            self._items.append((_to_host(tensor), tensor.device))
            self._host_bytes += size
            return
        if self._spill is None:
            parent = Path(tempfile.gettempdir()) if self.directory is None else self.directory
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(parent)  # spill directories of killed runs
            self._spill = Path(tempfile.mkdtemp(prefix=owned_prefix("gqsa-activations"), suffix=".tmp", dir=parent))
        path = self._spill / f"{len(self._items):06d}.pt"
        torch.save(tensor.cpu().contiguous(), path)
        self._items.append((path, tensor.device))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if not isinstance(item, tuple):
            return item
        where, device = item
        if isinstance(where, torch.Tensor):  # in host memory: back to its device
            return where.to(device, non_blocking=True)
        return torch.load(where, mmap=True, weights_only=True).to(device)  # on disk: memory-mapped, moved back

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def close(self) -> None:
        """Drop every tensor and remove the spill directory."""
        self._items.clear()
        self._memory_bytes = self._host_bytes = 0
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
