"""Configs: defaults are valid, every invalid value names its field, JSON and file round trips are exact."""

import dataclasses
import json
import math
import re

import pytest

from gqsa.config import (
    CONFIG_VERSION,
    CalibSpec,
    CompressConfig,
    FormatSearchSpec,
    LayerFormat,
    QuantSpec,
    SparsitySpec,
)


def _non_default() -> CompressConfig:
    return CompressConfig(
        method="magnitude",
        quant=QuantSpec(bits=3, group_size=64, symmetric=True, qparam_method="mse"),
        sparsity=SparsitySpec(ratio=0.375, allocation="matrix"),
        calib=CalibSpec(dataset="c4", samples=7, seq_len=333, seed=-5),
        search=FormatSearchSpec(target_bpw=3.25, group_sizes=(64,)),
        layer_formats={"model.layers.0.mlp.up_proj": LayerFormat(bits=2, group_size=32, ratio=0.25)},
    )


# ---- defaults -----------------------------------------------------------------------------------------


def test_defaults_are_valid_and_documented():
    cfg = CompressConfig()
    assert cfg.method == "gqsa"
    assert cfg.version == CONFIG_VERSION
    assert cfg.quant == QuantSpec(bits=4, group_size=16, symmetric=False, qparam_method="minmax")
    assert cfg.sparsity == SparsitySpec(ratio=0.5, allocation="row")
    assert cfg.calib == CalibSpec(dataset="wiki", samples=128, seq_len=2048, seed=0)
    assert cfg.quant.qmax == 15


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_supported_bits_is_valid(bits):
    assert QuantSpec(bits=bits).qmax == 2**bits - 1


@pytest.mark.parametrize("group_size", [8, 16, 32, 64, 128, 256])
def test_every_power_of_two_group_size_is_valid(group_size):
    assert QuantSpec(group_size=group_size).group_size == group_size


@pytest.mark.parametrize("ratio", [0, 0.0, 0.5, 0.999])
def test_ratio_in_range_is_valid_and_stored_as_float(ratio):
    spec = SparsitySpec(ratio=ratio)
    assert spec.ratio == ratio
    assert type(spec.ratio) is float


@pytest.mark.parametrize("allocation", ["row", "matrix", "model"])
def test_every_allocation_is_valid(allocation):
    assert SparsitySpec(allocation=allocation).allocation == allocation


# ---- invalid values name their field ------------------------------------------------------------------

INVALID = [
    (QuantSpec, {"bits": 5}, "QuantSpec.bits"),
    (QuantSpec, {"bits": 1}, "QuantSpec.bits"),
    (QuantSpec, {"bits": 16}, "QuantSpec.bits"),
    (QuantSpec, {"bits": "4"}, "QuantSpec.bits"),
    (QuantSpec, {"bits": 4.0}, "QuantSpec.bits"),  # would pass `in SUPPORTED_BITS`, then break qmax
    (QuantSpec, {"bits": True}, "QuantSpec.bits"),
    (QuantSpec, {"group_size": 12}, "QuantSpec.group_size"),
    (QuantSpec, {"group_size": 4}, "QuantSpec.group_size"),
    (QuantSpec, {"group_size": 512}, "QuantSpec.group_size"),
    (QuantSpec, {"group_size": 0}, "QuantSpec.group_size"),
    (QuantSpec, {"group_size": -16}, "QuantSpec.group_size"),
    (QuantSpec, {"group_size": 16.0}, "QuantSpec.group_size"),
    (QuantSpec, {"group_size": "16"}, "QuantSpec.group_size"),
    (QuantSpec, {"group_size": True}, "QuantSpec.group_size"),
    (QuantSpec, {"symmetric": 1}, "QuantSpec.symmetric"),
    (QuantSpec, {"symmetric": "yes"}, "QuantSpec.symmetric"),
    (QuantSpec, {"qparam_method": "gptq"}, "QuantSpec.qparam_method"),
    (SparsitySpec, {"ratio": -0.1}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": 1.0}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": 1}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": 1.5}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": math.nan}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": math.inf}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": True}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": False}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": "0.5"}, "SparsitySpec.ratio"),
    (SparsitySpec, {"ratio": None}, "SparsitySpec.ratio"),
    (SparsitySpec, {"allocation": "column"}, "SparsitySpec.allocation"),
    (SparsitySpec, {"allocation": "ROW"}, "SparsitySpec.allocation"),
    (CalibSpec, {"dataset": ""}, "CalibSpec.dataset"),
    (CalibSpec, {"dataset": 3}, "CalibSpec.dataset"),
    (CalibSpec, {"samples": 0}, "CalibSpec.samples"),
    (CalibSpec, {"samples": True}, "CalibSpec.samples"),
    (CalibSpec, {"samples": 2.0}, "CalibSpec.samples"),
    (CalibSpec, {"seq_len": -1}, "CalibSpec.seq_len"),
    (CalibSpec, {"seed": 1.5}, "CalibSpec.seed"),
    (CalibSpec, {"seed": False}, "CalibSpec.seed"),
    (CompressConfig, {"method": "gptq"}, "CompressConfig.method"),
    (CompressConfig, {"version": CONFIG_VERSION + 1}, "CompressConfig.version"),
    (CompressConfig, {"version": 0}, "CompressConfig.version"),
    (CompressConfig, {"quant": {"bits": 4}}, "CompressConfig.quant"),
    (CompressConfig, {"sparsity": None}, "CompressConfig.sparsity"),
    (CompressConfig, {"calib": QuantSpec()}, "CompressConfig.calib"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"), INVALID, ids=[f"{c.__name__}.{k}={v!r}" for c, kw, _ in INVALID for k, v in kw.items()]
)
def test_invalid_value_raises_value_error_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        cls(**kwargs)


def test_replace_validates_again():
    with pytest.raises(ValueError, match=re.escape("QuantSpec.bits")):
        QuantSpec().replace(bits=5)
    assert QuantSpec().replace(bits=2) == QuantSpec(bits=2)


def test_check_in_features():
    spec = QuantSpec(group_size=64)
    spec.check_in_features(128)
    spec.check_in_features(64 * 11)
    with pytest.raises(ValueError) as exc:
        spec.check_in_features(96, layer="model.layers.0.mlp.down_proj")
    msg = str(exc.value)
    assert "model.layers.0.mlp.down_proj" in msg
    assert "group_size 64" in msg
    assert "in_features 96" in msg


# ---- frozen -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "field", "value"),
    [
        (QuantSpec(), "bits", 3),
        (SparsitySpec(), "ratio", 0.1),
        (CalibSpec(), "samples", 1),
        (CompressConfig(), "method", "magnitude"),
        (CompressConfig(), "quant", QuantSpec(bits=2)),
    ],
)
def test_configs_are_frozen(obj, field, value):
    before = getattr(obj, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, value)
    assert getattr(obj, field) == before


def test_configs_are_hashable_and_compare_by_value():
    assert hash(_non_default()) == hash(_non_default())
    assert _non_default() == _non_default()
    assert _non_default() != CompressConfig()


# ---- JSON ---------------------------------------------------------------------------------------------


def test_json_round_trip_of_non_default_config():
    cfg = _non_default()
    text = cfg.to_json()
    back = CompressConfig.from_json(text)
    assert back == cfg
    assert isinstance(back.quant, QuantSpec)
    assert isinstance(back.sparsity, SparsitySpec)
    assert isinstance(back.calib, CalibSpec)
    assert back.to_json() == text


def test_to_dict_is_plain_nested_json():
    d = _non_default().to_dict()
    assert d == {
        "method": "magnitude",
        "quant": {"bits": 3, "group_size": 64, "symmetric": True, "qparam_method": "mse"},
        "sparsity": {"ratio": 0.375, "allocation": "matrix", "pattern": "group", "model_spread": 0.1},
        "calib": {"dataset": "c4", "samples": 7, "seq_len": 333, "seed": -5},
        "oneshot": {"saliency": "obs", "damp": 0.01, "block_size": 128, "static_qparams": False},
        "bqpo": {"epochs": 0, "lr_weight": 1e-3, "lr_qparams": 1e-2, "weight_decay": 0.0, "batch_size": 1,
                 "grad_clip": 1.0, "val_windows": 4, "patience": 1, "seed": 0, "mask_updates": 0, "targets": "dense",
                 "train_dtype": "float32"},
        "e2e": {"epochs": 0, "lr": 1e-4, "train_zero_point": False, "lr_zero_point": 1e-2, "batch_size": 1,
                "grad_clip": 1.0, "val_windows": 4, "patience": 1, "gradient_checkpointing": True, "seed": 0,
                "distill": 0.0, "distill_top_k": 64, "train_dtype": "float32"},
        "search": {"target_bpw": 3.25, "bits": [2, 3, 4], "group_sizes": [64], "ratios": [0.0, 0.1, 0.25, 0.5],
                   "per_layer": True, "windows": 8, "verify": 3},
        "layer_formats": {"model.layers.0.mlp.up_proj": {"bits": 2, "group_size": 32, "ratio": 0.25}},
        "version": CONFIG_VERSION,
    }
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("cls", [QuantSpec, SparsitySpec, CalibSpec])
def test_leaf_specs_round_trip(cls):
    obj = {QuantSpec: QuantSpec(bits=8, group_size=256), SparsitySpec: SparsitySpec(0.0, "model"),
           CalibSpec: CalibSpec("x.txt", 1, 1, 3)}[cls]
    assert cls.from_json(obj.to_json()) == obj
    assert cls.from_dict(obj.to_dict()) == obj


def test_missing_json_fields_take_defaults():
    cfg = CompressConfig.from_json('{"quant": {"bits": 2}}')
    assert cfg == CompressConfig(quant=QuantSpec(bits=2))


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('{"methd": "magnitude"}', "methd"),
        ('{"quant": {"bits": 4, "grup_size": 16}}', "grup_size"),
        ('{"sparsity": {"ratio": 0.5, "extra": 1}}', "extra"),
        ('{"calib": {"tokens": 5}}', "tokens"),
    ],
)
def test_unknown_json_field_is_named(text, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        CompressConfig.from_json(text)


def test_version_mismatch_in_json_is_rejected():
    data = _non_default().to_dict()
    data["version"] = CONFIG_VERSION + 1
    with pytest.raises(ValueError, match=r"CompressConfig\.version"):
        CompressConfig.from_dict(data)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"quant": {"bits": 5}}', "QuantSpec.bits"),
        ('{"sparsity": {"ratio": 1.0}}', "SparsitySpec.ratio"),
        ('{"sparsity": {"allocation": "layer"}}', "SparsitySpec.allocation"),
        ('{"quant": [4, 16]}', "CompressConfig.quant"),
        ('{"method": "gptq"}', "CompressConfig.method"),
    ],
)
def test_invalid_values_in_json_name_the_field(text, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        CompressConfig.from_json(text)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', "3"])
def test_malformed_json_raises_value_error(text):
    with pytest.raises(ValueError, match="CompressConfig"):
        CompressConfig.from_json(text)


# ---- files --------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = _non_default()
    path = tmp_path / "sub" / "compress_config.json"
    cfg.save(path)
    assert CompressConfig.load(path) == cfg
    assert CompressConfig.load(str(path)) == cfg
    assert json.loads(path.read_text()) == cfg.to_dict()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_save_overwrites(tmp_path):
    path = tmp_path / "c.json"
    CompressConfig().save(path)
    _non_default().save(path)
    assert CompressConfig.load(path) == _non_default()


@pytest.mark.parametrize("content", ['{"quant": {"bits": 7}}', '{"version": 99}', "{broken", '{"x": 1}'])
def test_load_errors_name_the_file(tmp_path, content):
    path = tmp_path / "bad_config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        CompressConfig.load(path)
