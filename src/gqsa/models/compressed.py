"""Compressed transformers models: swap packed layers in, save, and load without dense weights.

``save_compressed`` writes (atomically) ``model.safetensors``, ``gqsa_config.json``, the transformers config
(with a ``quantization_config`` naming gqsa) and the tokenizer. ``load_compressed`` builds the model skeleton on
the meta device, swaps in empty ``GQSALinear`` shells, checks the weights file against ``gqsa_config.json`` and
the skeleton, and loads it with ``assign=True``: no dense weight is ever materialised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from gqsa._version import __version__
from gqsa.format.checkpoint import (
    GQSA_CONFIG_NAME,
    CheckpointError,
    read_gqsa_config,
    read_weights,
    verify_tensors,
    write_weights,
)
from gqsa.format.packed import FORMAT_VERSION, summarize_layers
from gqsa.models.outputs import PRUNED_CONFIG_NAME
from gqsa.nn.packed_embedding import PackedEmbedding
from gqsa.nn.packed_linear import GQSALinear
from gqsa.utils import jsonio
from gqsa.utils.io import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

LAYER_KEYS = ("out_features", "in_features", "group_size", "bits", "symmetric", "nnz", "bias")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def packed_layers(model: nn.Module) -> dict[str, GQSALinear]:
    """Every GQSALinear of the model by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GQSALinear)}


def layer_metadata(model: nn.Module) -> dict[str, dict]:
    """Per packed layer, what a loader needs to build it empty (``GQSALinear.metadata``), and the same for a
    packed input embedding (``PackedEmbedding.metadata``, marked ``"kind": "embedding"``)."""
    out = {name: m.metadata() for name, m in packed_layers(model).items()}
    out.update({name: m.metadata() for name, m in model.named_modules() if isinstance(m, PackedEmbedding)})
    return out


def swap_in_packed_shells(
    model: nn.Module, layers: dict[str, dict], dtype: torch.dtype | None = None, device: str = "meta"
) -> None:
    """Replace the named ``nn.Linear`` modules by empty GQSALinear layers shaped by ``layers``' metadata (and an
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
        if not isinstance(old, (nn.Linear, GQSALinear)):
            raise CheckpointError(f"layer {name!r} is a {type(old).__name__}, not a linear layer")
        if (old.in_features, old.out_features) != (meta["in_features"], meta["out_features"]):
            raise CheckpointError(
                f"layer {name!r}: checkpoint has {meta['out_features']}x{meta['in_features']} but the model "
                f"config gives {old.out_features}x{old.in_features}"
            )
        bias_dtype = dtype or (old.bias.dtype if getattr(old, "bias", None) is not None else torch.float32)
        shell = GQSALinear(
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


def _untie_word_embeddings(model: nn.Module) -> None:
    """``tie_word_embeddings = False`` in the model's config and its text config (multimodal models have both)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def pack_lm_head(
    model: nn.Module, bits: int = 4, group_size: int = 16, symmetric: bool = False, qparam_method: str = "minmax"
) -> GQSALinear:
    """Store the LM head in the packed format at sparsity 0: every group kept, rounded to nearest per group.

    A small model's LM head is one of its largest matrices (SmolLM2-135M: 49152 x 576, as many weights as 50 of
    its decoder linear layers) and is read in full for every generated token. A head tied to the input
    embeddings is untied (``config.tie_word_embeddings`` becomes False): the embeddings stay dense for the
    lookup, and the packed head is saved and loaded like any packed layer.

    Args:
        model: a transformers causal LM whose output embedding is an ``nn.Linear``.
        bits, group_size, symmetric, qparam_method: the quantization (``gqsa.QuantSpec``'s meaning).

    Returns:
        The new GQSALinear, already swapped into the model.

    Raises:
        ValueError: the head is already packed or not a linear layer, or the quantization is invalid for it.
    """
    from gqsa.config import QuantSpec
    from gqsa.format.packed import quantize_to_packed

    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, qparam_method=qparam_method)
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if isinstance(head, GQSALinear):
        raise ValueError(f"the LM head {name!r} is already packed")
    if not isinstance(head, nn.Linear) or name is None:
        raise ValueError(f"the LM head must be an nn.Linear, got {type(head).__name__}")
    spec.check_in_features(head.in_features, layer=name)
    weight = head.weight.detach()  # (vocab, hidden)
    keep = torch.ones(head.out_features, head.in_features // group_size, dtype=torch.bool)  # (vocab, G)
    packed = quantize_to_packed(weight, keep, bits, group_size, symmetric, qparam_method).to(weight.device)
    bias = None if head.bias is None else head.bias.detach()
    layer = GQSALinear.from_packed(packed, bias)
    set_submodule(model, name, layer)
    _untie_word_embeddings(model)
    logger.info("LM head %s packed: W%d g%d, %.2f bits per weight", name, spec.bits, spec.group_size,
                packed.bits_per_weight())
    return layer


def pack_embedding(
    model: nn.Module, bits: int = 8, group_size: int = 16, symmetric: bool = False, qparam_method: str = "minmax"
) -> PackedEmbedding:
    """Store the input embedding table in the packed format at sparsity 0 (lookups dequantize their rows).

    Shrinks the model: the dense table is released unless something else still holds it. A head tied to the
    embeddings holds it, so pack the LM head first (``pack_lm_head`` unties it); a dense head that shared the table
    keeps it as its own weight (the model is untied). ``gqsa.save`` stores the packed table, and loading such a
    checkpoint never builds the dense one.

    Args:
        model: a transformers causal LM whose input embedding is a plain ``nn.Embedding``.
        bits, group_size, symmetric, qparam_method: the quantization (``gqsa.QuantSpec``'s meaning).

    Returns:
        The new PackedEmbedding, already set as the model's input embedding.

    Raises:
        ValueError: the embedding is not a plain nn.Embedding (already packed, or scaled as Gemma's), or the
            quantization is invalid for it.
    """
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"the input embedding must be a plain nn.Embedding, got {type(embedding).__name__}")
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        logger.warning("the LM head is tied to the input embedding and keeps the dense table in memory; "
                       "pack the LM head first (pack_lm_head) to release it")
        _untie_word_embeddings(model)
    packed = PackedEmbedding.from_embedding(embedding, bits, group_size, symmetric, qparam_method)
    model.set_input_embeddings(packed)
    logger.info("input embedding packed: W%d g%d, %.2f bits per weight", bits, group_size,
                packed.packed_weight().bits_per_weight())
    return packed


def _tied_duplicates(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is the same storage as an earlier key's (tied weights): dropped key -> kept key."""
    seen: dict[tuple[int, int, tuple], str] = {}
    tied = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def model_summary(model: nn.Module) -> dict:
    """Sizes of a (compressed) model: packed layers, their bits per weight, sparsity, bytes of everything."""
    summary = summarize_layers([(m.metadata(), m.packed_weight().nbytes()) for m in packed_layers(model).values()])
    state = model.state_dict()
    tied = _tied_duplicates(state)
    total_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k not in tied)
    return {
        **summary,
        "model_bytes": total_bytes,
    }


def save_compressed(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    compression: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a compressed model as a gqsa checkpoint directory, atomically.

    Args:
        model: a transformers model whose compressed linears are GQSALinear.
        tokenizer: saved beside it (may be None).
        out_dir: target directory; it appears complete or not at all.
        compression: the resolved compression config (``CompressConfig.to_dict()``), recorded in gqsa_config.json.
        overwrite: replace an existing non-empty ``out_dir``.
        extra_files: file name -> text written into the directory with the rest (a report, the resolved config).

    Returns:
        The directory.
    """
    from gqsa.models.hf_integration import quantization_config_dict

    out_dir = Path(out_dir)
    layers = layer_metadata(model)
    if not layers:
        raise ValueError("save_compressed: the model has no GQSALinear layer; compress it first")
    state = model.state_dict()
    tied = _tied_duplicates(state)
    for name in tied:
        del state[name]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        weights = write_weights(tmp, state)
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.quantization_config = quantization_config_dict(layers)
        if getattr(config, "dtype", None) is None:
            # Else transformers infers it from the first float tensor of the file, which can be an fp16 scale.
            config.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gqsa_config = {
            "format": "gqsa",
            "format_version": FORMAT_VERSION,
            "gqsa_version": __version__,
            "compression": compression,
            "layers": layers,
            "tied": tied,
            "weights": weights,
            "summary": model_summary(model),
        }
        atomic_write_text(tmp / GQSA_CONFIG_NAME, jsonio.dumps(gqsa_config, indent=1, sort_keys=True) + "\n")
        _write_extra(tmp, extra_files)
    logger.info("saved compressed model to %s", out_dir)
    return out_dir




def _write_extra(directory: Path, files: dict[str, str] | None) -> None:
    for name, text in (files or {}).items():
        if Path(name).name != name or name in (GQSA_CONFIG_NAME, PRUNED_CONFIG_NAME):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than gqsa's own")
        atomic_write_text(directory / name, text)


def save_pruned(
    model: nn.Module, tokenizer, out_dir: str | Path, compression: dict | None = None, overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a model pruned in float (unstructured / N:M baselines) as a plain transformers checkpoint, atomically.

    The zeros are stored, so ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` and every gqsa
    evaluation load it as is; ``gqsa_pruned.json`` records how it was made. ``extra_files`` as ``save_compressed``.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {"format": "transformers (dense storage, pruned weights are zeros)", "gqsa_version": __version__,
                  "compression": compression}
        atomic_write_text(tmp / PRUNED_CONFIG_NAME, jsonio.dumps(record, indent=1, sort_keys=True) + "\n")
        _write_extra(tmp, extra_files)
    logger.info("saved pruned model to %s", out_dir)
    return out_dir


def _materialize_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies, embedding scales) are not in the checkpoint: recompute them."""
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not metas:
            continue
        for n in metas:
            module._buffers[n] = torch.empty_like(module._buffers[n], device=device)
        for p in module.parameters(recurse=False):
            p._is_hf_initialized = True
        model._init_weights(module)


def verify_loaded_model(model: nn.Module, weights: Path, gqsa_config: dict, verify_checksums: bool = True) -> None:
    """Check a model that another loader (transformers' ``from_pretrained``) filled from a gqsa checkpoint.

    Args:
        model: the loaded model (packed layers swapped in from ``gqsa_config["layers"]``).
        weights: the checkpoint's weights file; gqsa_config: its ``gqsa_config.json`` (``read_gqsa_config``).
        verify_checksums: compare every tensor's SHA-256 with the record.

    Raises:
        CheckpointError: a tensor the model holds that the checkpoint does not record (or the reverse), left
            unloaded, corrupted, non-finite, or a packed layer that breaks the format's rules.
    """
    tied = gqsa_config.get("tied", {})
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    recorded = gqsa_config["weights"]["tensors"]
    unrecorded = sorted(set(state) - set(recorded))
    if unrecorded:
        raise CheckpointError(f"{weights}: tensor {unrecorded[0]!r} needed by the model is not in the checkpoint")
    unloaded = sorted(k for k, v in state.items() if v.is_meta)
    if unloaded:
        raise CheckpointError(f"{weights}: tensor {unloaded[0]!r} was not loaded (gqsa checkpoints cannot be "
                              "offloaded to disk)")
    verify_tensors(weights, gqsa_config, state, verify_checksums)


def _skeleton(path: Path) -> tuple[nn.Module, dict, dict]:
    """The checkpoint's model on the meta device with its packed shells, its ``gqsa_config.json``, and the shape
    and dtype of every tensor the model needs from the weights file (tied duplicates excluded).

    Raises:
        CheckpointError: ``gqsa_config.json`` or ``config.json`` missing, unreadable or disagreeing, or layer
            metadata that does not fit the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gqsa_config = read_gqsa_config(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{config_path}: cannot be read ({exc})") from exc
    hf_layers = (getattr(config, "quantization_config", None) or {}).get("layers")
    if hf_layers is not None and hf_layers != gqsa_config["layers"]:
        raise CheckpointError(f"{config_path}: quantization_config.layers disagrees with {GQSA_CONFIG_NAME}")
    config.quantization_config = None
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    swap_in_packed_shells(model, gqsa_config["layers"], device="meta")
    tied = gqsa_config.get("tied", {})
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items() if k not in tied}
    return model, gqsa_config, expected


def check_checkpoint(path: str | Path, verify_checksums: bool = True) -> dict:
    """Every check ``load_compressed`` makes, without building the model's weights (``gqsa info``).

    Args:
        path: checkpoint directory.
        verify_checksums: compare every tensor's SHA-256 with its record (one pass over the bytes).

    Returns:
        The checkpoint's ``gqsa_config.json``.

    Raises:
        CheckpointError: naming the file and the tensor, as ``load_compressed``.
    """
    path = Path(path)
    _, gqsa_config, expected = _skeleton(path)
    read_weights(path, gqsa_config, expected=expected, verify_checksums=verify_checksums)
    return gqsa_config


def check_pruned_checkpoint(path: str | Path) -> None:
    """Check that a float baseline checkpoint (plain transformers files + ``gqsa_pruned.json``) can be loaded:
    its records and config parse, and its safetensors files are complete (their headers, not their bytes).

    Raises:
        CheckpointError: naming the file that is missing, unreadable or truncated.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    for name in (PRUNED_CONFIG_NAME, "config.json"):
        try:
            json.loads((path / name).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path / name}: cannot be read ({exc})") from exc
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: not a model config ({exc})") from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights file")
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error type; name the file
            raise CheckpointError(f"{file}: truncated or corrupted ({exc})") from exc


def load_compressed(path: str | Path, device: str | torch.device = "cpu", verify_checksums: bool = True):
    """Load a gqsa checkpoint as a transformers model (and its tokenizer) without dense weights.

    Args:
        path: checkpoint directory written by ``save_compressed``.
        device: where the tensors go.
        verify_checksums: check each tensor's SHA-256 against gqsa_config.json.

    Returns:
        (model in eval mode, tokenizer or None).

    Raises:
        CheckpointError: naming the file and tensor for truncated, corrupted, version- or shape-mismatched files.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    model, gqsa_config, expected = _skeleton(path)
    tied = gqsa_config.get("tied", {})
    state = read_weights(path, gqsa_config, expected=expected, verify_checksums=verify_checksums)
    state = {k: v.to(device) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if set(result.missing_keys) != set(tied) or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: state dict does not fit the model (missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys})"
        )
    for dropped, kept in tied.items():
        owner, _, attr = dropped.rpartition(".")
        kept_owner, _, kept_attr = kept.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(kept_owner), kept_attr))
    _materialize_non_persistent_buffers(model, torch.device(device))
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: tensors {still_meta[:3]} were not loaded")
    from gqsa.models.hf_integration import quantization_config_dict

    model.config.quantization_config = quantization_config_dict(gqsa_config["layers"])
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
