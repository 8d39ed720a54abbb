"""Frozen, validated, versioned configuration dataclasses.

Every stage of gqsa takes one of these. Invalid values raise ``ValueError`` naming the rule that was broken,
and every config round-trips through JSON (``to_dict`` / ``from_dict``), so the resolved config can be written
next to every output and read back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from gqsa.quant.saliency import GROUP_SALIENCIES
from gqsa.utils.validated import FLAG, TEXT, Rule, ValidatedConfig, integer, number, one_of, power_of_two

CONFIG_VERSION = 1

SUPPORTED_BITS = (2, 3, 4, 8)
BQPO_TARGETS = ("dense", "compressed")  # the inputs of the dense block whose outputs BQPO trains towards
TRAIN_DTYPES = ("float32", "bfloat16")  # what BQPO and E2E-OQP compute in (trainable parameters stay float32)
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
class BQPOSpec(ValidatedConfig):
    """Block-wise training after the one-shot step (BQPO): each block's kept weights, scales and zero points are
    trained to make the compressed block's output on the compressed inputs match the dense block's output on
    the dense inputs. Masks stay fixed.

    Attributes:
        epochs: passes over the training windows per block; 0 turns BQPO off.
        lr_weight: AdamW learning rate of the float weights (quantized with straight-through rounding).
        lr_qparams: AdamW learning rate of the scales and zero points.
        weight_decay: AdamW weight decay (weights only).
        batch_size: windows per optimizer step (gradients accumulated one window at a time).
        grad_clip: max global gradient norm (0 = no clipping).
        val_windows: calibration windows held out for early stopping (taken from the end; 0 = none).
        patience: epochs without a better held-out loss before stopping; the best state is restored.
        seed: seed of the window order (per block: seed + block index).
        mask_updates: times the group mask of each layer is chosen again from the trained weights, spread over
            every epoch but the last (which trains with the mask frozen); each row keeps its number of groups
            (``FakeQuantLinear.reselect_mask``). 0 = the one-shot mask stays. Needs at least 2 epochs.
        targets: the dense block's outputs to match on the compressed inputs, computed on "dense" (the dense
            model's inputs, so a block also corrects the error of the blocks before it) or on "compressed" (the
            same compressed inputs: each block only reproduces its own dense function).
        train_dtype: "float32", or "bfloat16" to compute the block under autocast (the trainable weights, scales
            and zero points and the optimizer state stay float32).
    """

    epochs: int = 0
    lr_weight: float = 1e-3
    lr_qparams: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_clip: float = 1.0
    val_windows: int = 4
    patience: int = 1
    seed: int = 0
    mask_updates: int = 0
    targets: str = "dense"
    train_dtype: str = "float32"

    _rules: ClassVar[dict[str, Rule]] = {
        "epochs": integer(0, 1000),
        "lr_weight": number(0, 1.0),
        "lr_qparams": number(0, 1.0),
        "weight_decay": number(0, 1.0),
        "batch_size": integer(1, 1 << 20),
        "grad_clip": number(0, 1e6),
        "val_windows": integer(0, 1 << 20),
        "patience": integer(1, 1000),
        "seed": integer(),
        "mask_updates": integer(0, 1 << 20),
        "targets": one_of(BQPO_TARGETS),
        "train_dtype": one_of(TRAIN_DTYPES),
    }

    def _check(self) -> None:
        if self.mask_updates and self.epochs == 1:
            raise ValueError("BQPOSpec.mask_updates needs at least 2 epochs (the last trains with the mask frozen), "
                             "got epochs 1")


@dataclass(frozen=True)
class E2ESpec(ValidatedConfig):
    """End-to-end training of the quantization parameters (E2E-OQP) after the block-wise steps: the integer
    codes and the masks are frozen; the scales (and, if asked, the zero points) of every layer train on the
    next-token loss of the calibration windows through the whole model.

    Attributes:
        epochs: passes over the training windows; 0 turns E2E-OQP off.
        lr: AdamW learning rate of the scales.
        train_zero_point: also train the zero points (asymmetric layers; rounded with straight-through).
        lr_zero_point: their learning rate (zero points are in code units, scales in weight units).
        batch_size: windows per optimizer step (gradients accumulated one window at a time).
        grad_clip: max global gradient norm (0 = no clipping).
        val_windows: calibration windows held out for early stopping (0 = none).
        patience: epochs without a better held-out loss before stopping; the best state is restored.
        gradient_checkpointing: activation recomputation: recompute block activations in the backward pass to
            bound memory (the key keeps transformers' name; saved configs use it).
        seed: seed of the window order.
        distill: weight of distillation in the loss, in [0, 1]: ``(1 - distill) * next-token loss + distill *
            KL(dense model || compressed model)`` on the next-token distributions (``gqsa.algorithms.distill``;
            the dense model's top-k is computed before compression). 0 = the next-token loss only.
        distill_top_k: tokens of the dense model's distribution kept per position (the rest is one outcome).
        train_dtype: "float32", or "bfloat16" to compute the model under autocast (the scales and zero points
            and the optimizer state stay float32).
    """

    epochs: int = 0
    lr: float = 1e-4
    train_zero_point: bool = False
    lr_zero_point: float = 1e-2
    batch_size: int = 1
    grad_clip: float = 1.0
    val_windows: int = 4
    patience: int = 1
    gradient_checkpointing: bool = True
    seed: int = 0
    distill: float = 0.0
    distill_top_k: int = 64
    train_dtype: str = "float32"

    _rules: ClassVar[dict[str, Rule]] = {
        "epochs": integer(0, 1000),
        "lr": number(0, 1.0),
        "train_zero_point": FLAG,
        "lr_zero_point": number(0, 10.0),
        "batch_size": integer(1, 1 << 20),
        "grad_clip": number(0, 1e6),
        "val_windows": integer(0, 1 << 20),
        "patience": integer(1, 1000),
        "gradient_checkpointing": FLAG,
        "seed": integer(),
        "distill": number(0, 1.0),
        "distill_top_k": integer(1, 1 << 20),
        "train_dtype": one_of(TRAIN_DTYPES),
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
        version: config schema version; files written by another version are rejected with a clear error.
    """

    _nested: ClassVar[dict[str, type]] = {
        "quant": QuantSpec,
        "sparsity": SparsitySpec,
        "calib": CalibSpec,
        "oneshot": OneShotSpec,
        "bqpo": BQPOSpec,
        "e2e": E2ESpec,
    }

    method: str = "gqsa"
    quant: QuantSpec | None = field(default_factory=QuantSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    oneshot: OneShotSpec = field(default_factory=OneShotSpec)
    bqpo: BQPOSpec = field(default_factory=BQPOSpec)
    e2e: E2ESpec = field(default_factory=E2ESpec)
    version: int = CONFIG_VERSION

    _rules: ClassVar[dict[str, Rule]] = {"method": one_of(COMPRESS_METHODS)}

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
