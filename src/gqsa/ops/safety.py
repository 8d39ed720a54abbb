"""The index checks that keep every kernel inside its buffers, run once per index tensor instead of per call.

The kernels (native CPU, Triton, the reference's indexing) read ``x`` at ``col_indices * group_size`` and size
per-row buffers by the number of column groups: a packed weight with an index out of range or rows that overlap
would make them read (or write) outside their buffers. ``PackedWeight.validate`` checks every format rule where
weights enter (checkpoint loading, ``from_pretrained``, resume state); this module is the kernels' own guard for
tensors that reach them any other way (a ``PackedWeight`` built by hand, buffers edited in place): before a
kernel runs on ``(crow_indices, col_indices)`` for the first time, ``check_kernel_indices`` runs
``gqsa.format.packed.check_indices`` on them and remembers the pair (``gqsa.ops.tensor_cache``: keyed by the
tensors themselves, their data pointers, shapes and version counters). A later call with the same, unmodified
tensors costs one dictionary lookup; any in-place change (``t[i] = v``, ``copy_``, ``load_state_dict``) bumps
the version counter and the indices are checked again. Writes that bypass the version counter (through ``.data``, a NumPy view or a raw pointer) are not
seen: they are outside what PyTorch itself tracks.
"""

from __future__ import annotations

import torch

from gqsa.format.packed import check_indices
from gqsa.ops.tensor_cache import TensorCache

_checked = TensorCache()  # (crow_indices, col_indices, num_groups) -> True once checked


def check_kernel_indices(crow_indices: torch.Tensor, col_indices: torch.Tensor, in_features: int, group_size: int,
                         name: str = "gqsa::linear") -> None:
    """Raise unless the row pointers and column-group indices keep a kernel inside its buffers (cached).

    Args:
        crow_indices: (out_features + 1,) row pointers; col_indices: (nnz,) column-group indices (shapes and
            dtypes already checked by the caller).
        in_features, group_size: the weight's; the indices must lie in [0, in_features // group_size).
        name: what the message calls the weight.

    Raises:
        gqsa.format.packed.FormatError: naming the broken rule (a ValueError).
    """
    if crow_indices.is_meta:
        return
    num_groups = in_features // group_size
    _checked.get((crow_indices, col_indices), (num_groups,),
                 lambda: check_indices(crow_indices, col_indices, num_groups, name) or True)
