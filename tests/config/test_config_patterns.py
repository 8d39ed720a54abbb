"""Sparsity patterns: group (packed), unstructured and N:M (float) and which methods go with them."""

import re

import pytest

from gqsa.config import CompressConfig, QuantSpec, SparsitySpec
from gqsa.presets import PRESETS


@pytest.mark.parametrize(("pattern", "nm"), [("group", None), ("unstructured", None), ("2:4", (2, 4)),
                                             ("4:8", (4, 8))])
def test_patterns_parse(pattern, nm):
    ratio = 1 - nm[0] / nm[1] if nm else 0.5
    assert SparsitySpec(ratio=ratio, pattern=pattern).nm == nm


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "block"}, "SparsitySpec.pattern"),
        ({"pattern": "4:4"}, "SparsitySpec.pattern"),
        ({"pattern": "0:4"}, "SparsitySpec.pattern"),
        ({"pattern": "a:b"}, "SparsitySpec.pattern"),
        ({"pattern": 24}, "SparsitySpec.pattern"),
        ({"pattern": "2:4", "ratio": 0.4}, "ratio must be 0.5"),
        ({"pattern": "1:4", "ratio": 0.5}, "ratio must be 0.75"),
        ({"pattern": "2:4", "allocation": "model"}, "allocation 'model' does not apply"),
        ({"model_spread": 1.5}, "SparsitySpec.model_spread"),
        ({"model_spread": True}, "SparsitySpec.model_spread"),
    ],
)
def test_bad_sparsity_specs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SparsitySpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "sparsegpt"}, "for group sparsity use method 'gqsa'"),
        ({"method": "wanda"}, "for group sparsity use method 'gqsa'"),
        ({"method": "gqsa", "quant": None}, "needs a QuantSpec"),
        ({"method": "gqsa", "quant": None, "sparsity": SparsitySpec(pattern="unstructured")},
         "method 'gqsa' prunes whole groups"),
        ({"method": "sparsegpt", "sparsity": SparsitySpec(pattern="unstructured")}, "quant must be None"),
        ({"method": "wanda", "quant": None, "sparsity": SparsitySpec(pattern="unstructured", allocation="model")},
         "does not support allocation 'model'"),
    ],
)
def test_method_and_pattern_must_agree(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CompressConfig(**kwargs)


def test_float_config_round_trips_with_null_quant():
    cfg = PRESETS["2of4-sparsegpt"]
    assert cfg.quant is None and cfg.sparsity.nm == (2, 4)
    back = CompressConfig.from_json(cfg.to_json())
    assert back == cfg and back.to_dict()["quant"] is None


def test_old_config_files_without_pattern_still_load():
    cfg = CompressConfig.from_dict({"method": "gqsa", "sparsity": {"ratio": 0.3, "allocation": "row"}})
    assert cfg.sparsity.pattern == "group" and cfg.quant == QuantSpec()


def test_the_issue_presets_exist():
    for name in ["w4s20", "w4s30", "w4s40", "w4s50", "w4s60", "w2g64", "w2g128", "w3g128", "w4g128",
                 "2of4-sparsegpt", "2of4-wanda", "s50-sparsegpt", "s50-wanda"]:
        assert name in PRESETS
    assert PRESETS["s50-wanda"].sparsity.allocation == "row"  # Wanda compares weights per output row


def test_gqsa_presets_train_and_baselines_stay_one_shot():
    from gqsa.presets import FAST_CALIB, fast

    for r in (20, 30, 40, 50, 60):
        cfg = PRESETS[f"w4s{r}"]
        assert cfg.bqpo.epochs > 0 and cfg.e2e.epochs > 0 and cfg.sparsity.ratio == r / 100
    for name in ("w2g64", "w4g128", "rtn-w4g64", "2of4-sparsegpt", "s50-wanda", "magnitude-w4s50"):
        assert PRESETS[name].bqpo.epochs == 0 and PRESETS[name].e2e.epochs == 0, name
    for name, cfg in PRESETS.items():
        f = fast(cfg)
        assert f.calib.samples <= FAST_CALIB.samples and f.calib.seq_len <= FAST_CALIB.seq_len, name
        assert f.bqpo.epochs == min(cfg.bqpo.epochs, 1) and f.e2e.epochs == 0, name
        assert (f.method, f.quant, f.sparsity, f.oneshot) == (cfg.method, cfg.quant, cfg.sparsity, cfg.oneshot)
