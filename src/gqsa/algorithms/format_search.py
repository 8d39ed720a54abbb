"""``--target-bpw``: each layer's bits, group size and sparsity chosen for a storage budget from an end-to-end signal.

    plan = search_formats(model, calib_ids, config)   # config.search.target_bpw > 0
    config = config.replace(layer_formats=plan.layer_formats)

1. **Signal.** The Fisher information of the dense model's next-token distribution, diagonal, per weight:
   F = E[g * g] with g the gradient of ``-log p(y | context)`` for labels y *sampled from the dense model* (so
   F is the Hessian of the KL divergence from the dense model at the dense weights, and cross terms between
   positions vanish in expectation). One backward pass per calibration window.
2. **Cost of a candidate.** For layer l in format f (kept groups by Fisher-weighted energy sum(F * w**2), round
   to nearest): the KL rise is estimated as ``0.5 * sum(F * (w - q_f(w))**2)`` (second order, diagonal), and
   its storage is exact (``packed_bits``).
3. **Choice.** Minimise the summed estimate within ``target_bpw * weights`` bits: a Lagrangian sweep (each layer
   takes ``argmin cost + lam * bits``; ``lam`` bisected to the smallest that fits), then the bits left over go
   to the upgrades with the best cost saved per bit. The same estimate ranks the uniform formats that fit.
4. **Check.** The per-layer choice and the ``verify`` best uniform formats are measured for real: every layer
   rounded to nearest in its format, next-token loss on the held-out calibration windows; the lowest wins.

Rounding to nearest stands in for the method that compresses afterwards (GPTQ-style one-shot and training
lower every format's error), so the search ranks formats rather than predicting final perplexity.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from gqsa.config import CompressConfig, LayerFormat
from gqsa.format.packed_weight import PackedWeight
from gqsa.models.adapter import compressible_linears
from gqsa.quant.groups import from_groups, to_groups
from gqsa.quant.masks import groups_to_prune, select_groups
from gqsa.quant.qparams import group_qparams, round_scale_fp16
from gqsa.quant.quantize import dequantize, quantize

logger = logging.getLogger(__name__)


def kept_groups(out_features: int, num_groups: int, ratio: float, allocation: str) -> int:
    """Groups a layer keeps at ``ratio`` under ``allocation`` ("row": the same count in every row)."""
    if allocation == "row":
        return out_features * (num_groups - groups_to_prune(num_groups, ratio))
    total = out_features * num_groups
    return total - groups_to_prune(total, ratio)


def packed_bits(out_features: int, in_features: int, fmt: LayerFormat, allocation: str = "row",
                symmetric: bool = False) -> int:
    """Stored bits of an (out, in) layer packed in ``fmt``: row pointers, column indices, codes, fp16 scales and
    zero points, from the format's own tensor shapes (``PackedWeight.expected_shapes``)."""
    nnz = kept_groups(out_features, in_features // fmt.group_size, fmt.ratio, allocation)
    meta = {"out_features": out_features, "in_features": in_features, "group_size": fmt.group_size,
            "bits": fmt.bits, "symmetric": symmetric, "nnz": nnz}
    return 8 * sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                   for shape, dtype in PackedWeight.expected_shapes(meta).values())


def candidate_formats(config: CompressConfig) -> list[LayerFormat]:
    """Every (bits, group size, ratio) of ``config.search``, in a fixed order."""
    s = config.search
    return [LayerFormat(bits=b, group_size=g, ratio=float(r))
            for b in sorted(set(s.bits)) for g in sorted(set(s.group_sizes)) for r in sorted(set(s.ratios))]


def rounded_weight(weight: torch.Tensor, fisher: torch.Tensor, fmt: LayerFormat, config: CompressConfig
                   ) -> torch.Tensor:
    """(N, K) ``weight`` in ``fmt``: the groups of least Fisher-weighted energy pruned, the rest rounded to
    nearest (scales rounded to fp16 as stored)."""
    q = config.quant
    w = to_groups(weight.float(), fmt.group_size)  # (N, G, g)
    mask = select_groups((to_groups(fisher.float(), fmt.group_size) * w * w).sum(-1), fmt.ratio,
                         config.sparsity.allocation)  # (N, G)
    scale, zero = group_qparams(w, fmt.bits, q.symmetric, q.qparam_method)
    scale = round_scale_fp16(scale)
    deq = dequantize(quantize(w, scale, zero, fmt.bits), scale, zero) * mask.unsqueeze(-1)
    return from_groups(deq)


def fisher_diagonal(model: nn.Module, windows: torch.Tensor, names: list[str], seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of the model's next-token distribution for the weights of ``names``, per
    predicted token: the mean over windows of the squared gradient of the summed ``-log p(y | context)``, with
    every y drawn from the model's own distribution at that position, divided by the tokens per window.

    Args:
        windows: (n, L) token ids.

    Returns:
        layer name -> (N, K) float32, on the layer's device.
    """
    linears = compressible_linears(model)
    params = {n: linears[n].weight for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator().manual_seed(seed)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for ids in windows:
            ids = ids.unsqueeze(0).to(device)  # (1, L)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (L - 1, V)
            with torch.no_grad():
                probs = torch.softmax(logits, dim=-1).cpu()
                labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)  # (L - 1,)
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, g in zip(params, grads):
                fisher[n].add_(g.float().square())
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    scale = 1.0 / (windows.shape[0] * (windows.shape[1] - 1))
    return {n: f.mul_(scale) for n, f in fisher.items()}


@dataclass
class FormatPlan:
    """The search's outcome: each layer's format and what was measured to choose it (``as_report``)."""

    layer_formats: dict[str, LayerFormat]
    choice: str  # "per-layer" or a uniform format's label
    bits_per_weight: float
    candidates: list[dict] = field(default_factory=list)  # measured: label, bits_per_weight, estimate, loss
    dense_loss: float = math.nan
    times_s: dict[str, float] = field(default_factory=dict)

    def as_report(self) -> dict:
        mix: dict[str, int] = {}
        for f in self.layer_formats.values():
            mix[f.label] = mix.get(f.label, 0) + 1
        return {"choice": self.choice, "bits_per_weight": self.bits_per_weight, "formats": dict(sorted(mix.items())),
                "dense_heldout_loss": self.dense_loss, "measured": self.candidates, "time_s": self.times_s}


def choose_per_layer(costs: dict[str, list[tuple[float, int]]], budget_bits: float) -> dict[str, int]:
    """Index of each layer's option minimising the summed cost within ``budget_bits``.

    Args:
        costs: layer -> options as (cost, bits).

    Returns:
        layer -> index into its options.

    Raises:
        ValueError: even the smallest option of every layer exceeds the budget.
    """
    def pick(lam: float) -> dict[str, int]:
        return {n: min(range(len(o)), key=lambda i: (o[i][0] + lam * o[i][1], o[i][1])) for n, o in costs.items()}

    def total(choice: dict[str, int]) -> int:
        return sum(costs[n][i][1] for n, i in choice.items())

    smallest = sum(min(b for _, b in o) for o in costs.values())
    if smallest > budget_bits:
        raise ValueError(f"the smallest candidate formats need {smallest} bits, more than the budget of "
                         f"{budget_bits:.0f}")
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget_bits:
        hi *= 4.0
        if hi > 1e30:  # only ties of equal cost remain: the smallest option of every layer fits
            return {n: min(range(len(o)), key=lambda i: (o[i][1], o[i][0])) for n, o in costs.items()}
    if total(pick(lo)) <= budget_bits:
        return pick(lo)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(pick(mid)) <= budget_bits else (mid, hi)
    choice = pick(hi)
    spare = budget_bits - total(choice)
    while True:  # spend what is left on the upgrades that save the most cost per bit
        best, gain = None, 0.0
        for n, i in choice.items():
            for j, (c, b) in enumerate(costs[n]):
                extra = b - costs[n][i][1]
                if 0 < extra <= spare and costs[n][i][0] - c > 0 and (costs[n][i][0] - c) / extra > gain:
                    best, gain = (n, j), (costs[n][i][0] - c) / extra
        if best is None:
            return choice
        spare -= costs[best[0]][best[1]][1] - costs[best[0]][choice[best[0]]][1]
        choice[best[0]] = best[1]


def _heldout_loss(model: nn.Module, windows: torch.Tensor) -> float:
    from gqsa.eval.perplexity import perplexity

    return perplexity(model, windows.to(next(model.parameters()).device), progress=False).nll


def _measure(model: nn.Module, linears: dict[str, nn.Linear], formats: dict[str, LayerFormat],
             fisher: dict[str, torch.Tensor], config: CompressConfig, windows: torch.Tensor) -> float:
    """Held-out loss with every layer rounded to nearest in its format; the weights are restored after."""
    saved = {n: m.weight.detach().clone() for n, m in linears.items()}
    try:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(rounded_weight(saved[n], fisher[n], formats[n], config).to(m.weight.dtype))
        return _heldout_loss(model, windows)
    finally:
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(saved[n])


def split_windows(calib_ids: torch.Tensor, fisher_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Fisher windows, held-out windows) of the calibration set: the last quarter (at most 4, at least 1) is
    held out; with a single window it serves both."""
    n = calib_ids.shape[0]
    held = max(1, min(4, n // 4)) if n > 1 else 0
    fit = calib_ids[: max(1, n - held)][:fisher_windows]
    return fit, (calib_ids[n - held:] if held else calib_ids)


def search_formats(model: nn.Module, calib_ids: torch.Tensor, config: CompressConfig, progress: bool = True
                   ) -> FormatPlan:
    """Each compressed layer's format for ``config.search.target_bpw`` (module docstring).

    Raises:
        ValueError: no candidate fits a layer, or the budget is below the smallest candidates' storage.
    """
    from tqdm.auto import tqdm

    spec = config.search
    t0 = time.perf_counter()
    linears = compressible_linears(model)
    names = list(linears)
    fit_ids, held_ids = split_windows(calib_ids, spec.windows)
    fisher = fisher_diagonal(model, fit_ids, names, seed=config.calib.seed)
    t1 = time.perf_counter()
    formats = candidate_formats(config)
    options: dict[str, list[LayerFormat]] = {}
    costs: dict[str, list[tuple[float, int]]] = {}
    weights = 0
    for n in tqdm(names, desc="format search: candidates", disable=not progress):
        m = linears[n]
        w = m.weight.detach()
        weights += w.numel()
        options[n], seen = [], set()
        for f in formats:  # the formats that fit, each stored layout once (a ratio may prune no group of a row)
            if m.in_features % f.group_size == 0:
                key = (f.bits, f.group_size, kept_groups(m.out_features, m.in_features // f.group_size, f.ratio,
                                                         config.sparsity.allocation))
                if key not in seen:
                    seen.add(key)
                    options[n].append(f)
        if not options[n]:
            raise ValueError(f"{n}: none of the candidate group sizes {sorted(set(spec.group_sizes))} divides its "
                             f"in_features {m.in_features}")
        costs[n] = [(0.5 * float((fisher[n] * (w.float() - rounded_weight(w, fisher[n], f, config)).square()).sum()),
                     packed_bits(m.out_features, m.in_features, f, config.sparsity.allocation, config.quant.symmetric))
                    for f in options[n]]
    budget = spec.target_bpw * weights
    t2 = time.perf_counter()
    plans: list[tuple[str, dict[str, LayerFormat], float]] = []  # (label, formats, estimate)
    if spec.per_layer:
        pick = choose_per_layer(costs, budget)
        plans.append(("per-layer", {n: options[n][i] for n, i in pick.items()},
                      sum(costs[n][i][0] for n, i in pick.items())))
    uniform = []
    for f in formats:
        if all(f in options[n] for n in names):
            idx = {n: options[n].index(f) for n in names}
            if sum(costs[n][idx[n]][1] for n in names) <= budget:
                uniform.append((f.label, {n: f for n in names}, sum(costs[n][idx[n]][0] for n in names)))
    uniform.sort(key=lambda p: p[2])
    plans += uniform[: max(spec.verify, 0 if spec.per_layer else 1)]
    if not plans:
        raise ValueError(f"no uniform candidate format fits {spec.target_bpw} bits per weight; allow per-layer "
                         "formats or add smaller candidates")

    def bpw(formats_: dict[str, LayerFormat]) -> float:
        return sum(costs[n][options[n].index(f)][1] for n, f in formats_.items()) / weights

    measured = []
    dense = _heldout_loss(model, held_ids) if len(plans) > 1 else math.nan
    for label, plan, estimate in tqdm(plans, desc="format search: checking", disable=not progress):
        loss = _measure(model, linears, plan, fisher, config, held_ids) if len(plans) > 1 else math.nan
        measured.append({"label": label, "bits_per_weight": bpw(plan), "estimated_kl": estimate,
                         "heldout_loss": loss})
        logger.info("format search: %s at %.3f bits per weight, estimated KL %.4f, held-out loss %.4f", label,
                    bpw(plan), estimate, loss)
    def rank(i: int) -> tuple[float, int]:
        loss = measured[i]["heldout_loss"]
        return (loss if math.isfinite(loss) else math.inf, i)

    best = min(range(len(plans)), key=rank) if len(plans) > 1 else 0
    t3 = time.perf_counter()
    return FormatPlan(layer_formats=plans[best][1], choice=plans[best][0], bits_per_weight=bpw(plans[best][1]),
                      candidates=measured, dense_loss=dense,
                      times_s={"fisher": t1 - t0, "candidates": t2 - t1, "checks": t3 - t2, "total": t3 - t0})
