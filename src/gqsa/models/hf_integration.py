"""Make ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` load gqsa checkpoints.

A gqsa checkpoint's ``config.json`` carries ``"quantization_config": {"quant_method": "gqsa", ...}`` with the
metadata of every packed layer. ``register_with_transformers()`` (called by ``import gqsa``) registers the
config class and a quantizer that swaps those ``nn.Linear`` modules for empty ``GQSALinear`` shells before
transformers fills them from the safetensors file.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

QUANT_METHOD = "gqsa"
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

        def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
            from gqsa.models.compressed import swap_in_packed_shells

            swap_in_packed_shells(model, self.quantization_config.layers, dtype=dtype, device="meta")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def is_serializable(self, **kwargs) -> bool:
            # save_pretrained would not write gqsa_config.json and its checksums: use gqsa.save instead.
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return GQSAHfQuantizer


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


def quantization_config_dict(layers: dict[str, dict]) -> dict[str, Any]:
    """The ``quantization_config`` entry written into a checkpoint's config.json."""
    from gqsa.format.packed import FORMAT_VERSION

    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers}
