"""Strict JSON out: every document gqsa writes parses with any JSON parser.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` for non-finite floats, tokens that are not JSON
and that strict parsers (``jq``, JavaScript's ``JSON.parse``, Go, ...) reject. A perplexity can be infinite and a
loss NaN, so every float goes through :func:`finite_or_none` first: a non-finite value is written as ``null``.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None.

    numpy floating scalars (``numbers.Real`` but not ``float``) are handled too and become Python floats.

    Args:
        value: a JSON-like structure (dicts, lists, tuples, str, int, float, bool, None).

    Returns:
        The same structure (new containers; tuples become lists, as ``json`` writes them anyway).
    """
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # e.g. numpy.float32
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite floats written as ``null`` (never ``NaN`` or ``Infinity``).

    Args:
        value: a JSON-like structure.
        **kwargs: passed to ``json.dumps`` (``indent``, ``sort_keys``, ``default``, ...).

    Returns:
        Strict JSON text.

    Raises:
        TypeError: ``value`` holds an object ``json`` cannot serialise (and no ``default`` is given).
    """
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
