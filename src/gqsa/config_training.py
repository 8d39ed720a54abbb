"""The training stages' settings, nested in ``gqsa.config.CompressConfig``: block-wise training (``BQPOSpec``) and
end-to-end training of the quantization parameters (``E2ESpec``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gqsa.utils.validated import FLAG, Rule, ValidatedConfig, integer, number, one_of

BQPO_TARGETS = ("dense", "compressed")  # the inputs of the dense block whose outputs BQPO trains towards
TRAIN_DTYPES = ("float32", "bfloat16")  # what BQPO and E2E-OQP compute in (trainable parameters stay float32)


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
