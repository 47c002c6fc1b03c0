"""Strict conversion of YAML mappings to the schema's dataclasses.

Every key is checked against the dataclass fields (an unknown key names itself, where it was found
and the closest valid key) and every value against the field's type, converting only where nothing
is lost (an integer where a float is expected).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union

from transferlab.config.schema import CHOICES, ConfigError, choice_message
from transferlab.registry import suggestion

__all__ = ["deep_merge", "from_dict", "suggest"]


def suggest(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    return suggestion(word, list(candidates))


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _check_union(value, typing.get_args(tp), where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(choice_message(where, value, allowed))
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:  # free-form values (e.g. augmentation parameters), checked by their consumer
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_check_type(k, key_tp, where): _check_type(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, where)
    return _check_scalar(value, tp, where)


def _check_union(value: Any, args: tuple[Any, ...], where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _check_type(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")


_SCALARS = {float: "a number", int: "an integer", bool: "true/false", str: "a string"}


def _check_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config type {tp!r} at {where}")  # programming error
    ok = {
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{where}: expected {_SCALARS[tp]}, got {value!r}")
    return float(value) if tp is float else value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    ``where`` is a dotted prefix used in error messages (e.g. ``experiments[2].train``).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key '{path}'{suggest(str(key), fields)}; valid keys here: {', '.join(fields)}")
        kwargs[key] = _check_type(value, hints[key], path)
        names = CHOICES.get((cls, key))
        if names is not None and kwargs[key] not in names():
            raise ConfigError(choice_message(path, kwargs[key], names()))
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
