"""Typed dataclass configs from TOML recipes plus dotted ``a.b=value`` overrides.

A recipe is a TOML file (local path or fsspec URL). ``load_config`` reads it, applies overrides and builds
the nested dataclass tree, so every field is validated by its dataclass ``__post_init__``. Unknown keys and
values of the wrong type raise ``ValueError`` naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")

__all__ = ["apply_overrides", "build", "dump_toml", "load_config", "load_toml", "parse_value", "to_dict"]


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file from a local path or any fsspec URL."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        return tomllib.load(f)


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML value (``3``, ``1e-4``, ``true``, ``[1, 2]``, ``"x"``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_value(text.strip())
    return data


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Convert a TOML value to the annotated type ``tp`` (recursing into dataclasses and containers)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ValueError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a table for {tp.__name__}, got {value!r}")
        return build(tp, value, prefix=where)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys with the dotted field name.

    A class with a ``resolve_config_class(data)`` classmethod may pick a subclass to build from the data (e.g.
    ``pretrain.config.TrainConfig`` builds the config class of the recipe's ``method``).
    """
    resolve = getattr(cls, "resolve_config_class", None)
    if callable(resolve):
        try:
            cls = resolve(data)
        except ValueError as exc:
            raise ValueError(f"{prefix}.{exc}" if prefix else str(exc)) from None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ValueError(f"unknown config field(s): {names} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise ValueError(f"{prefix or cls.__name__}: {exc}") from None
    except ValueError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ValueError(f"{prefix}.{exc}") from None
        raise


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a TOML recipe (optional), apply dotted overrides and build the dataclass ``cls``."""
    data = load_toml(path) if path else {}
    apply_overrides(data, overrides)
    return build(cls, data)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists, ``None`` values are dropped)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v = to_dict(getattr(obj, f.name))
            if v is not None:
                out[f.name] = v
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items() if v is not None}
    return obj


def _toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_scalar(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Serialise a nested dict to TOML text (tables for nested dicts, inline values otherwise)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, Mapping) or isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_scalar(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{_prefix}.{k}" if _prefix else k
        if isinstance(v, list):
            for item in v:
                out += f"\n[[{name}]]\n" + dump_toml(item, name)
        else:
            out += f"\n[{name}]\n" + dump_toml(v, name)
    return out
