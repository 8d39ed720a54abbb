"""Calibration activations, one tensor per window: in memory up to a byte budget, on disk beyond it.

Block-by-block calibration keeps every window's hidden states between blocks (n windows x L tokens x D floats,
twice: a block's inputs and its outputs). For large models or many windows that does not fit; past the budget,
tensors are written to a temporary directory and memory-mapped back when read, so resident memory stays
bounded by the budget plus one window. A spill directory is named after its process, so the next run removes
those of killed runs (``gqsa.utils.io.remove_stale_temporaries``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from gqsa.utils.io import owned_prefix, remove_stale_temporaries


class ActivationStore:
    """An append-only list of tensors that spills to disk past ``budget_bytes``.

    Args:
        budget_bytes: bytes kept in memory; None = no limit, 0 = everything on disk.
        directory: where the spill directory is created (default: the system temporary directory).

    Use as a context manager (or call ``close``) so spilled files are removed.
    """

    def __init__(self, budget_bytes: int | None = None, directory: str | Path | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"ActivationStore: budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.directory = None if directory is None else Path(directory)
        self._items: list[torch.Tensor | tuple[Path, torch.device]] = []
        self._memory_bytes = 0
        self._spill: Path | None = None

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory."""
        return self._memory_bytes

    @property
    def spilled(self) -> int:
        """How many tensors live on disk."""
        return sum(isinstance(x, tuple) for x in self._items)

    def append(self, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (detached; in memory if it fits the budget, else on disk)."""
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.budget_bytes is None or self._memory_bytes + size <= self.budget_bytes:
            self._items.append(tensor)
            self._memory_bytes += size
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
        if isinstance(item, tuple):  # on disk: memory-mapped, moved back to the device it came from
            path, device = item
            return torch.load(path, mmap=True, weights_only=True).to(device)
        return item

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self._items)):
            yield self[i]

    def close(self) -> None:
        """Drop every tensor and remove the spill directory."""
        self._items.clear()
        self._memory_bytes = 0
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
