"""Module surgery on transformers models: swap packed layers in, find them, describe them for a checkpoint.

``swap_in_packed_shells`` replaces the ``nn.Linear`` (or ``nn.Embedding``) modules named in a checkpoint's
``layers`` map by empty ``PackedLinear`` (``PackedEmbedding``) shells, on the meta device for a skeleton that a
state dict then fills; loaders (``gqsa.models.checkpoints``, transformers' ``from_pretrained`` through
``gqsa.models.hf_integration``) build on it.
"""

from __future__ import annotations

import torch
from torch import nn

from gqsa.format.checkpoint import CheckpointError
from gqsa.nn.packed_embedding import PackedEmbedding
from gqsa.nn.packed_linear import PackedLinear

LAYER_KEYS = ("out_features", "in_features", "group_size", "bits", "symmetric", "nnz", "bias")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """Every PackedLinear of the model by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def layer_metadata(model: nn.Module) -> dict[str, dict]:
    """Per packed layer, what a loader needs to build it empty (``PackedLinear.metadata``), and the same for a
    packed input embedding (``PackedEmbedding.metadata``, marked ``"kind": "embedding"``)."""
    out = {name: m.metadata() for name, m in packed_layers(model).items()}
    out.update({name: m.metadata() for name, m in model.named_modules() if isinstance(m, PackedEmbedding)})
    return out


def swap_in_packed_shells(
    model: nn.Module, layers: dict[str, dict], dtype: torch.dtype | None = None, device: str = "meta"
) -> None:
    """Replace the named ``nn.Linear`` modules by empty PackedLinear layers shaped by ``layers``' metadata (and an
    ``nn.Embedding`` by an empty PackedEmbedding for an entry of ``"kind": "embedding"``).

    Raises:
        CheckpointError: a layer is missing from the model, is not a linear layer, or has other dimensions.
    """
    for name, meta in layers.items():
        missing = [k for k in LAYER_KEYS if k not in meta]
        if missing:
            raise CheckpointError(f"layer {name!r}: metadata lacks {missing}")
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"layer {name!r} does not exist in the {type(model).__name__} skeleton") from exc
        if meta.get("kind", "linear") == "embedding":
            if not isinstance(old, (nn.Embedding, PackedEmbedding)):
                raise CheckpointError(f"layer {name!r} is a {type(old).__name__}, not an embedding")
            if (old.num_embeddings, old.embedding_dim) != (meta["out_features"], meta["in_features"]):
                raise CheckpointError(
                    f"embedding {name!r}: checkpoint has {meta['out_features']}x{meta['in_features']} but the "
                    f"model config gives {old.num_embeddings}x{old.embedding_dim}")
            table_dtype = old.weight.dtype if isinstance(old, nn.Embedding) else old.dtype
            set_submodule(model, name, PackedEmbedding.empty(meta, dtype=dtype or table_dtype, device=device))
            continue
        if meta.get("kind", "linear") != "linear":
            raise CheckpointError(f"layer {name!r}: unknown kind {meta['kind']!r} (this gqsa reads 'linear' and "
                                  "'embedding')")
        if not isinstance(old, (nn.Linear, PackedLinear)):
            raise CheckpointError(f"layer {name!r} is a {type(old).__name__}, not a linear layer")
        if (old.in_features, old.out_features) != (meta["in_features"], meta["out_features"]):
            raise CheckpointError(
                f"layer {name!r}: checkpoint has {meta['out_features']}x{meta['in_features']} but the model "
                f"config gives {old.out_features}x{old.in_features}"
            )
        bias_dtype = dtype or (old.bias.dtype if getattr(old, "bias", None) is not None else torch.float32)
        shell = PackedLinear(
            meta["in_features"],
            meta["out_features"],
            bits=meta["bits"],
            group_size=meta["group_size"],
            nnz=meta["nnz"],
            symmetric=meta["symmetric"],
            bias=meta["bias"],
            dtype=bias_dtype,
            device=device,
        )
        set_submodule(model, name, shell)
