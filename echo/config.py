"""Config sections from mappings: unknown keys refused, values checked against the field types.

YAML and ``--set`` overrides hand over whatever the parser made of the text. Two traps this
catches by name instead of a ``TypeError`` deep inside training: PyYAML reads ``1e-3`` (no
dot, YAML 1.1) as a string, and ``8.5`` for an integer field would reach ``range()`` much later.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields
from typing import Any, TypeVar

Section = TypeVar("Section")


def section_from_dict(cls: type[Section], data: Any, name: str) -> Section:
    """``cls(**data)`` for a dataclass ``cls`` (config section ``name``) after checking that
    ``data`` is a mapping of known keys whose values fit the declared types: ``int`` (not bool),
    ``float`` (an int, or a string that reads as a number), ``bool``, ``str``, ``X | None`` and
    ``tuple[...]`` (from a list). ``data`` None gives the defaults."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise TypeError(f"config section '{name}' must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys in config section '{name}': {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _coerce(value, hints[key], f"{name}.{key}") for key, value in data.items()})


def _float_or_none(value: Any) -> float | None:
    """``value`` as a float: a number (not a bool) or a string that reads as one; else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:
            return _coerce(value, choices[0], key)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{key} must be an integer, got {value!r}")
    if kind is float:
        number = _float_or_none(value)
        if number is None:
            raise TypeError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):  # no setting means infinity; NaN would train silently to NaN
            raise ValueError(f"{key} must be finite, got {value!r}")
        return number
    if kind is str and not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {value!r}")
    return value
