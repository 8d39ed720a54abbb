"""Models read block by block from their safetensors shards: compress a model larger than host memory.

``load_model_lazily(dir)`` builds the model with everything outside the decoder blocks loaded (embeddings, final
norm, LM head, rotary tables) and every decoder block on the meta device: no dense block in memory. The
block-wise driver (``gqsa.algorithms.driver``) calls ``materialize_block`` at a block's turn, which reads that
block's tensors from the shards (one tensor at a time, straight onto the compute device) and checks them finite;
once the block is compressed, its dense layers are gone and only the packed ones stay. Host memory then holds one
dense block, the calibration activations up to their budget, and the packed output.

The model's weights are identified for the resume state by ``LazyWeights.digest`` (every tensor's name, dtype,
shape and bytes, read from the files), as ``gqsa.algorithms.resume.model_digest`` identifies a loaded model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from gqsa.models.adapter import block_prefix, check_supported, decoder_layers
from gqsa.utils.finite import describe_nonfinite

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class LazyWeights:
    """The tensors of a Hugging Face directory's safetensors files, read one at a time by name.

    Raises:
        FileNotFoundError: the directory has neither ``model.safetensors.index.json`` nor ``model.safetensors``.
        ValueError: an index that does not parse or names a missing shard.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a safetensors index ({exc})") from exc
            self.files = {name: self.path / shard for name, shard in weight_map.items()}
        elif (self.path / SINGLE_NAME).is_file():
            from safetensors import safe_open

            with safe_open(self.path / SINGLE_NAME, framework="pt") as f:
                self.files = {name: self.path / SINGLE_NAME for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}; lazy loading reads safetensors")
        missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
        if missing:
            raise ValueError(f"{index}: names shard(s) that do not exist: {missing}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (on the CPU), copied out of its file: the file is mapped only while it is
        read, so the pages read do not stay in the process's memory."""
        from safetensors import safe_open

        try:
            with safe_open(self.files[name], framework="pt") as f:
                return f.get_tensor(name).clone()
        except KeyError:
            raise ValueError(f"{self.path}: the weights have no tensor {name!r}") from None
        except Exception as exc:  # safetensors raises its own error for truncated or corrupted files
            raise ValueError(f"{self.files[name]}: tensor {name} cannot be read (truncated or corrupted file?): "
                             f"{exc}") from exc

    def digest(self) -> str:
        """SHA-256 over every tensor's name, dtype, shape and bytes (streamed one tensor at a time)."""
        from gqsa.format.checkpoint import tensor_sha256

        h = hashlib.sha256()
        for name in sorted(self.files):
            t = self.read(name)
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{tensor_sha256(t)}".encode())
        return h.hexdigest()


def lazy_weights(model: nn.Module) -> LazyWeights | None:
    """The source of a lazily loaded model's blocks, None for a model loaded whole."""
    return getattr(model, "_gqsa_lazy_weights", None)


def load_model_lazily(path: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a Hugging Face directory with its decoder blocks left on the meta device.

    Raises:
        FileNotFoundError: no tokenizer files, or no safetensors weights.
        ValueError: a weight outside the blocks that is missing, unreadable or not finite.
        UnsupportedArchitectureError: the model's architecture is not supported by gqsa.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gqsa.models.loading import _check_hf_config, check_tokenizer_files
    from gqsa.utils.io import unreadable

    path = Path(path)
    check_tokenizer_files(path)
    _check_hf_config(path)
    weights = LazyWeights(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    # everything but the blocks, for real (rotary tables computed as the model computes them) ...
    outer = copy.deepcopy(config)
    outer.num_hidden_layers = 0
    if getattr(outer, "layer_types", None) is not None:
        outer.layer_types = []
    model = AutoModelForCausalLM.from_config(outer, dtype=dtype)
    # ... and the blocks on the meta device: shapes without memory
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.model.layers = shell.model.layers
    for module in model.modules():
        if getattr(module, "config", None) is outer:
            module.config = config
    layers = f"{block_prefix(model, 0).rsplit('.', 1)[0]}."
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        if name.startswith(layers) or tensor.device.type == "meta":
            continue
        if name not in weights:
            continue  # a buffer the model computes (rotary tables) or a tied weight, set below
        _load_into(tensor, weights.read(name), name, path)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model._gqsa_lazy_weights = weights
    with unreadable(f"{path}: the tokenizer cannot be loaded from its files"):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    check_supported(model)
    return model.eval(), tokenizer


def _load_into(target: torch.Tensor, value: torch.Tensor, name: str, source) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(target.shape)}")
    problem = describe_nonfinite(value) if value.is_floating_point() else None
    if problem is not None:
        raise ValueError(f"{source}: tensor {name} holds {problem}; the weights are corrupted (gqsa needs finite "
                         "weights)")
    with torch.no_grad():
        target.data.copy_(value)  # casts as it copies: no second copy of the tensor in the model's dtype


def materialize_block(model: nn.Module, index: int, device: torch.device | str) -> None:
    """Read decoder block ``index``'s tensors onto ``device`` if it is still on the meta device (a lazily
    loaded model); nothing for a block in memory.

    Raises:
        ValueError: a tensor missing, unreadable, of another shape, or not finite (named).
    """
    weights = lazy_weights(model)
    block = decoder_layers(model)[index]
    if weights is None or not any(t.device.type == "meta" for t in (*block.parameters(), *block.buffers())):
        return
    prefix = block_prefix(model, index)
    block.to_empty(device=device)
    state = block.state_dict(keep_vars=True)
    computed = [n for n, b in block.named_buffers() if not any(b is t for t in state.values())]
    if computed:  # a non-persistent buffer is computed at construction: to_empty left it undefined
        raise ValueError(f"lazy loading cannot rebuild the computed buffers {computed} of block {index}; load the "
                         "model whole (without --lazy-load)")
    for name, tensor in state.items():
        full = f"{prefix}.{name}"
        if full not in weights:
            raise ValueError(f"{weights.path}: the weights have no tensor {full!r}")
        _load_into(tensor, weights.read(full), full, weights.path)
    logger.info("block %d read from %s", index, weights.path)
