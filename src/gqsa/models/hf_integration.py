"""Make ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` load gqsa checkpoints, checked as ``gqsa.load``.

A gqsa checkpoint's ``config.json`` carries ``"quantization_config": {"quant_method": "gqsa", ...}`` with the
metadata of every packed layer. ``register_with_transformers()`` (called by ``import gqsa``) registers the
config class and a quantizer that swaps those ``nn.Linear`` modules for empty ``PackedLinear`` shells before
transformers fills them from the safetensors file.

Checkpoints come from strangers, so this path checks what ``gqsa.load`` checks: before any weight is read, the
checkpoint's ``gqsa_config.json`` must be there and agree with ``config.json``, and the weights file's header
must match its record (no truncation, no missing, extra or reshaped tensor); after transformers has filled the
model, every tensor's SHA-256 is compared with the record, every float must be finite and every packed layer
must pass ``PackedWeight.validate`` (indices in range, so the kernels never read outside their buffers). Any
failure raises ``CheckpointError`` naming the file and the tensor. ``GQSA_VERIFY_CHECKSUMS=0`` in the
environment skips the hashing (one pass over the bytes); the structural checks always run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from gqsa.format.checkpoint import (
    GQSA_CONFIG_NAME,
    QUANT_METHOD,
    CheckpointError,
    check_weights_file,
    read_gqsa_config,
)

logger = logging.getLogger(__name__)

_registered = False


def _config_class():
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class GQSAQuantizationConfig(QuantizationConfigMixin):
        """transformers-side description of a gqsa checkpoint: format version and per-layer metadata."""

        def __init__(self, format_version: int = 1, layers: dict[str, dict] | None = None, **kwargs: Any):
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.layers = dict(layers or {})
            for key in kwargs:
                if key != "quant_method":
                    logger.debug("GQSAQuantizationConfig: ignoring unknown key %r", key)

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "layers": self.layers}

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    return GQSAQuantizationConfig


def _quantizer_class():
    from transformers.quantizers.base import HfQuantizer

    class GQSAHfQuantizer(HfQuantizer):
        """Loads pre-compressed gqsa checkpoints (compression itself is ``gqsa compress``)."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            from gqsa.format.packed import FORMAT_VERSION

            if self.quantization_config.format_version != FORMAT_VERSION:
                raise ValueError(
                    f"gqsa checkpoint format_version {self.quantization_config.format_version} is not supported "
                    f"by this gqsa (reads {FORMAT_VERSION})"
                )

        def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
            from gqsa.models.surgery import swap_in_packed_shells

            self._checkpoint = _checked_checkpoint(self.quantization_config.layers, checkpoint_files)
            swap_in_packed_shells(model, self.quantization_config.layers, dtype=dtype, device="meta")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from gqsa.models.checkpoints import verify_loaded_model

            weights, gqsa_config = self._checkpoint
            verify_loaded_model(model, weights, gqsa_config, verify_checksums=verify_checksums_enabled())
            return model

        def is_serializable(self, **kwargs) -> bool:
            # save_pretrained would not write gqsa_config.json and its checksums: use gqsa.save instead.
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return GQSAHfQuantizer


VERIFY_CHECKSUMS_ENV = "GQSA_VERIFY_CHECKSUMS"


def verify_checksums_enabled() -> bool:
    """False only when the environment sets ``GQSA_VERIFY_CHECKSUMS=0`` (the structural checks still run)."""
    return os.environ.get(VERIFY_CHECKSUMS_ENV, "1").strip() != "0"


def _checked_checkpoint(layers: dict, checkpoint_files: list[str] | None) -> tuple[Path, dict]:
    """The weights file and ``gqsa_config.json`` of the checkpoint transformers is about to load, checked from
    their headers (see the module docstring).

    Raises:
        CheckpointError: no checkpoint file, no or another ``gqsa_config.json``, a weights file that does not
            match its record, or a ``quantization_config`` that disagrees with it.
    """
    if not checkpoint_files or len(checkpoint_files) != 1:
        raise CheckpointError(
            f"a gqsa checkpoint is one safetensors file beside {GQSA_CONFIG_NAME}; transformers found "
            f"{len(checkpoint_files or [])} weight files, which gqsa cannot verify"
        )
    directory = Path(checkpoint_files[0]).parent
    gqsa_config = read_gqsa_config(directory)
    if gqsa_config["layers"] != layers:
        raise CheckpointError(f"{directory / 'config.json'}: quantization_config.layers disagrees with "
                              f"{GQSA_CONFIG_NAME}")
    weights = check_weights_file(directory, gqsa_config)
    if weights.resolve() != Path(checkpoint_files[0]).resolve():
        raise CheckpointError(f"{directory}: transformers loads {checkpoint_files[0]} but {GQSA_CONFIG_NAME} "
                              f"records {weights.name}")
    return weights, gqsa_config


def register_with_transformers() -> None:
    """Register the gqsa quantization config and quantizer with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(_config_class())
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(_quantizer_class())
    _registered = True
