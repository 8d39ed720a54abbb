"""Memory and sizes for ``gqsa bench e2e``: a worker's resident memory (now and its high-water mark) and the bytes
a model holds and a decode step reads."""

from __future__ import annotations

import resource
from pathlib import Path

from torch import nn


def _status_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (peak where the current value cannot be read)."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, in MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def is_dynamic_int8(module: nn.Module) -> bool:
    """A torch.ao dynamic quantized linear (not its inner ``LinearPackedParams``, which holds the same weight)."""
    return isinstance(getattr(module, "_packed_params", None), nn.Module) and hasattr(module, "_weight_bias")


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every tensor of the model, bytes a decode step reads), shared tensors counted once.

    The second leaves out the input embedding table unless it is also the LM head (tied): a decode step reads
    one row of it. torch.ao's dynamic int8 linears count their int8 weight and float bias.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = (embedding is not None and head is not None and getattr(head, "weight", None) is not None
            and head.weight is getattr(embedding, "weight", None))
    embedding_bytes = 0
    for module in model.modules():
        if is_dynamic_int8(module):  # its weight and bias live in a packed object, unshared
            total += sum(t.numel() * t.element_size() for t in module._weight_bias() if t is not None)
        for t in [*module._parameters.values(), *module._buffers.values()]:
            key = None if t is None else (t.untyped_storage().data_ptr(), t.storage_offset())
            if key is None or key in seen:
                continue
            seen.add(key)
            nbytes = t.numel() * t.element_size()
            total += nbytes
            if module is embedding and not tied:
                embedding_bytes += nbytes
    return total, total - embedding_bytes
