"""Values checked against dataclass type hints, for files and command lines written by people.

One checker for the two places that read them: a bundle's ``config.json`` (``digit_core.runtime``)
and the training configs (``training.config.parse_config``). Only the hint forms our configs use
are understood: ``int``, ``float``, ``str``, ``bool``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``list[X]``, ``dict``, ``X | None`` and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` (ints widen to float, lists become tuples); raise
    TypeError naming ``key`` when it is not of that type. Floats must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return check_value(value, a, key)
            except TypeError as err:
                errors.append(str(err))
        raise TypeError(errors[0] if len(errors) == 1 else f"{key}: expected {_name(hint)}, got {value!r:.80}")
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{key}: expected true or false, got {value!r:.80}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key}: expected an integer, got {value!r:.80}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key}: expected a number, got {value!r:.80}")
        if not math.isfinite(value):
            raise TypeError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{key}: expected a string, got {value!r:.80}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{key}: expected a list, got {value!r:.80}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TypeError(f"{key}: expected {len(args)} values, got {len(value)}")
            each = args
        else:
            each = (args[0] if args else Any,) * len(value)
        items = [check_value(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, each))]
        return tuple(items) if origin is tuple else items
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{key}: expected a mapping, got {value!r:.80}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise TypeError(f"{key}: expected {hint.__name__}, got {type(value).__name__}")
        check_dataclass(value, key)
        return value
    return value   # Any and forms our configs do not use


def check_dataclass(obj: Any, prefix: str = "") -> None:
    """Every field of the dataclass ``obj`` (recursively) has its hinted type; raise TypeError
    naming the first one that does not (``encoder.width: expected an integer, got '64'``)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            check_value(getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
