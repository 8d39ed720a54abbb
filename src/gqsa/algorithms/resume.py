"""Resume state of a long block-wise compression: finished blocks saved so that the same command continues.

After block b is finished, its compressed layers (``block_XXXX.safetensors``: the packed tensors of a
PackedLinear, or the weight of a layer pruned in float) and its entry (``block_XXXX.json``: the block's report, the
SHA-256 of the tensor file and of the report) are written atomically into the resume directory, the entry last.
``resume.json`` holds the fingerprint of what is being computed: the resolved config, the calibration tokens,
the model's config and weights, and the gqsa version. A run with another fingerprint never replays these
blocks: the state is discarded (the CLI holds a lock on the output, so no other run is using it).

Replaying trusts nothing on disk: an entry whose files are missing, truncated, altered (SHA-256) or not valid
packed weights is reported, and that block and every later one are computed again (each depends on the ones
before it), so a damaged resume state costs time, never a wrong checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from gqsa._version import __version__
from gqsa.format.checkpoint import tensor_sha256
from gqsa.format.packed import FORMAT_VERSION, PackedWeight
from gqsa.nn.packed_linear import PackedLinear
from gqsa.utils import jsonio
from gqsa.utils.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

STATE_NAME = "resume.json"
_STATE_FORMAT = 1


class ResumeEntryError(ValueError):
    """A finished block's entry cannot be trusted (the message names the file and why)."""


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the model's tensors (its identity as an input); for a
    lazily loaded model (gqsa.models.lazy), over those of its weight files."""
    from gqsa.models.lazy import lazy_weights

    weights = lazy_weights(model)
    if weights is not None:
        return weights.digest()
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{tensor_sha256(t)}".encode())
    return h.hexdigest()


def fingerprint(config: dict, calib_ids: torch.Tensor, model: nn.Module) -> str:
    """SHA-256 over the resolved config, the calibration tokens, the model's config and weights (as given, before
    compression), and the gqsa and format versions."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "gqsa": __version__, "format": FORMAT_VERSION}, sort_keys=True).encode())
    h.update(calib_ids.cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(model_digest(model).encode())
    return h.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(record: dict) -> bytes:
    return jsonio.dumps(record, sort_keys=True).encode()


class ResumeState:
    """Finished blocks of one compression in ``directory`` (created if needed).

    Args:
        directory: the resume directory (the CLI's: ``.<out>.gqsa-resume`` beside the output).
        fingerprint: ``fingerprint(...)`` of this run; state with another one is discarded.
        config: the resolved config, recorded in ``resume.json`` for people reading it.
    """

    def __init__(self, directory: str | Path, fingerprint: str, config: dict | None = None) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        marker = self.directory / STATE_NAME
        found = None
        if marker.exists():
            try:
                found = json.loads(marker.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                found = None
        if found != fingerprint:
            if self.directory.exists():
                logger.warning("%s holds the resume state of a compression with other settings, input model or "
                               "calibration text (or a damaged one); starting over", self.directory)
                shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True)
            atomic_write_text(marker, jsonio.dumps({"format": _STATE_FORMAT, "fingerprint": fingerprint,
                                                    "gqsa_version": __version__, "config": config}) + "\n")

    def _paths(self, block: int) -> tuple[Path, Path]:
        stem = self.directory / f"block_{block:04d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def done(self, block: int) -> bool:
        """Whether block ``block`` has an entry (its ``.json``, written last). ``load`` checks it."""
        return self._paths(block)[1].exists()

    def save(self, block: int, layers: dict[str, nn.Module], record: dict) -> None:
        """Store the finished block's compressed layers (by name within the block) and its report.

        Args:
            layers: PackedLinear or ``nn.Linear`` (pruned in float) modules.
            record: the block's report (JSON-serialisable).
        """
        from safetensors.torch import save

        tensors, meta = {}, {}
        for name, module in layers.items():
            if isinstance(module, PackedLinear):
                packed = module.packed_weight()
                parts = packed.tensors()
                meta[name] = json.dumps({"kind": "packed", **packed.metadata()})
            elif isinstance(module, nn.Linear):
                parts = {"weight": module.weight}
                meta[name] = json.dumps({"kind": "linear", "in_features": module.in_features,
                                         "out_features": module.out_features})
            else:
                raise TypeError(f"resume state: cannot store layer {name!r} of type {type(module).__name__}")
            if module.bias is not None:
                parts = {**parts, "bias": module.bias}
            for tname, t in parts.items():
                tensors[f"{name}.{tname}"] = t.detach().cpu().contiguous()
        data = save(tensors, metadata=meta)
        weights, entry = self._paths(block)
        atomic_write_bytes(weights, data)
        record = jsonio.finite_or_none(record)  # as it will read back (a NaN loss becomes null)
        atomic_write_text(entry, jsonio.dumps({"weights_sha256": _sha256(data), "record_sha256": _sha256(
            _canonical(record)), "record": record}, indent=1) + "\n")  # written last: marks the block done

    def load(self, block: int, device: torch.device | str = "cpu") -> tuple[dict[str, nn.Module], dict]:
        """The compressed layers and the report of a finished block, checked before anything is trusted.

        Raises:
            ResumeEntryError: a file missing or unreadable, a SHA-256 that does not match, a layer that is not a
                valid packed weight.
        """
        from safetensors.torch import load

        weights, entry = self._paths(block)
        try:
            info = json.loads(entry.read_text())
            record, record_sha, weights_sha = info["record"], info["record_sha256"], info["weights_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResumeEntryError(f"{entry}: unreadable ({exc})") from exc
        if _sha256(_canonical(record)) != record_sha:
            raise ResumeEntryError(f"{entry}: altered (SHA-256 of the report does not match)")
        try:
            data = weights.read_bytes()
        except OSError as exc:
            raise ResumeEntryError(f"{weights}: unreadable ({exc})") from exc
        if _sha256(data) != weights_sha:
            raise ResumeEntryError(f"{weights}: altered or truncated (SHA-256 does not match)")
        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error type
            raise ResumeEntryError(f"{weights}: unreadable ({exc})") from exc
        meta = _metadata(data)
        layers = {}
        for name, m in meta.items():
            try:
                layers[name] = _layer(name, m, tensors, device)
            except (KeyError, TypeError, ValueError) as exc:
                raise ResumeEntryError(f"{weights}: layer {name!r}: {exc}") from exc
        return layers, record

    def discard_from(self, block: int) -> None:
        """Remove the entries of ``block`` and every later block."""
        for entry in sorted(self.directory.glob("block_*.json")):
            b = int(entry.stem.removeprefix("block_"))
            if b >= block:
                for path in self._paths(b):
                    path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the whole resume directory (after the output is saved)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _metadata(data: bytes) -> dict[str, dict]:
    """Per layer, the metadata that ``save`` wrote into the safetensors header."""
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}


def _layer(name: str, meta: dict, tensors: dict[str, torch.Tensor], device) -> nn.Module:
    bias = tensors.get(f"{name}.bias")
    if meta["kind"] == "linear":
        weight = tensors[f"{name}.weight"]
        if tuple(weight.shape) != (meta["out_features"], meta["in_features"]) or not bool(torch.isfinite(weight).all()):
            raise ValueError("weight of the wrong shape or not finite")
        linear = nn.Linear(meta["in_features"], meta["out_features"], bias=bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight.to(device), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(device), requires_grad=False)
        return linear
    if meta["kind"] != "packed":
        raise ValueError(f"unknown kind {meta['kind']!r}")
    packed = PackedWeight(
        crow_indices=tensors[f"{name}.crow_indices"], col_indices=tensors[f"{name}.col_indices"],
        values=tensors[f"{name}.values"], scale=tensors[f"{name}.scale"],
        zero_point=tensors.get(f"{name}.zero_point"), out_features=meta["out_features"],
        in_features=meta["in_features"], group_size=meta["group_size"], bits=meta["bits"],
    )
    if packed.symmetric != meta["symmetric"] or packed.nnz != meta["nnz"]:
        raise ValueError("tensors disagree with the recorded metadata")
    packed.validate(name)
    return PackedLinear.from_packed(packed.to(device), None if bias is None else bias.to(device))
