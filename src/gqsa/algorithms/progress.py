"""Per-block progress of a long compression, saved so that the same command resumes where it stopped.

After block b is finished, its packed layers (``block_XXXX.safetensors``) and its report
(``block_XXXX.json``) are written atomically into the progress directory; ``progress.json`` holds a fingerprint
of what is being computed (config, calibration tokens, model config) so that progress made with other settings
is never mixed in. A resumed run replays the finished blocks (it loads their packed layers and recomputes the
activations, which is deterministic) and gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from gqsa.format.packed import PackedWeight
from gqsa.nn.packed_linear import GQSALinear
from gqsa.utils.io import atomic_write_bytes, atomic_write_text

PROGRESS_NAME = "progress.json"


def fingerprint(config: dict, calib_ids: torch.Tensor, model_config: dict) -> str:
    """SHA-256 over the resolved config, the calibration tokens and the model's config."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(calib_ids.cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(model_config, sort_keys=True, default=str).encode())
    return h.hexdigest()


class BlockProgress:
    """Finished blocks of one compression run in ``directory``.

    Raises:
        ValueError: ``directory`` holds progress of a run with another fingerprint.
    """

    def __init__(self, directory: str | Path, fingerprint: str, config: dict | None = None) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        marker = self.directory / PROGRESS_NAME
        if marker.exists():
            found = json.loads(marker.read_text()).get("fingerprint")
            if found != fingerprint:
                raise ValueError(
                    f"{self.directory} holds progress of a compression with other settings (config, calibration "
                    "text or model); delete that directory to start again"
                )
        else:
            atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "config": config}) + "\n")

    def _paths(self, block: int) -> tuple[Path, Path]:
        stem = self.directory / f"block_{block:04d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def done(self, block: int) -> bool:
        """Whether block ``block`` was finished (both of its files exist; each is written atomically)."""
        return all(p.exists() for p in self._paths(block))

    def save(self, block: int, layers: dict[str, GQSALinear], record: dict) -> None:
        """Store the finished block's packed layers (by name within the block) and its report."""
        tensors = {}
        for name, module in layers.items():
            for tname, t in module.packed_weight().tensors().items():
                tensors[f"{name}.{tname}"] = t.detach().cpu().contiguous()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
        meta = {name: json.dumps(m.metadata()) for name, m in layers.items()}
        weights, report = self._paths(block)
        atomic_write_bytes(weights, save(tensors, metadata=meta))
        atomic_write_text(report, json.dumps(record, indent=1) + "\n")  # written last: marks the block done

    def load(self, block: int, device: torch.device | str = "cpu") -> tuple[dict[str, GQSALinear], dict]:
        """The packed layers and the report of a finished block."""
        from safetensors import safe_open

        weights, report = self._paths(block)
        tensors = load_file(weights, device=str(device))
        with safe_open(weights, "pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        layers = {}
        for name, m in meta.items():
            packed = PackedWeight(
                crow_indices=tensors[f"{name}.crow_indices"], col_indices=tensors[f"{name}.col_indices"],
                values=tensors[f"{name}.values"], scale=tensors[f"{name}.scale"],
                zero_point=tensors.get(f"{name}.zero_point"), out_features=m["out_features"],
                in_features=m["in_features"], group_size=m["group_size"], bits=m["bits"],
            )
            packed.validate(name)
            layers[name] = GQSALinear.from_packed(packed, tensors.get(f"{name}.bias"))
        return layers, json.loads(report.read_text())
