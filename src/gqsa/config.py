"""Frozen, validated, versioned configuration dataclasses.

Every stage of gqsa takes one of these. Invalid values raise ``ValueError`` naming the rule that was broken,
and every config round-trips through JSON (``to_dict`` / ``from_dict``), so the resolved config can be written
next to every output and read back exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

CONFIG_VERSION = 1

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_GROUP_SIZE = 8
MAX_GROUP_SIZE = 256
QPARAM_METHODS = ("minmax", "mse")
ALLOCATIONS = ("row", "matrix", "model")
COMPRESS_METHODS = ("magnitude", "gqsa")
SALIENCIES = ("obs", "obs_diag", "wanda", "magnitude")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class _Config:
    """JSON round trip shared by the config dataclasses (nested configs are rebuilt by field type)."""

    _nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Config) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}")
        kwargs = dict(data)
        for name, sub in cls._nested.items():
            if name in kwargs and isinstance(kwargs[name], dict):
                kwargs[name] = sub.from_dict(kwargs[name])
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cls.__name__}: invalid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class QuantSpec(_Config):
    """How each kept group is quantized.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: consecutive input columns sharing one scale/zero point (power of two, 8..256); the same
            groups are the unit of pruning.
        symmetric: if True the zero point is fixed at 2**(bits-1) and not stored; else a per-group integer
            zero point in [0, 2**bits - 1] is stored.
        qparam_method: "minmax" (range of the group, including zero) or "mse" (search of a clipped range that
            minimises the group's squared quantization error).
    """

    bits: int = 4
    group_size: int = 16
    symmetric: bool = False
    qparam_method: str = "minmax"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if (
            not isinstance(self.group_size, int)
            or not _is_power_of_two(self.group_size)
            or not MIN_GROUP_SIZE <= self.group_size <= MAX_GROUP_SIZE
        ):
            raise ValueError(
                f"QuantSpec.group_size must be a power of two from {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE}, "
                f"got {self.group_size!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if self.qparam_method not in QPARAM_METHODS:
            raise ValueError(f"QuantSpec.qparam_method must be one of {QPARAM_METHODS}, got {self.qparam_method!r}")

    @property
    def qmax(self) -> int:
        """Largest code value, 2**bits - 1."""
        return (1 << self.bits) - 1

    def check_in_features(self, in_features: int, layer: str = "layer") -> None:
        """Raise ValueError if ``group_size`` does not divide ``in_features``."""
        if in_features % self.group_size != 0:
            raise ValueError(
                f"{layer}: group_size {self.group_size} does not divide in_features {in_features}; "
                f"choose a power of two that divides {in_features}"
            )


@dataclass(frozen=True)
class SparsitySpec(_Config):
    """How many groups are pruned and how the budget is allocated.

    Attributes:
        ratio: fraction of groups pruned, in [0, 1).
        allocation: "row" (every row keeps the same number of groups), "matrix" (the ratio holds per matrix,
            rows may differ), or "model" (the ratio holds over all compressed layers together).
    """

    ratio: float = 0.5
    allocation: str = "row"

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ValueError(f"SparsitySpec.ratio must be a number, got {self.ratio!r}")
        if not (0.0 <= float(self.ratio) < 1.0) or math.isnan(float(self.ratio)):
            raise ValueError(f"SparsitySpec.ratio must be in [0, 1), got {self.ratio!r}")
        object.__setattr__(self, "ratio", float(self.ratio))
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"SparsitySpec.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")


@dataclass(frozen=True)
class CalibSpec(_Config):
    """Calibration text and windows.

    Attributes:
        dataset: packaged corpus name ("wiki", "c4", ...) or a path to a .txt/.jsonl file.
        samples: number of calibration windows.
        seq_len: tokens per window.
        seed: seed of the window sampler.
    """

    dataset: str = "wiki"
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"CalibSpec.dataset must be a non-empty string, got {self.dataset!r}")
        for name in ("samples", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibSpec.{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"CalibSpec.seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class OneShotSpec(_Config):
    """Settings of the calibrated one-shot step (method "gqsa").

    Attributes:
        saliency: group importance: "obs" (exact OBS output error of removing the group), "obs_diag" (its
            diagonal approximation), "wanda" (activation-weighted magnitude) or "magnitude".
        damp: dampening of the Hessian, relative to its mean diagonal.
        block_size: columns per lazy error-compensation update (raised to the group size if smaller).
    """

    saliency: str = "obs"
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.saliency not in SALIENCIES:
            raise ValueError(f"OneShotSpec.saliency must be one of {SALIENCIES}, got {self.saliency!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ValueError(f"OneShotSpec.damp must be in (0, 1), got {self.damp!r}")
        object.__setattr__(self, "damp", float(self.damp))
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or not _is_power_of_two(self.block_size)
            or self.block_size < MIN_GROUP_SIZE
        ):
            raise ValueError(f"OneShotSpec.block_size must be a power of two >= 8, got {self.block_size!r}")


@dataclass(frozen=True)
class CompressConfig(_Config):
    """The whole compression: which method, its quantization and sparsity, its calibration data.

    Attributes:
        method: compression algorithm: "gqsa" (calibrated: Hessian-aware group saliency, then pruning and
            quantization with error compensation, block by block) or "magnitude" (data-free: prune the groups
            with the smallest L2 norm, round the rest to nearest).
        quant: the QuantSpec of every compressed layer.
        sparsity: the SparsitySpec.
        calib: the CalibSpec (unused by data-free methods, recorded anyway).
        oneshot: the OneShotSpec of method "gqsa".
        version: config schema version; files written by another version are rejected with a clear error.
    """

    _nested: ClassVar[dict[str, type]] = {
        "quant": QuantSpec,
        "sparsity": SparsitySpec,
        "calib": CalibSpec,
        "oneshot": OneShotSpec,
    }

    method: str = "gqsa"
    quant: QuantSpec = field(default_factory=QuantSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    oneshot: OneShotSpec = field(default_factory=OneShotSpec)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method not in COMPRESS_METHODS:
            raise ValueError(f"CompressConfig.method must be one of {COMPRESS_METHODS}, got {self.method!r}")
        for name, cls in self._nested.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"CompressConfig.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        if self.method == "gqsa":
            if self.sparsity.allocation == "model":
                raise ValueError(
                    "CompressConfig: sparsity allocation 'model' is not supported by method 'gqsa' yet (blocks are "
                    "compressed one at a time); use 'row' or 'matrix'"
                )
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"CompressConfig.version {self.version!r} is not supported by this gqsa (expects {CONFIG_VERSION})"
            )

    def save(self, path: str | Path) -> None:
        """Write the config as JSON atomically (temporary file, then rename)."""
        from gqsa.utils.io import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CompressConfig:
        """Read a config written by ``save``; errors name the file."""
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _preset(method: str, bits: int, group_size: int, ratio: float) -> CompressConfig:
    return CompressConfig(
        method=method, quant=QuantSpec(bits=bits, group_size=group_size), sparsity=SparsitySpec(ratio=ratio)
    )


# Named settings: the paper's GQSA points (W4, group 16, S20..S60, calibrated), dense GPTQ-style baselines
# (method "gqsa" at sparsity 0 is GPTQ with groups) and data-free round-to-nearest ("rtn-") and magnitude ones.
PRESETS: dict[str, CompressConfig] = {
    **{f"w4s{r}": _preset("gqsa", 4, 16, r / 100) for r in (20, 30, 40, 50, 60)},
    **{f"magnitude-w4s{r}": _preset("magnitude", 4, 16, r / 100) for r in (20, 30, 40, 50, 60)},
    "w2g64": _preset("gqsa", 2, 64, 0.0),
    "w2g128": _preset("gqsa", 2, 128, 0.0),
    "w3g128": _preset("gqsa", 3, 128, 0.0),
    "w4g128": _preset("gqsa", 4, 128, 0.0),
    **{f"rtn-w{b}g{g}": _preset("magnitude", b, g, 0.0) for b, g in ((2, 64), (2, 128), (3, 128), (4, 128))},
}
DEFAULT_PRESET = "w4s50"


def preset(name: str) -> CompressConfig:
    """The CompressConfig of a named preset.

    Raises:
        ValueError: unknown name (the message lists the presets).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None
