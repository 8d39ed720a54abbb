"""Frozen dataclasses that check their fields on construction and round-trip through JSON.

    @dataclass(frozen=True)
    class Spec(ValidatedConfig):
        _rules: ClassVar[dict[str, Rule]] = {"bits": one_of((2, 4), integer=True), "lr": number(0, 1.0)}
        bits: int = 4
        lr: float = 1e-3

Each rule's error names ``Class.field``, what it must be and what it got; ``_check`` holds rules across fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from gqsa.utils import jsonio


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What one field must be: ``test(value)`` holds, described as ``expected`` in the error; ``convert`` (e.g.
    ``float``) normalises a valid value."""

    expected: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] | None = None


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    """An int (not a bool) in [lo, hi] (either end may be open-ended: None)."""
    if lo is None:
        return Rule("an integer", _is_int)
    if hi is None:
        return Rule("a positive integer" if lo == 1 else f"an integer >= {lo}", lambda v: _is_int(v) and v >= lo)
    return Rule(f"an integer in {_interval(lo, hi, False, False)}", lambda v: _is_int(v) and lo <= v <= hi)


def number(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """An int or float (not a bool, not NaN) in the interval, stored as float."""

    def test(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return Rule(f"a number in {_interval(lo, hi, lo_open, hi_open)}", test, float)


def one_of(options: tuple, integer: bool = False) -> Rule:
    """One of ``options`` (with ``integer``, an int: 4.0 is not the 4 of a code width)."""
    return Rule(f"one of {options}", lambda v: (_is_int(v) or not integer) and v in options)


def power_of_two(lo: int, hi: int | None = None) -> Rule:
    upto = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
    return Rule(f"a power of two {upto}",
                 lambda v: _is_int(v) and _is_power_of_two(v) and lo <= v and (hi is None or v <= hi))


class FrozenMap(dict):
    """A read-only dict that hashes by its items, for mapping fields of frozen configs."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _read_only(self, *args, **kwargs):
        raise TypeError("a config's mapping is read-only; build a new config with replace()")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore


FLAG = Rule("a bool", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v))


class ValidatedConfig:
    """Field validation and the JSON round trip shared by the config dataclasses.

    A config class lists its fields' rules in ``_rules`` (checked in order on construction, each error naming
    ``Class.field``) and its rules across fields in ``_check``; nested configs are rebuilt by field type.
    """

    _nested: ClassVar[dict[str, type]] = {}
    _nested_maps: ClassVar[dict[str, type]] = {}  # fields holding {str: config}, rebuilt value by value
    _rules: ClassVar[dict[str, Rule]] = {}

    def __post_init__(self) -> None:
        for name, rule in self._rules.items():
            value = getattr(self, name)
            if not rule.test(value):
                raise ValueError(f"{type(self).__name__}.{name} must be {rule.expected}, got {value!r}")
            if rule.convert is not None:
                object.__setattr__(self, name, rule.convert(value))
        self._check()

    def _check(self) -> None:
        """Rules across fields (none by default)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, ValidatedConfig):
                value = value.to_dict()
            elif isinstance(value, dict):
                value = {k: v.to_dict() if isinstance(v, ValidatedConfig) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}")
        kwargs = dict(data)
        for name, sub in cls._nested.items():
            if name in kwargs and isinstance(kwargs[name], dict):
                kwargs[name] = sub.from_dict(kwargs[name])
        for name, sub in cls._nested_maps.items():
            if name in kwargs and isinstance(kwargs[name], dict):
                kwargs[name] = {k: sub.from_dict(v) if isinstance(v, dict) else v for k, v in kwargs[name].items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return jsonio.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cls.__name__}: invalid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
