"""The training loop shared by BQPO and E2E-OQP: AdamW, cosine schedule, gradient clipping, gradient
accumulation over windows, early stopping on held-out windows with the best state restored."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def train_window_count(n_windows: int, val_windows: int) -> int:
    """Windows ``fit`` trains on: all but the last ``val_windows``, when at least one is left to train on."""
    return n_windows - (val_windows if val_windows < n_windows else 0)


def autocast_dtype(train_dtype: str) -> torch.dtype | None:
    """``fit``'s ``autocast`` for a spec's ``train_dtype`` name: None for float32 (no autocast)."""
    return None if train_dtype == "float32" else getattr(torch, train_dtype)


def fit(
    param_groups: list[dict],
    window_loss: Callable[[int], torch.Tensor],
    n_windows: int,
    epochs: int,
    batch_size: int,
    grad_clip: float,
    val_windows: int,
    patience: int,
    seed: int,
    label: str = "training",
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
    state: list[torch.Tensor] = (),
    autocast: torch.dtype | None = None,
) -> dict:
    """Minimise the mean of ``window_loss(i)`` over training windows.

    Args:
        param_groups: AdamW parameter groups ({"params": [...], "lr": ..., "weight_decay": ...}); only these
            parameters get gradients (the caller sets ``requires_grad``).
        window_loss: loss of window i (a differentiable scalar).
        n_windows: windows 0..n-1; the last ``val_windows`` are held out when at least one is left to train on.
        epochs, batch_size (windows per optimizer step), grad_clip (0 = none), patience (epochs without a lower
        held-out loss before stopping), seed (window order).
        label, progress: a progress bar of optimizer steps named ``label``.
        on_step: called with the number of optimizer steps taken, after each step.
        state: tensors that change outside the optimizer (e.g. masks ``on_step`` chooses again): saved and
            restored with the parameters.
        autocast: compute every loss (training and held-out) under ``torch.autocast`` to this dtype (e.g.
            bfloat16) on the parameters' device; the parameters and the optimizer state stay in their own dtype.

    Returns:
        {"loss_before", "loss_after" (held-out, or training windows if none held out), "epochs_run", "steps"}.
        The parameters end at the state with the lowest held-out loss, the starting point included.
    """
    params = [p for g in param_groups for p in g["params"]]
    n_train = train_window_count(n_windows, val_windows)
    train_idx = torch.arange(n_train)
    val_idx = list(range(n_train, n_windows)) or train_idx.tolist()
    total = max(1, epochs * math.ceil(len(train_idx) / batch_size))
    opt = torch.optim.AdamW(param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    gen = torch.Generator().manual_seed(seed)
    if autocast is not None:
        plain_loss = window_loss
        device_type = params[0].device.type

        def window_loss(i: int) -> torch.Tensor:
            with torch.autocast(device_type, dtype=autocast):
                return plain_loss(i).float()

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(window_loss(i)) for i in val_idx) / len(val_idx)

    kept = params + list(state)
    before = best = held_out()
    best_state = [t.detach().clone() for t in kept]
    bad = epochs_run = steps = 0
    bar = tqdm(total=total, desc=label, unit="step", disable=not progress)
    try:
        for _ in range(epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=gen)].tolist()
            train_loss = 0.0
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    for i in batch:
                        loss = window_loss(i)
                        (loss / len(batch)).backward()
                        train_loss += float(loss.detach()) / len(order)
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                sched.step()
                steps += 1
                bar.update()
                if on_step is not None:
                    on_step(steps)
            epochs_run += 1
            loss = held_out()
            bar.set_postfix(held_out=f"{loss:.4g}", start=f"{before:.4g}")
            logger.debug("%s epoch %d: train loss %.4g, held-out loss %.4g (start %.4g)", label, epochs_run,
                         train_loss, loss, before)
            if loss < best:
                best, bad = loss, 0
                best_state = [t.detach().clone() for t in kept]
            else:
                bad += 1
                if bad >= patience:
                    break
    finally:
        bar.close()
        with torch.no_grad():
            for t, saved in zip(kept, best_state):
                t.copy_(saved)
    return {"loss_before": before, "loss_after": best, "epochs_run": epochs_run, "steps": steps}
