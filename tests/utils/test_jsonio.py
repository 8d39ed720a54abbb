"""Strict JSON: non-finite floats become null at any depth, so strict parsers read everything gqsa writes."""

import json
import math

import numpy as np
import pytest

from gqsa.utils import jsonio


def _reject(token):
    raise ValueError(token)


def test_non_finite_floats_become_null_at_any_depth():
    value = {"ppl": math.inf, "nll": -math.inf, "loss": math.nan, "ok": 1.5, "n": 3, "flag": True, "name": "x",
             "none": None, "rows": [{"a": math.nan}, (1.0, math.inf)], "np": np.float32("inf"), "np_ok": np.float64(2)}
    text = jsonio.dumps(value, indent=1)
    parsed = json.loads(text, parse_constant=_reject)
    assert parsed == {"ppl": None, "nll": None, "loss": None, "ok": 1.5, "n": 3, "flag": True, "name": "x",
                      "none": None, "rows": [{"a": None}, [1.0, None]], "np": None, "np_ok": 2.0}


def test_the_input_is_not_modified_and_plain_json_is_unchanged():
    value = {"a": [math.nan], "b": {"c": 1}}
    jsonio.dumps(value)
    assert math.isnan(value["a"][0])
    plain = {"x": [1, 2.5, "s", None, False], "y": {"z": -0.0}}
    assert jsonio.dumps(plain, sort_keys=True) == json.dumps(plain, sort_keys=True)


def test_unserialisable_objects_still_raise():
    with pytest.raises(TypeError):
        jsonio.dumps({"x": object()})
    assert jsonio.dumps({"x": object()}, default=lambda o: "obj") == '{"x": "obj"}'
