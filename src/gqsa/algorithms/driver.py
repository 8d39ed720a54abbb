"""The one walk over the decoder blocks that every calibrated method takes (one-shot, BQPO, the sensitivity pass).

For block b, in order:

    onload    block b to the compute device (read from its shards there when the model was loaded lazily:
              gqsa.models.lazy); its keyword arguments are there already (the model itself stays where it is)
    targets   the dense block's outputs, when the method trains towards them (``needs_targets``): on the dense
              model's inputs (``targets_from="dense"``, a second stream of activations through the dense blocks) or
              on the compressed model's inputs (``"compressed"``: what this block alone should do)
    step      the method's work on the block, in place: statistics, masks, codes, training  -> the block's record
              (or: replay block b from the resume state, when a trustworthy entry is there)
    resume    the finished block's layers and record saved (when there is a resume state)
    outputs   the compressed block on the compressed inputs: the next block's inputs
    offload   block b back to the model's device

Calibration activations stay on the compute device up to the memory budget and go to disk beyond it
(``ActivationStore``), so the memory bound is one block plus the activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gqsa.algorithms.activation_store import ActivationStore
from gqsa.algorithms.resume import ResumeEntryError, ResumeState
from gqsa.config_training import BQPO_TARGETS as TARGETS_FROM
from gqsa.models.adapter import block_prefix, block_projections, capture_block_inputs, decoder_layers
from gqsa.models.lazy import materialize_block
from gqsa.models.surgery import set_submodule
from gqsa.utils.memory import trim_heap

logger = logging.getLogger(__name__)


@dataclass
class BlockWork:
    """What a method's step gets for one block: the block and its keyword arguments on the compute device, its
    inputs (the outputs of the blocks before it, already compressed) and, when asked for, its targets (the dense
    block's outputs on the dense or on these inputs: ``walk_blocks``' ``targets_from``)."""

    index: int
    prefix: str  # the block's module path, e.g. "model.layers.3"
    block: nn.Module
    kwargs: dict
    inputs: ActivationStore
    targets: ActivationStore | None


# compresses (and trains) work.block in place; returns the block's record (JSON-serialisable with resume)
BlockStep = Callable[[BlockWork], dict]


def to_device(value, device: torch.device):
    """``value`` with every tensor inside (dicts, lists, tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the first one's device)."""
    return next(model.parameters()).device


@torch.no_grad()
def capture_calibration_inputs(model: nn.Module, calib_ids: torch.Tensor, store: ActivationStore | None = None,
                               device: torch.device | None = None) -> tuple[ActivationStore, list[dict]]:
    """First-block inputs of every calibration window (one (1, L, D) tensor each, on ``device``) and the per-block
    kwargs (on ``device``; default: the model's device)."""
    store = ActivationStore() if store is None else store
    device = model_device(model) if device is None else device
    block_kwargs = None
    for i in range(calib_ids.shape[0]):
        h, kw = capture_block_inputs(model, calib_ids[i: i + 1].to(model_device(model)))
        store.append(h.to(device))
        block_kwargs = block_kwargs or kw  # identical for every window of the same length
    moved: dict[int, dict] = {}  # blocks of one kind share one dict: move it once
    return store, [moved.setdefault(id(kw), to_device(kw, device)) for kw in block_kwargs]


def block_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, hidden: ActivationStore, kwargs: dict, out: ActivationStore) -> ActivationStore:
    """Append ``block``'s output on every window of ``hidden`` to ``out``; returns ``out``."""
    for h in hidden:
        out.append(block_output(block(h, **kwargs)))
    return out


def store_factory(activation_budget_bytes: int | None, offload_dir: str | None, stores: int = 2,
                  host_activation_budget_bytes: int = 0):
    """A function making ActivationStores that share both budgets (the device's and the host memory's) among
    ``stores`` live ones."""
    share = None if activation_budget_bytes is None else activation_budget_bytes // stores
    return lambda: ActivationStore(share, offload_dir, host_activation_budget_bytes // stores)


def walk_blocks(
    model: nn.Module,
    calib_ids: torch.Tensor,
    step: BlockStep,
    *,
    needs_targets: bool = False,
    targets_from: str = "dense",
    device: torch.device | str | None = None,
    resume: ResumeState | None = None,
    progress: bool = True,
    desc: str = "compressing blocks",
    activation_budget_bytes: int | None = None,
    offload_dir: str | None = None,
    host_activation_budget_bytes: int = 0,
    record_keys: tuple[str, ...] = ("layers",),
) -> list[dict]:
    """Run ``step`` on every decoder block of ``model``, in order (see the module docstring).

    Args:
        model: a supported causal LM (its blocks are changed in place).
        calib_ids: (n, L) calibration token windows.
        step: the method's work on one block; returns the block's record.
        needs_targets: also give the step the dense block's outputs (a third set of activations).
        targets_from: their inputs: "dense" (the dense model's, carried through the dense blocks) or "compressed"
            (the block's own inputs, the compressed blocks' outputs).
        device: where the blocks and activations are computed (default: the model's device). Each block is moved
            there for its turn and back after it.
        resume: finished blocks are saved there and, when already there, replayed instead of recomputed (a damaged
            entry is recomputed, with every later block).
        activation_budget_bytes: memory on the compute device for all live activation sets together; beyond it
            a GPU's go to host memory up to ``host_activation_budget_bytes``, then to ``offload_dir`` (default:
            the system temporary directory). None = no limit.
        record_keys: what a replayed record must hold to be trusted.

    Returns:
        One record per block, in order.
    """
    if targets_from not in TARGETS_FROM:
        raise ValueError(f"targets_from must be one of {TARGETS_FROM}, got {targets_from!r}")
    home = model_device(model)
    device = home if device is None else torch.device(device)
    dense_stream = needs_targets and targets_from == "dense"
    new_store = store_factory(activation_budget_bytes, offload_dir, 3 if needs_targets else 2,
                              host_activation_budget_bytes)
    inputs, block_kwargs = capture_calibration_inputs(model, calib_ids, new_store(), device)
    dense_inputs = inputs  # block 0 sees the same inputs on both paths
    targets = None
    records = []
    try:
        for b, block in enumerate(tqdm(decoder_layers(model), desc=desc, disable=not progress)):
            materialize_block(model, b, device)  # a lazily loaded model's block is read from its shards now
            block.to(device)
            kw = block_kwargs[b]
            targets = run_block(block, dense_inputs, kw, new_store()) if needs_targets else None
            # (dense_inputs is inputs unless targets come from the dense model's inputs)
            record = _replay(resume, b, block, device, record_keys)
            if record is None:
                record = step(BlockWork(b, block_prefix(model, b), block, kw, inputs, targets))
                if resume is not None:
                    resume.save(b, block_projections(block), record)
            records.append(record)
            outputs = run_block(block, inputs, kw, new_store())
            if outputs.spilled:
                logger.info("block %d: %d of %d activation windows on disk", b, outputs.spilled, len(outputs))
            block.to(home)
            if dense_inputs is not inputs:
                dense_inputs.close()
            inputs.close()
            trim_heap()  # the block's dense layers and the old activations, back to the system
            if targets is not None and not dense_stream:
                targets.close()
            inputs, dense_inputs = outputs, (targets if dense_stream else outputs)
    finally:
        for store in (inputs, dense_inputs, targets):
            if store is not None:
                store.close()  # spill files removed even when a step fails
    return records


def _replay(resume: ResumeState | None, b: int, block: nn.Module, device: torch.device,
            record_keys: tuple[str, ...]) -> dict | None:
    """Swap block ``b``'s finished layers in from ``resume`` and return its record; None when there is no
    trustworthy entry (a damaged one is discarded, with every later block's, and logged)."""
    if resume is None or not resume.done(b):
        return None
    try:
        layers, record = resume.load(b, device=device)
        missing = set(block_projections(block)) - set(layers)
        if missing or not set(record_keys) <= set(record):
            raise ResumeEntryError(f"{resume.directory}: the entry of block {b} lacks "
                                   f"{sorted(missing) or 'its report'}")
    except ResumeEntryError as exc:
        logger.warning("resume state: %s; computing block %d and the blocks after it again", exc, b)
        resume.discard_from(b)
        return None
    for name, module in layers.items():
        set_submodule(block, name, module)
    logger.info("block %d: finished in an earlier run, replayed from %s", b, resume.directory)
    return record
