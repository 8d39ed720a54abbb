"""BQPO (Block Quantization-Pruning Optimization): block-wise training after the one-shot step.

The same loop gives the float pruning baselines (SparseGPT, Wanda) their block-wise weight reconstruction with
the mask fixed (MaskedLinear), and dense W2/W3 GQSA at sparsity 0 the EfficientQAT Block-AP recipe, so trained
methods are compared with trained baselines.

For each decoder block b, in order:

    targets  = dense block b on the dense inputs            (what the block should output; or on the compressed
                                                             inputs: BQPOSpec.targets "compressed")
    H        = statistics of the compressed inputs           (as the one-shot step uses them)
    block b  <- GQSA one-shot (masks, codes, scales)         (the starting point)
    block b  <- FakeQuantLinear layers, trained with AdamW to minimise MSE(block(compressed inputs), targets);
                masks fixed, pruned groups exactly zero, the best state on held-out windows kept
    block b  <- frozen back to PackedLinear (to_packed)
    next compressed inputs = block b on the compressed inputs; next dense inputs = targets

Three sets of activations live at once (dense inputs, compressed inputs, targets); past the memory budget they
go to disk (ActivationStore).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from gqsa.algorithms.activation_store import ActivationStore
from gqsa.algorithms.blockwise import CompressLinearFn, collect_block_hessians, compress_block_linears
from gqsa.algorithms.driver import BlockWork, block_output, walk_blocks
from gqsa.algorithms.resume import ResumeState
from gqsa.algorithms.training import autocast_dtype, fit, train_window_count
from gqsa.config import BQPOSpec
from gqsa.models.surgery import set_submodule
from gqsa.models.adapter import block_linears, block_projections
from gqsa.nn.fake_quant import FakeQuantLinear
from gqsa.nn.masked_linear import MaskedLinear
from gqsa.nn.packed_linear import PackedLinear

logger = logging.getLogger(__name__)

# (full layer name, dense weight (N, K), compressed module, H) -> the layer's report after training
FinalReportFn = Callable[[str, torch.Tensor, nn.Module, torch.Tensor], dict]


def _swap(block: nn.Module, to_trainable: bool, dense: dict[str, torch.Tensor] | None = None) -> None:
    """Compressed layers -> trainable ones (PackedLinear -> FakeQuantLinear "weights", with a learnable mask when
    ``dense`` gives the layers' weights before pruning; pruned nn.Linear -> MaskedLinear), or back."""
    for name, module in block_projections(block).items():
        if to_trainable and isinstance(module, PackedLinear):
            fake = FakeQuantLinear.from_module(module, mode="weights", dense=None if dense is None else dense[name])
            set_submodule(block, name, fake)
        elif to_trainable and isinstance(module, nn.Linear):
            set_submodule(block, name, MaskedLinear(module))
        elif not to_trainable and isinstance(module, FakeQuantLinear):
            set_submodule(block, name, PackedLinear.from_packed(module.to_packed(), module.bias))
        elif not to_trainable and isinstance(module, MaskedLinear):
            set_submodule(block, name, module.to_linear())


def _window_loss(block: nn.Module, kwargs: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(block_output(block(x, **kwargs)).float(), y.float())


def _mask_update_steps(spec: BQPOSpec, n_windows: int) -> set[int]:
    """The optimizer steps after which the masks are chosen again: ``spec.mask_updates`` of them, evenly spread
    over every epoch but the last (``fit``'s step count; the last update ends the second-to-last epoch)."""
    n_train = train_window_count(n_windows, spec.val_windows)
    free = (spec.epochs - 1) * -(-n_train // spec.batch_size)
    if not spec.mask_updates or free < 1:
        return set()
    return {max(1, round(free * (j + 1) / spec.mask_updates)) for j in range(spec.mask_updates)}


def train_block(
    block: nn.Module, kwargs: dict, inputs: ActivationStore, targets: ActivationStore, spec: BQPOSpec, seed: int,
    input_sq: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Train the FakeQuantLinear (or MaskedLinear) layers of ``block`` so that block(inputs[i]) matches
    targets[i] (MSE).

    Weights train at ``spec.lr_weight`` and scales / zero points at ``spec.lr_qparams``; every other parameter
    of the block stays frozen. See ``gqsa.algorithms.training.fit`` for the loop and its early stopping. With
    ``spec.mask_updates``, the layers with a learnable mask choose their groups again at the steps
    ``_mask_update_steps`` gives, from ``input_sq`` (layer name in the block -> (K,) mean squared input).
    """
    fakes = [m for m in block.modules() if isinstance(m, FakeQuantLinear)]
    learners = {name: m for name, m in block_projections(block).items()
                if isinstance(m, FakeQuantLinear) and m.learn_mask}
    updates = _mask_update_steps(spec, len(inputs)) if learners else set()
    if updates and input_sq is None:
        raise ValueError("BQPO mask updates need each layer's mean squared input (input_sq)")
    revived = {"updates": 0, "groups_revived": 0}

    def on_step(step: int) -> None:
        if step in updates:
            revived["updates"] += 1
            revived["groups_revived"] += sum(m.reselect_mask(input_sq[name]) for name, m in learners.items())

    masked = [m for m in block.modules() if isinstance(m, MaskedLinear)]
    weights = [m.weight for m in fakes + masked]
    qparams = [p for m in fakes for p in (m.scale, m.zero_point) if isinstance(p, nn.Parameter)]
    requires = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in weights + qparams:
        p.requires_grad_(True)
    try:
        return fit(
            [{"params": weights, "lr": spec.lr_weight, "weight_decay": spec.weight_decay},
             {"params": qparams, "lr": spec.lr_qparams, "weight_decay": 0.0}],
            lambda i: _window_loss(block, kwargs, inputs[i], targets[i]),
            len(inputs), spec.epochs, spec.batch_size, spec.grad_clip, spec.val_windows, spec.patience, seed,
            label="BQPO", on_step=on_step if updates else None, state=[m.mask for m in learners.values()],
            autocast=autocast_dtype(spec.train_dtype),
        ) | ({"mask_updates": revived} if updates else {})
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)


@torch.no_grad()
def compress_blockwise_bqpo(
    model: nn.Module,
    calib_ids: torch.Tensor,
    compress_linear: CompressLinearFn,
    spec: BQPOSpec,
    final_report: FinalReportFn,
    progress: bool = True,
    activation_budget_bytes: int | None = None,
    offload_dir: str | None = None,
    host_activation_budget_bytes: int = 0,
    resume: ResumeState | None = None,
    device: torch.device | str | None = None,
) -> tuple[list[dict], list[dict]]:
    """One-shot compression then BQPO, block by block (see the module docstring; the walk, the resume state and
    the device handling are ``gqsa.algorithms.driver.walk_blocks``'s).

    Args:
        compress_linear: the one-shot step for one layer (as for ``compress_blockwise``).
        spec: BQPO settings (``spec.epochs`` > 0).
        final_report: the report of one layer after training (name, dense weight, module, H).
        resume: where finished blocks are saved; blocks already there are checked and replayed instead of
            recomputed (a damaged entry is recomputed, with every later block).
        device: where each block is compressed and trained (default: the model's device).

    Returns:
        (report per layer: errors after BQPO, and the one-shot errors as ``oneshot_*``; BQPO statistics per
        block).
    """

    def step(work: BlockWork) -> dict:
        return _compress_and_train(work.block, work.prefix, work.index, work.kwargs, work.inputs, work.targets,
                                   compress_linear, spec, final_report)

    records = walk_blocks(model, calib_ids, step, needs_targets=True, targets_from=spec.targets, device=device,
                          resume=resume, progress=progress, desc="compressing + BQPO", record_keys=("layers", "bqpo"),
                          activation_budget_bytes=activation_budget_bytes, offload_dir=offload_dir,
                          host_activation_budget_bytes=host_activation_budget_bytes)
    return [layer for r in records for layer in r["layers"]], [r["bqpo"] for r in records]


def _compress_and_train(
    block: nn.Module, prefix: str, b: int, kw: dict, q_in: ActivationStore, targets: ActivationStore,
    compress_linear: CompressLinearFn, spec: BQPOSpec, final_report: FinalReportFn,
) -> dict:
    """One-shot then BQPO for one block; returns its record: the final per-layer reports ("layers") and the
    block's training statistics ("bqpo")."""
    stats = collect_block_hessians(block, q_in, kw, b, prefix)
    dense = {name: m.weight.detach().clone() for name, m in block_linears(block).items()}
    oneshot = compress_block_linears(block, prefix, stats, compress_linear)
    learn = spec.mask_updates > 0
    _swap(block, to_trainable=True, dense=dense if learn else None)
    input_sq = {name: s.hessian.diagonal() for name, s in stats.items()} if learn else None
    result = train_block(block, kw, q_in, targets, spec, spec.seed + b, input_sq)
    _swap(block, to_trainable=False)
    reports = []
    for (name, module), first in zip(block_projections(block).items(), oneshot):
        final = final_report(f"{prefix}.{name}", dense[name], module, stats[name].hessian)
        reports.append({**final, **{f"oneshot_{k}": first[k] for k in ("relative_error", "output_error")
                                    if k in first}})
    logger.info("block %d BQPO: block output MSE %.4g -> %.4g (%d epochs)", b, result["loss_before"],
                result["loss_after"], result["epochs_run"])
    return {"layers": reports, "bqpo": {"block": b, **result}}
