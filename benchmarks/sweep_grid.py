"""The sweep's grid (benchmarks/sweep.py): its configurations as named points with their plot family, a short
description of a configuration, and the key that says when two configurations measure the same thing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Dense group quantization (GPTQ at W2 with static qparams, as its preset; W3/W4 re-fitted), round to nearest,
# and the float pruning baselines at their fp16 sparse storage.
DEFAULT_BASELINES = ("w2g64", "w3g64", "w4g64", "rtn-w2g64", "rtn-w3g64", "rtn-w4g64",
                     "2of4-sparsegpt", "2of4-wanda", "s50-sparsegpt", "s50-wanda")
FLOAT_NAMES = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude"}


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep: ``config`` is None for the dense reference."""

    name: str
    family: str
    config: Any  # gqsa.config.CompressConfig | None


@dataclass(frozen=True)
class Grid:
    """The sweep's configurations: GQSA over sparsity x bits x group size, plus named baseline presets.

    Attributes:
        sparsity: fractions of groups pruned, each in [0, 1) (0 is GPTQ with groups).
        bits: code widths (gqsa.config.SUPPORTED_BITS).
        group_size: group sizes (powers of two, 8..256).
        baselines: preset names (gqsa.presets.PRESETS), compressed with the same calibration.
        calib_dataset, calib_samples, calib_seq_len: the calibration of every point.
        bqpo_epochs, e2e_epochs: training after the one-shot step (0: one-shot); BQPO applies to every
            calibrated method, E2E-OQP to method "gqsa" only.
        dense: also measure the uncompressed model as the reference.
    """

    sparsity: tuple[float, ...] = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6)
    bits: tuple[int, ...] = (2, 3, 4)
    group_size: tuple[int, ...] = (16, 32, 64, 128)
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    calib_dataset: str = "wiki"
    calib_samples: int = 32
    calib_seq_len: int = 512
    bqpo_epochs: int = 0
    e2e_epochs: int = 0
    dense: bool = True

    def __post_init__(self) -> None:
        from gqsa.config import SUPPORTED_BITS, QuantSpec
        from gqsa.presets import PRESETS

        for name in ("sparsity", "bits", "group_size", "baselines"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"Grid.{name} lists a value twice: {values}")
        if any(not 0.0 <= s < 1.0 for s in self.sparsity):
            raise ValueError(f"Grid.sparsity values must be in [0, 1), got {self.sparsity}")
        if any(b not in SUPPORTED_BITS for b in self.bits):
            raise ValueError(f"Grid.bits must be among {SUPPORTED_BITS}, got {self.bits}")
        for g in self.group_size:
            QuantSpec(group_size=g)  # raises ValueError naming the rule
        unknown = [b for b in self.baselines if b not in PRESETS]
        if unknown:
            raise ValueError(f"Grid.baselines: unknown preset(s) {unknown}; presets: {sorted(PRESETS)}")
        if self.bqpo_epochs < 0 or self.e2e_epochs < 0:
            raise ValueError("Grid: bqpo_epochs and e2e_epochs must be >= 0")

    def _finish(self, cfg):
        """The point's config with this grid's calibration and training."""
        cfg = cfg.replace(calib=cfg.calib.replace(dataset=self.calib_dataset, samples=self.calib_samples,
                                                  seq_len=self.calib_seq_len),
                          bqpo=cfg.bqpo.replace(epochs=self.bqpo_epochs if cfg.method != "magnitude" else 0),
                          e2e=cfg.e2e.replace(epochs=self.e2e_epochs if cfg.method == "gqsa" else 0))
        return cfg

    def _suffix(self, cfg) -> str:
        return (f"+bqpo{cfg.bqpo.epochs}" if cfg.bqpo.epochs else "") + (f"+e2e{cfg.e2e.epochs}" if cfg.e2e.epochs
                                                                          else "")

    def points(self) -> list[Point]:
        """Every point, dense first, then GQSA by bits, group size and sparsity, then the baselines.

        A baseline whose configuration equals a grid point's (``measurement_key``) is left out: it is measured once,
        under the grid point's name.
        """
        from gqsa.presets import preset

        out = [Point("dense", "dense", None)] if self.dense else []
        seen: set[str] = set()
        for b in self.bits:
            for g in self.group_size:
                for s in self.sparsity:
                    base = preset("w4s50")
                    cfg = self._finish(base.replace(quant=base.quant.replace(bits=b, group_size=g),
                                                    sparsity=base.sparsity.replace(ratio=s)))
                    name = f"w{b}s{round(s * 100)}-g{g}" if s else f"gptq-w{b}g{g}"  # sparsity 0 is GPTQ
                    out.append(Point(name + self._suffix(cfg), family_of(cfg), cfg))
                    seen.add(measurement_key(cfg.to_dict()))
        for name in self.baselines:
            cfg = self._finish(preset(name))
            if measurement_key(cfg.to_dict()) not in seen:
                seen.add(measurement_key(cfg.to_dict()))
                out.append(Point(name + self._suffix(cfg), family_of(cfg), cfg))
        return out


def family_of(cfg) -> str:
    """The plot family of a baseline configuration ("GPTQ W2", "RTN W4", "SparseGPT 2:4", ...)."""
    if cfg is None:
        return "dense"
    sp = cfg.sparsity
    if sp.pattern == "group":
        if cfg.method == "gqsa":
            if sp.ratio == 0:
                return f"GPTQ W{cfg.quant.bits}" + (" static" if cfg.oneshot.static_qparams else "")
            return f"GQSA W{cfg.quant.bits} g{cfg.quant.group_size}"
        return f"RTN W{cfg.quant.bits}" if sp.ratio == 0 else f"magnitude groups W{cfg.quant.bits}"
    return f"{FLOAT_NAMES[cfg.method]} {sp.pattern if sp.pattern != 'unstructured' else f'{sp.ratio:.0%}'}"


def describe(cfg: dict | None) -> str:
    """A short description of a configuration dict: method, format, and what differs from the defaults."""
    if cfg is None:
        return "uncompressed"
    q, sp, one = cfg.get("quant"), cfg["sparsity"], cfg.get("oneshot", {})
    parts = [cfg["method"]]
    if q:
        parts.append(f"W{q['bits']} g{q['group_size']}" + (" sym" if q.get("symmetric") else ""))
    parts.append(f"{sp['ratio']:.0%} " + ("of groups" if sp["pattern"] == "group" else sp["pattern"]))
    if cfg["method"] == "gqsa":
        if one.get("saliency", "obs") != "obs":
            parts.append(one["saliency"])
        if one.get("static_qparams"):
            parts.append("static qparams")
    for stage in ("bqpo", "e2e"):
        if cfg.get(stage, {}).get("epochs"):
            parts.append(f"{stage.upper()} {cfg[stage]['epochs']} ep")
    return ", ".join(parts)


def measurement_key(config: dict | None) -> str:
    """What a measurement depends on: the config normalised (fields added since it was written take their
    defaults), without its version and without the training specs of stages that do not run (epochs 0)."""
    if config is None:
        return "dense"
    from gqsa.config import CompressConfig

    d = CompressConfig.from_dict(config).to_dict()
    d.pop("version")
    for stage in ("bqpo", "e2e"):
        if not d[stage]["epochs"]:
            d.pop(stage)
    return json.dumps(d, sort_keys=True)
