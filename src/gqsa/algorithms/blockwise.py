"""The one-shot step of a calibrated method on one block, and the block-wise one-shot compression.

For block b (the walk itself is ``gqsa.algorithms.driver.walk_blocks``): run it on its inputs (the outputs of the
already compressed blocks b-1, ..., 0) while hooks accumulate H = 2/n X^T X for each group of linear layers that
read the same input; compress those layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from gqsa.algorithms.activation_store import ActivationStore
from gqsa.algorithms.driver import BlockWork, walk_blocks
from gqsa.algorithms.hessian import HessianAccumulator
from gqsa.algorithms.resume import ResumeState
from gqsa.models.adapter import block_linears, input_groups

logger = logging.getLogger(__name__)

# (full layer name, nn.Linear, H of its input) -> replacement module and a report dict
CompressLinearFn = Callable[[str, nn.Linear, HessianAccumulator], tuple[nn.Module, dict]]


def check_finite_input(x: torch.Tensor, block_index: int | None, layer: str) -> None:
    """Refuse a calibration input that holds NaN or Inf: one reduction, no copy.

    Args:
        x: (..., K) the input a linear layer is about to read.
        block_index: the decoder block's index (None: unknown), for the message.
        layer: the layer's full name, for the message.

    Raises:
        ValueError: naming the block, the layer and the activations' dtype.
    """
    if bool(torch.isfinite(x).all()):
        return
    where = f"block {block_index}, layer {layer}" if block_index is not None else f"layer {layer}"
    dtype = str(x.dtype).removeprefix("torch.")
    raise ValueError(f"{where}: calibration activations contain NaN/Inf (the model overflows in {dtype} on the "
                     "calibration text? try float32, or check the earlier blocks' weights)")


@torch.no_grad()
def collect_block_hessians(
    block: nn.Module, hidden: ActivationStore, kwargs: dict, block_index: int | None = None, prefix: str = ""
) -> dict[str, HessianAccumulator]:
    """Run ``block`` on every window of ``hidden`` and return H per linear layer (shared within input groups).

    Args:
        block: one decoder block.
        hidden: its input, one (1, L, D) tensor per calibration window.
        kwargs: what the model passes the block besides the hidden states.
        block_index: the block's index in the model, for error messages.
        prefix: the block's module path (``model.layers.3``), for error messages.

    Returns:
        layer name (relative to the block) -> accumulated H (one object per input group).

    Raises:
        ValueError: a layer's input holds NaN or Inf, naming the block and the layer.
    """
    linears = block_linears(block)
    stats: dict[str, HessianAccumulator] = {}
    hooks = []

    def accumulate(acc: HessianAccumulator, layer: str, x: torch.Tensor) -> None:
        check_finite_input(x, block_index, layer)
        acc.add(x)

    for group in input_groups(block):
        first = linears[group[0]]
        acc = HessianAccumulator(first.in_features, device=first.weight.device)
        for name in group:
            stats[name] = acc
        layer = f"{prefix}.{group[0]}" if prefix else group[0]
        hooks.append(first.register_forward_pre_hook(
            lambda mod, args, acc=acc, layer=layer: accumulate(acc, layer, args[0])))
    try:
        for h in hidden:
            block(h, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def compress_block_linears(
    block: nn.Module, prefix: str, stats: dict[str, HessianAccumulator], compress_linear: CompressLinearFn
) -> list[dict]:
    """Replace every linear layer of ``block`` by ``compress_linear``'s module; one report per layer."""
    from gqsa.models.surgery import set_submodule

    reports = []
    # by name, so that each dense layer is released once replaced: one dense layer at a time is held here, not
    # the block's (0.6 GiB less at a Llama-2-7B block's down_proj)
    for name in list(block_linears(block)):
        full = f"{prefix}.{name}"
        linear = block.get_submodule(name)
        module, report = compress_linear(full, linear, stats[name])
        logger.info("%s: %s", full, ", ".join(f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float)))
        reports.append(report)
        set_submodule(block, name, module)
        del linear, module
    return reports


@torch.no_grad()
def compress_blockwise(
    model: nn.Module,
    calib_ids: torch.Tensor,
    compress_linear: CompressLinearFn,
    progress: bool = True,
    activation_budget_bytes: int | None = None,
    offload_dir: str | None = None,
    host_activation_budget_bytes: int = 0,
    desc: str = "compressing blocks",
    device: torch.device | str | None = None,
    resume: ResumeState | None = None,
) -> list[dict]:
    """Compress every decoder linear layer block by block with calibration inputs.

    Args:
        model: a supported causal LM (modified in place).
        calib_ids: (n, L) calibration token windows.
        compress_linear: compresses one layer given its input statistics; returns (new module, report).
        progress: show a progress bar over blocks.
        activation_budget_bytes: memory for the activations of all windows (a block's inputs and outputs
            together); beyond it they are written to ``offload_dir``. None = no limit.
        offload_dir: where spilled activations go (default: the system temporary directory).
        host_activation_budget_bytes: host memory for a GPU's activations past ``activation_budget_bytes``.
        desc: progress bar label.
        device: where each block is compressed (default: the model's device).
        resume: finished blocks saved there, and replayed from there (``walk_blocks``).

    Returns:
        One report dict per compressed layer, in order.
    """

    def step(work: BlockWork) -> dict:
        stats = collect_block_hessians(work.block, work.inputs, work.kwargs, work.index, work.prefix)
        return {"layers": compress_block_linears(work.block, work.prefix, stats, compress_linear)}

    records = walk_blocks(model, calib_ids, step, device=device, resume=resume, progress=progress, desc=desc,
                          activation_budget_bytes=activation_budget_bytes, offload_dir=offload_dir,
                          host_activation_budget_bytes=host_activation_budget_bytes)
    return [layer for record in records for layer in record["layers"]]
