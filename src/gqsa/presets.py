"""Named compression settings (presets), their ``--fast`` variant, and the one place where a preset and the
overrides a user gives (command-line flags, keyword arguments of ``gqsa.compress.run``) become a CompressConfig.

    cfg = resolve_config("w4s50", fast=True, bits=3, calib_samples=64)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from gqsa.config import (
    BQPOSpec,
    CalibSpec,
    CompressConfig,
    E2ESpec,
    OneShotSpec,
    QuantSpec,
    SparsitySpec,
    parse_nm,
)


def _preset(method: str, bits: int, group_size: int, ratio: float) -> CompressConfig:
    return CompressConfig(
        method=method, quant=QuantSpec(bits=bits, group_size=group_size), sparsity=SparsitySpec(ratio=ratio)
    )


# The paper's GQSA points train after the one-shot step. Calibration and training sized so that SmolLM2-135M
# compresses end to end on 2 CPU cores in well under an hour of CPU time (docs/RESULTS.md, "Training: BQPO and
# E2E-OQP", gives the times); on a GPU raise --calib-samples / --seq-len / --bqpo-epochs for more accuracy.
TRAINED_CALIB = CalibSpec(samples=32, seq_len=512)
TRAINED_BQPO = BQPOSpec(epochs=2)
# 3 E2E-OQP epochs beat 1 on W4S50's held-out perplexity (docs/RESULTS.md, "Training: BQPO and E2E-OQP")
TRAINED_E2E = E2ESpec(epochs=3)


def _trained_preset(bits: int, group_size: int, ratio: float) -> CompressConfig:
    return _preset("gqsa", bits, group_size, ratio).replace(calib=TRAINED_CALIB, bqpo=TRAINED_BQPO, e2e=TRAINED_E2E)


# ``fast``: the cheap variant of any preset (``gqsa compress --fast``, ``make demo``): 32 windows of 512 tokens,
# one BQPO epoch where the preset trains, no E2E-OQP (its time on SmolLM2-135M: docs/RESULTS.md, "Training: BQPO
# and E2E-OQP").
FAST_CALIB = CalibSpec(samples=32, seq_len=512)


def fast(cfg: CompressConfig) -> CompressConfig:
    """The ``--fast`` variant of ``cfg``: smaller calibration, at most one BQPO epoch (mask fixed), no E2E-OQP."""
    calib = cfg.calib.replace(samples=min(cfg.calib.samples, FAST_CALIB.samples),
                              seq_len=min(cfg.calib.seq_len, FAST_CALIB.seq_len))
    bqpo = cfg.bqpo.replace(epochs=min(cfg.bqpo.epochs, 1), mask_updates=0)
    return cfg.replace(calib=calib, bqpo=bqpo, e2e=E2ESpec())


def _float_sparse_preset(method: str, pattern: str, allocation: str) -> CompressConfig:
    return CompressConfig(
        method=method, quant=None, sparsity=SparsitySpec(ratio=0.5, pattern=pattern, allocation=allocation)
    )


_DENSE_QUANT = ((2, 64), (2, 128), (3, 64), (3, 128), (4, 64), (4, 128))

# Named settings: the paper's GQSA points (W4, group 16, S20..S60, calibrated, then BQPO and E2E-OQP); dense
# GPTQ-style baselines (method "gqsa" at sparsity 0 is GPTQ with groups); data-free round-to-nearest ("rtn-") and
# magnitude ones;
# float pruning baselines at 2:4 and 50% unstructured (SparseGPT per column block over the whole matrix as in
# its paper, Wanda per output row as in its paper, magnitude per matrix).
PRESETS: dict[str, CompressConfig] = {
    **{f"w4s{r}": _trained_preset(4, 16, r / 100) for r in (20, 30, 40, 50, 60)},
    # The best GQSA point found at about 3.2 bits per weight on SmolLM2-135M (make demo's preset): W3, group 64,
    # 10% of groups pruned; with --fast far below w4s50's perplexity at about the same bits (README's table).
    "w3s10-g64": _trained_preset(3, 64, 0.1),
    **{f"magnitude-w4s{r}": _preset("magnitude", 4, 16, r / 100) for r in (20, 30, 40, 50, 60)},
    **{f"w{b}g{g}": _preset("gqsa", b, g, 0.0) for b, g in _DENSE_QUANT if b != 2},
    # At 2 bits, qparams fitted on the compensated weights drift (SmolLM2-135M's perplexity is several times that
    # with static ones: docs/RESULTS.md, rows gptq-w2g64*); at 3-4 bits GPTQ's usual re-fitting is kept.
    **{f"w2g{g}": _preset("gqsa", 2, g, 0.0).replace(oneshot=OneShotSpec(static_qparams=True)) for g in (64, 128)},
    **{f"rtn-w{b}g{g}": _preset("magnitude", b, g, 0.0) for b, g in _DENSE_QUANT},
    "2of4-sparsegpt": _float_sparse_preset("sparsegpt", "2:4", "matrix"),
    "2of4-wanda": _float_sparse_preset("wanda", "2:4", "row"),
    "2of4-magnitude": _float_sparse_preset("magnitude", "2:4", "row"),
    "s50-sparsegpt": _float_sparse_preset("sparsegpt", "unstructured", "matrix"),
    "s50-wanda": _float_sparse_preset("wanda", "unstructured", "row"),
    "s50-magnitude": _float_sparse_preset("magnitude", "unstructured", "matrix"),
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


@dataclass(frozen=True)
class Overrides:
    """What a user may change in a preset; None keeps the preset's value. ``sparsity`` is the ratio (an N:M
    ``pattern`` without it fixes the ratio at 1 - N/M); ``symmetric`` and ``e2e_zero_point`` only switch on."""

    method: str | None = None
    bits: int | None = None
    group_size: int | None = None
    sparsity: float | None = None
    allocation: str | None = None
    pattern: str | None = None
    symmetric: bool | None = None
    qparams: str | None = None
    saliency: str | None = None
    damp: float | None = None
    calib_dataset: str | None = None
    calib_samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    bqpo_epochs: int | None = None
    bqpo_lr_weight: float | None = None
    bqpo_lr_qparams: float | None = None
    bqpo_mask_updates: int | None = None
    bqpo_targets: str | None = None
    train_dtype: str | None = None
    e2e_epochs: int | None = None
    e2e_lr: float | None = None
    e2e_zero_point: bool | None = None
    e2e_distill: float | None = None
    e2e_distill_top_k: int | None = None
    target_bpw: float | None = None
    search_bits: tuple | None = None
    search_group_sizes: tuple | None = None
    search_ratios: tuple | None = None
    search_per_layer: bool | None = None


OVERRIDES = tuple(f.name for f in fields(Overrides))


def _override(spec, **values):
    """``spec`` with the values given (not None) replaced, validated again."""
    return spec.replace(**{k: v for k, v in values.items() if v is not None})


def resolve_config(name: str = "w4s50", fast_variant: bool = False, **overrides) -> CompressConfig:
    """The CompressConfig of preset ``name`` (its ``fast`` variant when asked), with ``overrides`` applied.

    Args:
        name: a preset (``PRESETS``).
        fast_variant: take the preset's cheap variant first (``fast``); overrides still apply after it.
        overrides: fields of ``Overrides``; None keeps the preset's value.

    Training that a preset brings is dropped for the methods that do not support it (BQPO for magnitude, E2E-OQP
    for every method but gqsa) unless the overrides ask for it.

    Raises:
        ValueError: an unknown preset or override name, an override that does not apply (quantization flags with a
            float pattern), or a value the config's validation refuses.
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; known: {list(OVERRIDES)}")
    o = Overrides(**overrides)
    cfg = preset(name)
    if fast_variant:
        cfg = fast(cfg)
    ratio = o.sparsity
    nm = parse_nm(o.pattern)
    if nm is not None and ratio is None:
        ratio = 1 - nm[0] / nm[1]  # an N:M pattern fixes the ratio
    sparsity = _override(cfg.sparsity, ratio=ratio, allocation=o.allocation, pattern=o.pattern)
    quant_values = {"bits": o.bits, "group_size": o.group_size, "qparams": o.qparams,
                    "symmetric": True if o.symmetric else None}
    if sparsity.pattern == "group":
        quant = _override(cfg.quant or QuantSpec(), bits=o.bits, group_size=o.group_size, qparam_method=o.qparams,
                          symmetric=quant_values["symmetric"])
    else:
        given = [f"{k} (--{k.replace('_', '-')})" for k, v in quant_values.items() if v is not None]
        if given:
            raise ValueError(f"pattern {sparsity.pattern!r} leaves the kept weights in float; {', '.join(given)} "
                             "do(es) not apply")
        quant = None
    method = o.method or cfg.method
    bqpo, e2e = cfg.bqpo, cfg.e2e
    if method == "magnitude" and o.bqpo_epochs is None:
        bqpo = bqpo.replace(epochs=0)
    if method != "gqsa" and o.e2e_epochs is None:
        e2e = e2e.replace(epochs=0)
    if o.target_bpw is not None and not o.target_bpw > 0:
        raise ValueError(f"target_bpw (--target-bpw) must be a positive number of bits per weight (leave it out for "
                         f"no search), got {o.target_bpw}")
    search_given = [f"{k} (--{k.replace('_', '-').replace('per-layer', 'uniform')})" for k in
                    ("search_bits", "search_group_sizes", "search_ratios", "search_per_layer")
                    if getattr(o, k) is not None]
    if search_given and not (o.target_bpw or cfg.search.target_bpw):
        raise ValueError(f"{', '.join(search_given)} choose(s) the formats of target_bpw's search; without "
                         "target_bpw (--target-bpw) there is no search")
    mask_updates = o.bqpo_mask_updates
    if mask_updates is None and ((o.bqpo_epochs if o.bqpo_epochs is not None else bqpo.epochs) < 2
                                 or method != "gqsa"):
        mask_updates = 0  # the preset's mask updates need 2 epochs of GQSA layers; dropped when they are not there
    return cfg.replace(
        method=method,
        quant=quant,
        sparsity=sparsity,
        calib=_override(cfg.calib, dataset=o.calib_dataset, samples=o.calib_samples, seq_len=o.seq_len,
                        seed=o.seed),
        oneshot=_override(cfg.oneshot, saliency=o.saliency, damp=o.damp),
        bqpo=_override(bqpo, epochs=o.bqpo_epochs, lr_weight=o.bqpo_lr_weight, lr_qparams=o.bqpo_lr_qparams,
                       mask_updates=mask_updates, targets=o.bqpo_targets, train_dtype=o.train_dtype),
        search=_override(cfg.search, target_bpw=o.target_bpw, bits=o.search_bits, group_sizes=o.search_group_sizes,
                         ratios=o.search_ratios, per_layer=o.search_per_layer),
        e2e=_override(e2e, epochs=o.e2e_epochs, lr=o.e2e_lr, train_zero_point=True if o.e2e_zero_point else None,
                      distill=o.e2e_distill, distill_top_k=o.e2e_distill_top_k, train_dtype=o.train_dtype),
    )
