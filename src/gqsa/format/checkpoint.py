"""Checkpoint files: safetensors weights + ``gqsa_config.json``, with integrity checks that name what is wrong.

This module knows tensors and files only; building a transformers model around them is ``gqsa.models``' job.
The directory layout is specified in docs/FORMAT.md ("Checkpoint directory").
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from gqsa.format.packed import FORMAT_VERSION, TENSOR_NAMES, FormatError, PackedWeight, summarize_layers
from gqsa.utils.finite import describe_nonfinite

GQSA_CONFIG_NAME = "gqsa_config.json"
WEIGHTS_NAME = "model.safetensors"
QUANT_METHOD = "gqsa"  # config.json's quantization_config.quant_method

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_DTYPE_NAMES = frozenset(str(d).removeprefix("torch.") for d in _SAFETENSORS_DTYPES.values())


class CheckpointError(ValueError):
    """A checkpoint cannot be read as written; the message names the file and, where known, the tensor."""


def quantization_config_dict(layers: dict[str, dict]) -> dict:
    """The ``quantization_config`` entry written into a checkpoint's config.json (docs/FORMAT.md, section 5)."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers}


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (contiguous, CPU)."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()  # hashes the buffer in place (tobytes() would copy the tensor)


def write_weights(directory: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write ``tensors`` to ``directory/model.safetensors`` and describe them for ``gqsa_config.json``.

    Returns:
        {"file": name, "bytes": file size, "tensors": {name: {"sha256", "shape", "dtype"}}}.
    """
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    path = Path(directory) / WEIGHTS_NAME
    save_file(contiguous, str(path), metadata={"format": "pt", "producer": "gqsa"})
    return {
        "file": WEIGHTS_NAME,
        "bytes": path.stat().st_size,
        "tensors": {
            name: {"sha256": tensor_sha256(t), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in contiguous.items()
        },
    }


def read_gqsa_config(directory: Path) -> dict:
    """Read and check ``gqsa_config.json``.

    Raises:
        CheckpointError: missing file, invalid JSON, another format version, or missing keys.
    """
    path = Path(directory) / GQSA_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {directory} is not a gqsa checkpoint")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != "gqsa":
        raise CheckpointError(f"{path}: not a gqsa config (missing \"format\": \"gqsa\")")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported; this gqsa reads version {FORMAT_VERSION}"
        )
    for key in ("layers", "weights"):
        if not isinstance(cfg.get(key), dict):
            raise CheckpointError(f"{path}: missing or invalid {key!r} section")
    for name, meta in cfg["layers"].items():
        try:
            check_layer_metadata(meta)
        except ValueError as exc:
            raise CheckpointError(f"{path}: layer {name!r}: {exc}") from exc
    if not isinstance(cfg["weights"].get("tensors"), dict):
        raise CheckpointError(f"{path}: 'weights' has no 'tensors' record")
    file = cfg["weights"].get("file", WEIGHTS_NAME)
    if not (isinstance(file, str) and file and Path(file).name == file and file not in (".", "..")):
        # the weights are read from the checkpoint itself, never from a path it points elsewhere
        raise CheckpointError(f"{path}: 'weights.file' must be a file name inside the checkpoint, got {file!r}")
    for name, rec in cfg["weights"]["tensors"].items():
        if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and isinstance(rec.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in rec["shape"]) and rec.get("dtype") in _DTYPE_NAMES):
            raise CheckpointError(f"{path}: the record of tensor {name!r} needs 'sha256', a 'shape' of "
                                  f"non-negative integers and a 'dtype' among {sorted(_DTYPE_NAMES)}")
    return cfg


LAYER_KINDS = ("linear", "embedding")


def check_layer_metadata(meta: dict) -> None:
    """Check one entry of a checkpoint's ``layers`` map (``PackedLinear.metadata()`` / ``PackedEmbedding``'s).

    Raises:
        ValueError: naming the key that is missing or has an impossible value.
    """
    from gqsa.config import QuantSpec

    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(meta).__name__}")
    for key in ("out_features", "in_features", "group_size", "bits", "nnz"):
        value = meta.get(key)
        if type(value) is not int or value < (0 if key == "nnz" else 1):
            raise ValueError(f"{key!r} must be a {'non-negative' if key == 'nnz' else 'positive'} integer, "
                             f"got {value!r}")
    for key in ("symmetric", "bias"):
        if type(meta.get(key)) is not bool:
            raise ValueError(f"{key!r} must be true or false, got {meta.get(key)!r}")
    if meta.get("kind", "linear") not in LAYER_KINDS:
        raise ValueError(f"unknown kind {meta['kind']!r} (this gqsa reads {', '.join(map(repr, LAYER_KINDS))})")
    QuantSpec(bits=meta["bits"], group_size=meta["group_size"])
    if meta["in_features"] % meta["group_size"]:
        raise ValueError(f"group_size {meta['group_size']} does not divide in_features {meta['in_features']}")
    groups = meta["out_features"] * (meta["in_features"] // meta["group_size"])
    if meta["nnz"] > groups:
        raise ValueError(f"'nnz' {meta['nnz']} exceeds the {groups} groups of the matrix")


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the offset where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (only {size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupted (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupted safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def check_weights_file(
    directory: Path,
    gqsa_config: dict,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
) -> Path:
    """Check a checkpoint's weights file against ``gqsa_config.json`` from its header alone (no tensor is read).

    Checks, in order: the file exists and is as long as its header says (truncation), every tensor recorded in
    ``gqsa_config.json`` is present and no other, shapes and dtypes match the record and ``expected`` (the
    model skeleton's).

    Args:
        directory: checkpoint directory.
        gqsa_config: from ``read_gqsa_config`` (which has checked its form).
        expected: name -> (shape, dtype) that the model to be filled needs, or None to skip that check.

    Returns:
        The weights file's path.

    Raises:
        CheckpointError: naming the file and the tensor.
    """
    record = gqsa_config["weights"]
    path = Path(directory) / record.get("file", WEIGHTS_NAME)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    header, data_start = _read_header(path)
    size = path.stat().st_size
    recorded = record["tensors"]  # its records' form was checked by read_gqsa_config
    for name, info in header.items():
        try:
            begin, end = (data_start + int(o) for o in info["data_offsets"])
            shape, dtype_name = [int(d) for d in info["shape"]], info["dtype"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupted safetensors header entry for tensor {name!r}") from exc
        if end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has {size} bytes"
            )
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None or begin < data_start or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: corrupted safetensors header entry for tensor {name!r}")
    missing = sorted(set(recorded) - set(header))
    unexpected = sorted(set(header) - set(recorded))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{path}: tensor {unexpected[0]!r} is not in {GQSA_CONFIG_NAME}")
    if expected is not None:
        absent = sorted(set(expected) - set(header))
        if absent:
            raise CheckpointError(f"{path}: tensor {absent[0]!r} needed by the model is missing")
        extra = sorted(set(header) - set(expected))
        if extra:
            raise CheckpointError(f"{path}: tensor {extra[0]!r} does not belong to the model")
    for name, info in header.items():
        shape, dtype = tuple(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]]
        rec = recorded[name]
        if list(shape) != rec["shape"] or str(dtype).removeprefix("torch.") != rec["dtype"]:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(shape)} {info['dtype']} but {GQSA_CONFIG_NAME} "
                f"records {rec['shape']} {rec['dtype']}"
            )
        if expected is not None:
            want_shape, want_dtype = expected[name]
            if shape != tuple(want_shape) or dtype != want_dtype:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(shape)} {dtype} but the model expects "
                    f"{list(want_shape)} {want_dtype}"
                )
    for layer, meta in gqsa_config["layers"].items():
        for tname, (want_shape, want_dtype) in PackedWeight.expected_shapes(meta).items():
            info = header.get(f"{layer}.{tname}")
            if info is None:
                raise CheckpointError(f"{path}: tensor {layer}.{tname} of packed layer {layer!r} is missing")
            if tuple(info["shape"]) != want_shape or _SAFETENSORS_DTYPES[info["dtype"]] != want_dtype:
                raise CheckpointError(
                    f"{path}: tensor {layer}.{tname} has shape {info['shape']} {info['dtype']} but the layer's "
                    f"metadata in {GQSA_CONFIG_NAME} (nnz={meta['nnz']}) needs {list(want_shape)} {want_dtype}"
                )
    return path


def read_weights(
    directory: Path,
    gqsa_config: dict,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    verify_checksums: bool = True,
) -> dict[str, torch.Tensor]:
    """Load and check the weights of a checkpoint.

    Checks, in order: ``check_weights_file`` (truncation, names, shapes and dtypes), then ``verify_tensors``
    (every tensor's SHA-256, every float finite, every packed layer valid under ``PackedWeight.validate``).

    Args:
        directory: checkpoint directory.
        gqsa_config: from ``read_gqsa_config``.
        expected: name -> (shape, dtype) that the model to be filled needs, or None to skip that check.
        verify_checksums: compare SHA-256 digests (costs one pass over the bytes).

    Returns:
        name -> tensor.

    Raises:
        CheckpointError: naming the file and the tensor.
    """
    from safetensors.torch import load_file

    path = check_weights_file(directory, gqsa_config, expected)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type; name the file
        raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
    verify_tensors(path, gqsa_config, tensors, verify_checksums)
    return tensors


def verify_tensors(path: Path, gqsa_config: dict, tensors: dict[str, torch.Tensor],
                   verify_checksums: bool = True) -> None:
    """Check tensors read from a checkpoint (by any loader) against its ``gqsa_config.json``.

    Every recorded tensor must be present. Checksums: a tensor with its recorded dtype is hashed as it is; one
    that the loader cast (transformers' ``from_pretrained(dtype=...)`` casts the dense float tensors) is read
    again from ``path``, hashed, and must equal the loaded tensor after the same cast. Then every float tensor
    must be finite and every packed layer must pass ``PackedWeight.validate`` (its indices keep the kernels
    inside their buffers).

    Args:
        path: the weights file the tensors were read from.
        gqsa_config: from ``read_gqsa_config``.
        tensors: name -> tensor as loaded (on any device); names not recorded are ignored (tied duplicates).
        verify_checksums: compare SHA-256 digests.

    Raises:
        CheckpointError: naming the file and the tensor (or layer) and what is wrong with it.
    """
    recorded = gqsa_config["weights"]["tensors"]
    missing = sorted(set(recorded) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} was not loaded ({len(missing)} missing in all)")
    if verify_checksums:
        for name, rec in recorded.items():
            t = tensors[name]
            if str(t.dtype).removeprefix("torch.") == rec["dtype"]:
                good = tensor_sha256(t) == rec["sha256"]
            else:
                stored = _read_tensor(path, name)
                good = tensor_sha256(stored) == rec["sha256"] and torch.equal(stored.to(t.device, t.dtype), t)
            if not good:
                raise CheckpointError(f"{path}: tensor {name!r} is corrupted (SHA-256 does not match)")
    for name in recorded:
        problem = describe_nonfinite(tensors[name])
        if problem is not None:
            raise CheckpointError(f"{path}: tensor {name!r} holds {problem}")
    for layer, meta in gqsa_config["layers"].items():
        packed = packed_from_state(tensors, layer, meta)
        try:
            packed.validate(layer)
        except FormatError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error type; name the file
        raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({exc})") from exc


def packed_from_state(tensors: dict[str, torch.Tensor], layer: str, meta: dict) -> PackedWeight:
    """The PackedWeight of ``layer`` from a flat state dict and the layer's metadata."""
    parts = {name: tensors.get(f"{layer}.{name}") for name in TENSOR_NAMES}
    missing = [n for n, t in parts.items() if t is None and not (n == "zero_point" and meta["symmetric"])]
    if missing:
        raise CheckpointError(f"layer {layer!r}: tensor {layer}.{missing[0]} is missing")
    return PackedWeight(
        **parts,
        out_features=meta["out_features"],
        in_features=meta["in_features"],
        group_size=meta["group_size"],
        bits=meta["bits"],
    )


def checkpoint_info(directory: Path) -> dict:
    """Describe a checkpoint from its files alone (no model is built, no weight is read).

    Returns:
        {"path", "format_version", "gqsa_version", "num_layers", "bits_per_weight" (packed layers, all
        metadata counted), "sparsity" (fraction of groups pruned), "weights_in_packed_layers", "packed_bytes",
        "bytes" (all files of the directory), "layers": {name: {...metadata, "bits_per_weight", "sparsity"}},
        "compression"}.
    """
    directory = Path(directory)
    cfg = read_gqsa_config(directory)
    recorded = cfg["weights"]["tensors"]
    layers, sizes = {}, []
    for name, meta in cfg["layers"].items():
        nbytes = 0
        for tname in TENSOR_NAMES:
            rec = recorded.get(f"{name}.{tname}")
            if rec is not None:
                nbytes += math.prod(rec["shape"]) * getattr(torch, rec["dtype"]).itemsize
        one = summarize_layers([(meta, nbytes)])
        layers[name] = {**meta, "bits_per_weight": one["bits_per_weight"], "sparsity": one["sparsity"]}
        sizes.append((meta, nbytes))
    on_disk = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return {
        "path": str(directory),
        "format_version": cfg["format_version"],
        "gqsa_version": cfg.get("gqsa_version"),
        **summarize_layers(sizes),
        "bytes": on_disk,
        "compression": cfg.get("compression"),
        "layers": layers,
    }
