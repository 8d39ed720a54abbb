"""Frozen, validated, versioned configuration dataclasses.

Every stage of gqsa takes one of these. Invalid values raise ``ValueError`` naming the rule that was broken,
and every config round-trips through JSON (``to_dict`` / ``from_dict``), so the resolved config can be written
next to every output and read back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from gqsa.config_training import BQPOSpec, E2ESpec
from gqsa.quant.saliency import GROUP_SALIENCIES
from gqsa.utils.validated import FLAG, TEXT, FrozenMap, Rule, ValidatedConfig, integer, number, one_of, power_of_two

CONFIG_VERSION = 1

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_GROUP_SIZE = 8
MAX_GROUP_SIZE = 256
QPARAM_METHODS = ("minmax", "mse")
ALLOCATIONS = ("row", "matrix", "model")
COMPRESS_METHODS = ("gqsa", "magnitude", "sparsegpt", "wanda")
# Methods that only prune (unstructured or N:M) and leave the kept weights in float.
FLOAT_SPARSE_METHODS = ("sparsegpt", "wanda")
# the group scores of gqsa.quant.saliency, and "obs_adaptive" (OBS scores recomputed as the sweep goes:
# gqsa.algorithms.oneshot)
SALIENCIES = (*GROUP_SALIENCIES, "obs_adaptive")


def parse_nm(pattern) -> tuple[int, int] | None:
    """(N, M) of a sparsity pattern "N:M" with 0 < N < M, else None."""
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    n, m = int(parts[0]), int(parts[1])
    return (n, m) if 0 < n < m else None


@dataclass(frozen=True)
class QuantSpec(ValidatedConfig):
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

    _rules: ClassVar[dict[str, Rule]] = {
        "bits": one_of(SUPPORTED_BITS, integer=True),
        "group_size": power_of_two(MIN_GROUP_SIZE, MAX_GROUP_SIZE),
        "symmetric": FLAG,
        "qparam_method": one_of(QPARAM_METHODS),
    }

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
class SparsitySpec(ValidatedConfig):
    """How many groups are pruned and how the budget is allocated.

    Attributes:
        ratio: fraction pruned, in [0, 1): of groups (pattern "group") or of single weights.
        allocation: "row" (every row keeps the same number), "matrix" (the ratio holds per matrix, rows may
            differ), or "model" (the ratio holds over all compressed layers together, each layer's share set by
            its measured sensitivity).
        pattern: "group" (whole groups of ``group_size`` columns, the GQSA format), "unstructured" (single
            weights, left in float) or "N:M" such as "2:4" (at most N non-zeros in every M consecutive input
            columns, left in float; ``ratio`` must be 1 - N/M).
        model_spread: with allocation "model", how far a layer's ratio may move from ``ratio`` (both ways).
    """

    ratio: float = 0.5
    allocation: str = "row"
    pattern: str = "group"
    model_spread: float = 0.1

    _rules: ClassVar[dict[str, Rule]] = {
        "ratio": number(0, 1, hi_open=True),
        "allocation": one_of(ALLOCATIONS),
        "pattern": Rule("'group', 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4')",
                         lambda v: v in ("group", "unstructured") or parse_nm(v) is not None),
        "model_spread": number(0, 1),
    }

    def _check(self) -> None:
        if self.nm:
            n, m = self.nm
            if abs(self.ratio - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"SparsitySpec: pattern {self.pattern!r} keeps {n} of every {m} weights, so ratio must be "
                    f"{1 - n / m:g}, got {self.ratio:g}"
                )
            if self.allocation == "model":
                raise ValueError(f"SparsitySpec: pattern {self.pattern!r} fixes every layer's ratio; "
                                 "allocation 'model' does not apply")

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an "N:M" pattern, else None."""
        return parse_nm(self.pattern)


@dataclass(frozen=True)
class CalibSpec(ValidatedConfig):
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

    _rules: ClassVar[dict[str, Rule]] = {
        "dataset": TEXT, "samples": integer(1), "seq_len": integer(1), "seed": integer(),
    }


@dataclass(frozen=True)
class OneShotSpec(ValidatedConfig):
    """Settings of the calibrated one-shot step (method "gqsa").

    Attributes:
        saliency: group importance: "obs" (exact OBS output error of removing the group), "obs_diag" (its
            diagonal approximation), "wanda" (activation-weighted magnitude), "magnitude", or "obs_adaptive"
            (exact OBS, but the groups of each block of columns are chosen when the sweep reaches it, on the
            weights as updated so far, as SparseGPT chooses its masks; the ratio then holds per block).
        damp: dampening of the Hessian, relative to its mean diagonal.
        block_size: columns per lazy error-compensation update (raised to the group size if smaller).
        static_qparams: take every group's scale and zero point from the original weights before the sweep
            (GPTQ's "static groups", llm-compressor's behaviour) instead of re-fitting them on the updated
            weights when the sweep reaches the group.
    """

    saliency: str = "obs"
    damp: float = 0.01
    block_size: int = 128
    static_qparams: bool = False

    _rules: ClassVar[dict[str, Rule]] = {
        "saliency": one_of(SALIENCIES),
        "damp": number(0, 1, lo_open=True, hi_open=True),
        "block_size": power_of_two(MIN_GROUP_SIZE),
        "static_qparams": FLAG,
    }


@dataclass(frozen=True)
class LayerFormat(ValidatedConfig):
    """One layer's own packed format, in place of the config's ``quant.bits``, ``quant.group_size`` and
    ``sparsity.ratio`` for that layer (``CompressConfig.layer_formats``; written by ``--target-bpw``'s search).

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: columns per group (power of two, 8..256); must divide the layer's in_features.
        ratio: fraction of the layer's groups pruned, in [0, 1), under the config's allocation ("row" or
            "matrix").
    """

    bits: int = 4
    group_size: int = 16
    ratio: float = 0.0

    _rules: ClassVar[dict[str, Rule]] = {
        "bits": one_of(SUPPORTED_BITS, integer=True),
        "group_size": power_of_two(MIN_GROUP_SIZE, MAX_GROUP_SIZE),
        "ratio": number(0, 1, hi_open=True),
    }

    @property
    def label(self) -> str:
        """Short name, e.g. "w3g64" or "w4g16s50"."""
        sparse = f"s{self.ratio * 100:g}" if self.ratio else ""
        return f"w{self.bits}g{self.group_size}{sparse}"


def _tuple_of(test, expected: str) -> Rule:
    return Rule(f"a non-empty list of {expected}",
                lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(test(x) for x in v), tuple)


@dataclass(frozen=True)
class FormatSearchSpec(ValidatedConfig):
    """``--target-bpw``: choose each layer's bits, group size and sparsity for a storage budget
    (``gqsa.algorithms.format_search``).

    Each layer's candidates are every (bits, group size, ratio) of the lists that fits the layer. The expected
    rise of the KL divergence from the dense model when a layer takes a candidate is estimated from the Fisher
    information of the dense model on ``windows`` calibration windows (one backward pass each); the per-layer
    choice minimising the summed estimate within the budget is solved exactly by a Lagrangian sweep. The
    ``verify`` best uniform candidates and the per-layer choice are then measured (held-out next-token loss of the
    calibration split, every layer rounded to nearest in its format) and the best of them is kept.

    Attributes:
        target_bpw: the budget, stored bits per weight over all compressed layers (all metadata counted);
            0 = no search.
        bits: candidate code widths.
        group_sizes: candidate group sizes (those that do not divide a layer's in_features are skipped for it).
        ratios: candidate fractions of groups pruned.
        per_layer: let layers take different formats; False picks one format for the whole model.
        windows: calibration windows of the Fisher pass (taken from the start; the held-out ones are not used).
        verify: uniform candidates measured beside the per-layer choice.
    """

    target_bpw: float = 0.0
    bits: tuple = (2, 3, 4)
    group_sizes: tuple = (32, 64, 128)
    ratios: tuple = (0.0, 0.1, 0.25, 0.5)
    per_layer: bool = True
    windows: int = 8
    verify: int = 3

    _rules: ClassVar[dict[str, Rule]] = {
        "target_bpw": number(0, 64),
        "bits": _tuple_of(lambda b: b in SUPPORTED_BITS and isinstance(b, int) and not isinstance(b, bool),
                          f"code widths from {SUPPORTED_BITS}"),
        "group_sizes": _tuple_of(lambda g: isinstance(g, int) and g in {1 << k for k in range(3, 9)},
                                 f"powers of two from {MIN_GROUP_SIZE} to {MAX_GROUP_SIZE}"),
        "ratios": _tuple_of(lambda r: isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1,
                            "ratios in [0, 1)"),
        "per_layer": FLAG,
        "windows": integer(1, 1 << 20),
        "verify": integer(0, 1000),
    }


@dataclass(frozen=True)
class CompressConfig(ValidatedConfig):
    """The whole compression: which method, its quantization and sparsity, its calibration data.

    Attributes:
        method: compression algorithm: "gqsa" (calibrated: Hessian-aware group saliency, then pruning and
            quantization with error compensation, block by block), "magnitude" (data-free: prune the groups or
            weights with the smallest magnitude, round the rest to nearest), and the float pruning baselines
            "sparsegpt" (OBS pruning with compensation, adaptive mask per column block) and "wanda"
            (|w| * ||x||, no weight update), both calibrated block by block.
        quant: the QuantSpec of every compressed layer; None for patterns that leave weights in float
            ("unstructured", "N:M"), and only then.
        sparsity: the SparsitySpec.
        calib: the CalibSpec (unused by data-free methods, recorded anyway).
        oneshot: the OneShotSpec of method "gqsa".
        bqpo: the BQPOSpec (block-wise training after the one-shot step, off by default; for "sparsegpt" and
            "wanda" it reconstructs the kept float weights with the mask fixed).
        e2e: the E2ESpec (end-to-end training of scales after that; method "gqsa" only, off by default).
        search: the FormatSearchSpec (``--target-bpw``: each layer's format chosen for a storage budget before
            compressing; off by default).
        layer_formats: layer name -> LayerFormat for layers whose bits, group size or ratio differ from
            ``quant`` and ``sparsity`` (packed methods; written by the search, or given).
        version: config schema version; files written by another version are rejected with a clear error.
    """

    _nested: ClassVar[dict[str, type]] = {
        "quant": QuantSpec,
        "sparsity": SparsitySpec,
        "calib": CalibSpec,
        "oneshot": OneShotSpec,
        "bqpo": BQPOSpec,
        "e2e": E2ESpec,
        "search": FormatSearchSpec,
    }
    _nested_maps: ClassVar[dict[str, type]] = {"layer_formats": LayerFormat}

    method: str = "gqsa"
    quant: QuantSpec | None = field(default_factory=QuantSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    oneshot: OneShotSpec = field(default_factory=OneShotSpec)
    bqpo: BQPOSpec = field(default_factory=BQPOSpec)
    e2e: E2ESpec = field(default_factory=E2ESpec)
    search: FormatSearchSpec = field(default_factory=FormatSearchSpec)
    layer_formats: dict = field(default_factory=FrozenMap)
    version: int = CONFIG_VERSION

    _rules: ClassVar[dict[str, Rule]] = {
        "method": one_of(COMPRESS_METHODS),
        "layer_formats": Rule("a mapping of layer names to LayerFormat",
                              lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(f, LayerFormat)
                                                                    for k, f in v.items()), FrozenMap),
    }

    def _check(self) -> None:
        for name, cls in self._nested.items():
            if name == "quant" and self.quant is None:
                continue
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"CompressConfig.{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        pattern = self.sparsity.pattern
        if self.bqpo.epochs and self.method == "magnitude":
            raise ValueError("CompressConfig: BQPO (bqpo.epochs > 0) follows a calibrated method (gqsa, sparsegpt, "
                             "wanda); method 'magnitude' is data-free")
        if self.bqpo.epochs and self.bqpo.mask_updates and self.method != "gqsa":
            raise ValueError(f"CompressConfig: BQPO mask updates choose kept groups of GQSA layers; method "
                             f"{self.method!r} keeps its mask (set mask_updates 0)")
        if self.e2e.epochs and self.method != "gqsa":
            raise ValueError(f"CompressConfig: E2E-OQP (e2e.epochs > 0) trains GQSA layers; method {self.method!r} "
                             "has none")
        if self.oneshot.saliency == "obs_adaptive" and self.sparsity.allocation == "model":
            raise ValueError("CompressConfig: saliency 'obs_adaptive' chooses masks block by block; allocation "
                             "'model' needs masks chosen per layer (use saliency 'obs')")
        if pattern == "group":
            if self.method in FLOAT_SPARSE_METHODS:
                raise ValueError(
                    f"CompressConfig: method {self.method!r} prunes single weights (pattern 'unstructured' or "
                    "'N:M'); for group sparsity use method 'gqsa' (saliency 'wanda' gives the Wanda score)"
                )
            if self.quant is None:
                raise ValueError("CompressConfig: pattern 'group' quantizes the kept groups and needs a QuantSpec")
        else:
            if self.method == "gqsa":
                raise ValueError(
                    f"CompressConfig: method 'gqsa' prunes whole groups (pattern 'group'), got pattern {pattern!r}; "
                    "use method 'sparsegpt', 'wanda' or 'magnitude' for unstructured or N:M sparsity"
                )
            if self.quant is not None:
                raise ValueError(
                    f"CompressConfig: pattern {pattern!r} leaves the kept weights in float; quant must be None"
                )
            if self.sparsity.allocation == "model" and self.method != "magnitude":
                raise ValueError(f"CompressConfig: method {self.method!r} does not support allocation 'model'")
        if self.layer_formats or self.search.target_bpw:
            what = "layer_formats" if self.layer_formats else "search.target_bpw (--target-bpw)"
            if pattern != "group" or self.method not in ("gqsa", "magnitude"):
                raise ValueError(f"CompressConfig: {what} chooses packed formats per layer: method 'gqsa' or "
                                 f"'magnitude' with pattern 'group', got method {self.method!r}, pattern {pattern!r}")
            if self.sparsity.allocation == "model":
                raise ValueError(f"CompressConfig: {what} sets each layer's ratio; allocation 'model' does not "
                                 "apply (use 'row' or 'matrix')")
            if self.oneshot.saliency == "obs_adaptive" and any(f.ratio for f in self.layer_formats.values()):
                raise ValueError("CompressConfig: layer_formats with pruning need a saliency chosen per layer; "
                                 "'obs_adaptive' chooses masks block by block (use 'obs')")
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"CompressConfig.version {self.version!r} is not supported by this gqsa (expects {CONFIG_VERSION})"
            )

    def layer_quant(self, name: str) -> QuantSpec:
        """The QuantSpec of layer ``name``: ``quant`` with the layer's own bits and group size where
        ``layer_formats`` gives them."""
        f = self.layer_formats.get(name)
        return self.quant if f is None else self.quant.replace(bits=f.bits, group_size=f.group_size)

    def layer_ratio(self, name: str) -> float:
        """Fraction of layer ``name``'s groups (or weights) pruned."""
        f = self.layer_formats.get(name)
        return self.sparsity.ratio if f is None else f.ratio

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
