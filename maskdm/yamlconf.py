"""A small typed-YAML engine: plain dicts -> nested dataclasses, with ``dotted.key=value`` overrides.

Knows nothing about MaskDM: ``maskdm/config.py`` holds the schema (the dataclasses) and its cross-field checks.
Every key is checked against the dataclass fields: an unknown key, a value of the wrong type, a value outside a
``Literal`` or a non-finite number (nan, inf) raises ``ConfigError`` naming the dotted key and what is allowed.
A field typed ``list[SomeDataclass]`` is addressed in overrides by index or by its items' ``name`` field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "apply_overrides", "build", "read_yaml", "to_plain"]


class ConfigError(ValueError):
    """A bad configuration: the message names the dotted key and the allowed values."""


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML file (``{}`` for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


# ---------------------------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict, overrides, root: type) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw dict of dataclass ``root``; returns
    a copy."""
    raw = yaml.safe_load(yaml.safe_dump(raw)) if raw else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value, e.g. train.seed=1")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty part in key {key!r}")
        _set(raw, parts, value, key, root)
    return raw


class _Items:
    """The walker's position inside a ``list[dataclass]`` field: the next key part picks an item."""

    def __init__(self, item_cls: type, field: str):
        self.item_cls, self.field = item_cls, field


def _set(raw: dict, parts: list[str], value, key: str, root: type) -> None:
    node: Any = raw
    cls: Any = root
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(cls, _Items):
            idx = _item_index(node, part, here, cls)
            if last:
                raise ConfigError(f"override {key}: set a field of the item, e.g. {here}.{_first_field(cls)}=...")
            node, cls = node[idx], cls.item_cls
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(_unknown(here, part, list(fields)))
        hint = _hints(cls)[part]
        if last:
            node[part] = value
            return
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            node.setdefault(part, to_plain(_default(fields[part])))
            node, cls = node[part], _Items(typing.get_args(hint)[0], part)
        elif dataclasses.is_dataclass(hint):
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{here} must be a mapping, got {type(sub).__name__}")
            node, cls = sub, hint
        else:
            raise ConfigError(f"override {key}: {here} is a value, it has no field {parts[i + 1]!r}")


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return [dataclasses.asdict(x) for x in f.default_factory()]
    return [] if f.default is dataclasses.MISSING else f.default


def _first_field(items: _Items) -> str:
    return dataclasses.fields(items.item_cls)[0].name


def _item_index(items: list, part: str, here: str, where: _Items) -> int:
    if not isinstance(items, list):
        raise ConfigError(f"{here}: expected a list, got {type(items).__name__}")
    if part.isdigit():
        idx = int(part)
        if idx >= len(items):
            raise ConfigError(f"{here}: index {idx} out of range; the list has {len(items)} item(s)")
        return idx
    default_name = getattr(where.item_cls, "name", None)
    names = [s.get("name", default_name) if isinstance(s, dict) else None for s in items]
    if part not in names:
        raise ConfigError(f"{here}: no entry of {where.field} named {part!r}; names: {', '.join(map(str, names))} "
                          f"(or an index 0..{len(items) - 1})")
    return names.index(part)


# ----------------------------------------------------------------------------------------- typed building
_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def build(cls, raw, path: str = ""):
    """An instance of dataclass ``cls`` from a plain dict, every value converted and type-checked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping of keys, got {type(raw).__name__} {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown(_join(path, str(key)), str(key), names))
    hints = _hints(cls)
    return cls(**{k: _convert(hints[k], v, _join(path, k)) for k, v in raw.items()})


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown(where: str, key: str, allowed: list[str]) -> str:
    near = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown config key {where!r}{hint}; allowed keys here: {', '.join(allowed)}"


def _describe(tp) -> str:
    o = typing.get_origin(tp)
    if o is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if o in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if o is tuple:
        return "a list [" + ", ".join(_describe(a) for a in typing.get_args(tp)) + "]"
    if o is list:
        return "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, path: str):
    o = typing.get_origin(tp)
    if o in (Union, types.UnionType):
        return _convert_union(tp, value, path)
    if o is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path} = {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if o is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path} must be a non-empty list, got {value!r}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if o is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path} = {value!r}: expected {_describe(tp)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    return _convert_scalar(tp, value, path)


def _convert_union(tp, value, path: str):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _convert(a, value, path)
        except _NonFinite:
            raise
        except ConfigError:
            continue
    raise ConfigError(f"{path} = {value!r}: expected {_describe(tp)}")


class _NonFinite(ConfigError):
    pass


def _convert_scalar(tp, value, path: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path} = {value!r}: expected an integer")
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise ConfigError(f"{path} = {value!r}: expected a number")
        if not math.isfinite(out):
            raise _NonFinite(f"{path} = {value!r}: expected a finite number (not nan or inf)")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} = {value!r}: expected a string")
    raise ConfigError(f"{path}: unsupported field type {tp}")  # pragma: no cover


def to_plain(obj):
    """Dicts, lists and scalars only (tuples become lists): what YAML and JSON write."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
