"""gqsa: Group Quantization and Sparsity for Accelerating LLM inference.

``import gqsa`` registers the ``gqsa::linear`` op and, when transformers is installed, a quantizer so that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads gqsa checkpoints. It imports neither Triton
nor the native extension; those load lazily when a kernel is first used.
"""

from gqsa import ops as _ops  # noqa: F401  (registers torch.ops.gqsa.linear)
from gqsa._version import __version__
from gqsa.config import CalibSpec, CompressConfig, QuantSpec, SparsitySpec
from gqsa.format import FormatError, PackedWeight
from gqsa.format.checkpoint import CheckpointError
from gqsa.nn import GQSALinear, PackedLinear


def load(path, device="cpu", verify_checksums=True):
    """Load a gqsa checkpoint directory; returns (transformers model, tokenizer). See gqsa.models.checkpoints."""
    from gqsa.models.checkpoints import load_compressed

    return load_compressed(path, device=device, verify_checksums=verify_checksums)


def save(model, tokenizer, out_dir, compression=None, overwrite=False, extra_files=None):
    """Save a compressed model as a gqsa checkpoint directory (atomic). See gqsa.models.checkpoints."""
    from gqsa.models.checkpoints import save_compressed

    return save_compressed(model, tokenizer, out_dir, compression=compression, overwrite=overwrite,
                           extra_files=extra_files)


def _register_with_transformers() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from gqsa.models.hf_integration import register_with_transformers

        register_with_transformers()


_register_with_transformers()

__all__ = [
    "CalibSpec",
    "CheckpointError",
    "CompressConfig",
    "FormatError",
    "GQSALinear",
    "PackedLinear",
    "PackedWeight",
    "QuantSpec",
    "SparsitySpec",
    "__version__",
    "load",
    "save",
]
