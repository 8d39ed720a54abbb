"""E2E-OQP (End-to-End Optimized Quantization-Pruning): train only quantization parameters through the model.

Every PackedLinear becomes a FakeQuantLinear in mode "qparams" (integer codes and masks frozen); the scales (and,
if asked, the zero points) train on the next-token loss of the calibration windows, mixed with the KL divergence
from the dense model's next-token distributions when ``spec.distill`` > 0 (``gqsa.algorithms.distill``); every
other parameter of the model stays frozen. Activation recomputation in the decoder blocks (transformers calls it
gradient checkpointing) bounds activation memory. At the end the layers are frozen back into the packed format with
the trained scales.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from gqsa.algorithms.distill import TeacherTopK, top_k_kl
from gqsa.algorithms.training import autocast_dtype, fit
from gqsa.config import E2ESpec
from gqsa.nn.fake_quant import FakeQuantLinear
from gqsa.nn.packed_linear import PackedLinear

logger = logging.getLogger(__name__)


def _swap_all(model: nn.Module, to_fake: bool, train_zero_point: bool = False) -> list[FakeQuantLinear]:
    from gqsa.models.surgery import set_submodule

    fakes = []
    for name, module in list(model.named_modules()):
        if to_fake and isinstance(module, PackedLinear):
            fake = FakeQuantLinear.from_module(module, mode="qparams", train_zero_point=train_zero_point)
            set_submodule(model, name, fake)
            fakes.append(fake)
        elif not to_fake and isinstance(module, FakeQuantLinear):
            set_submodule(model, name, PackedLinear.from_packed(module.to_packed(), module.bias))
    return fakes


def _recompute_activations(model: nn.Module, on: bool) -> None:
    """Turn activation recomputation in the backward pass on or off (transformers' "gradient checkpointing";
    transformers 5 renamed its methods to "activation checkpointing")."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def e2e_oqp(model: nn.Module, calib_ids: torch.Tensor, spec: E2ESpec, progress: bool = True,
            teacher: TeacherTopK | None = None) -> dict:
    """Train the scales (and zero points) of every packed layer of ``model`` on the loss of ``calib_ids``.

    Args:
        model: a transformers causal LM whose compressed layers are PackedLinear (modified in place).
        calib_ids: (n, L) token windows; the last ``spec.val_windows`` are held out for early stopping.
        progress: a progress bar of optimizer steps.
        teacher: the dense model's top-k distributions on ``calib_ids`` (``teacher_top_k``); needed when
            ``spec.distill`` > 0.

    Returns:
        {"loss_before", "loss_after" (held-out mean of the training loss), "objective" (what that loss is),
        "epochs_run", "steps", "layers"}.

    Raises:
        ValueError: no PackedLinear in the model, or distillation asked without a teacher of ``calib_ids``' shape.
    """
    if spec.distill > 0 and (teacher is None or tuple(teacher.rest.shape) != tuple(calib_ids.shape)):
        got = None if teacher is None else tuple(teacher.rest.shape)
        raise ValueError(f"E2E-OQP with distill {spec.distill} needs the dense model's top-k on the "
                         f"{tuple(calib_ids.shape)} calibration windows (teacher_top_k); got {got}")
    fakes = _swap_all(model, to_fake=True, train_zero_point=spec.train_zero_point)
    if not fakes:
        raise ValueError("E2E-OQP: the model has no PackedLinear layer; compress it first")
    requires = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    scales = [m.scale for m in fakes]
    zeros = [m.zero_point for m in fakes if isinstance(m.zero_point, nn.Parameter)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in scales + zeros:
        p.requires_grad_(True)
    # the config key keeps transformers' name ("gradient_checkpointing"): saved configs and resume states use it
    recompute = spec.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable")
    if recompute:
        _recompute_activations(model, True)
    model.train()  # transformers recomputes activations only in training mode; these models have no dropout

    device = next(model.parameters()).device

    w = spec.distill

    def window_loss(i: int) -> torch.Tensor:
        ids = calib_ids[i : i + 1].to(device)
        out = model(input_ids=ids, labels=ids if w < 1 else None, use_cache=False)
        if w == 0:
            return out.loss
        kl = top_k_kl(out.logits, teacher.window(i, device))
        return kl if w == 1 else (1 - w) * out.loss + w * kl

    try:
        groups = [{"params": scales, "lr": spec.lr, "weight_decay": 0.0}]
        if zeros:
            groups.append({"params": zeros, "lr": spec.lr_zero_point, "weight_decay": 0.0})
        result = fit(groups, window_loss, calib_ids.shape[0],
                     spec.epochs, spec.batch_size, spec.grad_clip, spec.val_windows, spec.patience, spec.seed,
                     label="E2E-OQP", progress=progress,
                     autocast=autocast_dtype(spec.train_dtype))
    finally:
        if recompute:
            _recompute_activations(model, False)
        model.train(was_training)
        for p, flag in requires.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            _swap_all(model, to_fake=False)
    logger.info("E2E-OQP: held-out loss %.4f -> %.4f (%d epochs)", result["loss_before"], result["loss_after"],
                result["epochs_run"])
    objective = "next-token loss" if w == 0 else f"{1 - w:g} * next-token loss + {w:g} * top-{spec.distill_top_k} KL"
    return {**result, "objective": objective, "layers": len(fakes)}
