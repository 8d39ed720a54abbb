"""gqsa checkpoints of transformers models: save atomically, load without dense weights, check what others load.

``save_compressed`` writes (atomically) ``model.safetensors``, ``gqsa_config.json``, the transformers config
(with a ``quantization_config`` naming gqsa) and the tokenizer. ``load_compressed`` builds the model skeleton on
the meta device, swaps in empty ``PackedLinear`` shells, checks the weights file against ``gqsa_config.json`` and
the skeleton, and loads it with ``assign=True``: no dense weight is ever materialised. ``check_checkpoint`` makes
the same checks without building the weights (``gqsa info``), and ``verify_loaded_model`` makes them on a model
that transformers' ``from_pretrained`` filled. Float baselines are saved as plain transformers checkpoints
(``save_pruned``). The file layout is docs/FORMAT.md, section 5.
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
    quantization_config_dict,
    read_weights,
    verify_tensors,
    write_weights,
)
from gqsa.format.packed import FORMAT_VERSION, summarize_layers
from gqsa.models.outputs import PRUNED_CONFIG_NAME, check_output_dir
from gqsa.models.surgery import layer_metadata, packed_layers, swap_in_packed_shells
from gqsa.utils import jsonio
from gqsa.utils.io import atomic_directory, atomic_write_text, unreadable

logger = logging.getLogger(__name__)


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
        model: a transformers model whose compressed linears are PackedLinear.
        tokenizer: saved beside it (may be None).
        out_dir: target directory; it appears complete or not at all.
        compression: the resolved compression config (``CompressConfig.to_dict()``), recorded in gqsa_config.json.
        overwrite: replace an existing gqsa checkpoint ``out_dir``; any other non-empty directory, or a checkpoint
            that also holds files gqsa does not write, is refused (``gqsa.models.outputs.check_output_dir``).
        extra_files: file name -> text written into the directory with the rest (a report, the resolved config).

    Returns:
        The directory.
    """
    out_dir = Path(out_dir)
    layers = layer_metadata(model)
    if not layers:
        raise ValueError("save_compressed: the model has no PackedLinear layer; compress it first")
    state = model.state_dict()
    tied = _tied_duplicates(state)
    for name in tied:
        del state[name]
    check_output_dir(out_dir, overwrite)  # --overwrite's rules: only a gqsa checkpoint, holding nothing else
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
    check_output_dir(out_dir, overwrite)  # --overwrite's rules: only a gqsa checkpoint, holding nothing else
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
    with unreadable(f"{config_path}: cannot be read", CheckpointError):  # a bad dtype name, ...: many types
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    hf_layers = (getattr(config, "quantization_config", None) or {}).get("layers")
    if hf_layers is not None and hf_layers != gqsa_config["layers"]:
        raise CheckpointError(f"{config_path}: quantization_config.layers disagrees with {GQSA_CONFIG_NAME}")
    config.quantization_config = None
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"{config_path}: 'dtype' {getattr(config, 'dtype', None)!r} is not a floating torch "
                              "dtype")
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
    model.config.quantization_config = quantization_config_dict(gqsa_config["layers"])
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        with unreadable(f"{path}: the tokenizer cannot be loaded from its files", CheckpointError):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
