"""Typed, frozen configuration trees: YAML in, dataclasses out.

A job's configuration is a tree of frozen dataclasses; YAML is only its serialization.
Every field carries ``metadata={"help": ...}``. This module turns YAML plus dotted
``key=value`` overrides into such a tree, refusing unknown keys (naming the nearest
valid key) and wrong types (naming the key, the expected type and the value), and
describes a tree for ``--help``.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``X | None``,
``Literal[...]``, ``tuple[T, ...]``, ``dict[str, T]`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

from cluster.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(UserError, ValueError):
    """A configuration that cannot be accepted; the message names the key and why."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def type_name(tp: Any) -> str:
    """A short human name of a field type (``int | None``, ``one of: a, b``)."""
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} | None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, root: type) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}': null is not allowed (expected {type_name(tp)})")
    tp = inner
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return _build(tp, value, key + ".", root)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            near = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}{near}")
        return value
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_type, *_rest) = typing.get_args(tp)
        return tuple(_convert(v, item_type, f"{key}[{i}]", root) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        _, value_type = typing.get_args(tp)
        return {str(k): _convert(v, value_type, f"{key}.{k}", root) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:  # pragma: no cover - a field type this module does not know is a programming error
        raise TypeError(f"unsupported config field type {tp!r} at {key}")
    raise ConfigError(f"config key '{key}': expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, root: type, base: Any = None) -> T:
    """Build section ``cls`` from ``data`` on top of ``base`` (the section's default instance, if any)."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(cls, prefix, str(key), root))
    values = {}
    for name in fields:
        if name not in data:
            continue
        tp = _is_optional(hints[name])[1]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(data[name], Mapping):
            default = getattr(base, name) if base is not None else _field_default(fields[name])
            section_base = default if dataclasses.is_dataclass(default) else None
            values[name] = _build(tp, data[name], prefix + name + ".", root, section_base)
        else:
            values[name] = _convert(data[name], hints[name], prefix + name, root)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (TypeError, ValueError) as exc:  # __post_init__ checks that span several keys
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}': {exc}") from None


def _unknown_key_message(cls: type, prefix: str, key: str, root: type) -> str:
    """Name the unknown key and the nearest valid one: in this section first, then anywhere in the tree."""
    here = [prefix + f.name for f in dataclasses.fields(cls)]
    everywhere = [k for k, *_ in describe(root)]
    # a key put in the wrong section first, then a misspelling here, then one anywhere
    near = [k for k in everywhere if k.rsplit(".", 1)[-1] == key][:1]
    near = near or difflib.get_close_matches(prefix + key, here, n=1, cutoff=0.6)
    near = near or difflib.get_close_matches(prefix + key, everywhere, n=1, cutoff=0.6)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys here: {', '.join(here)}"
    return f"unknown config key '{prefix}{key}'{hint}"


def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Build a config tree of type ``cls`` from a plain mapping, validating every key and type."""
    return _build(cls, data or {}, "", cls)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a config tree (tuples become lists), ready for YAML."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    tree: dict[str, Any] = plain(config)
    return tree


def _set_dotted(data: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    import yaml

    parts = dotted.split(".")
    node, node_cls, path = data, cls, ""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in fields:
            whole = [k for k, *_ in describe(cls)]
            near = difflib.get_close_matches(dotted, whole, n=1, cutoff=0.5)
            here = ", ".join(path + name for name in fields)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys here: {here}"
            raise ConfigError(f"unknown config key '{path}{part}' in override '{dotted}={raw}'{hint}")
        tp = _is_optional(_hints(node_cls)[part])[1]
        if i == len(parts) - 1:
            if tp is str:
                node[part] = None if raw in ("null", "~") and _is_optional(_hints(node_cls)[part])[0] else raw
            else:
                try:
                    node[part] = yaml.safe_load(raw) if raw != "" else None
                except yaml.YAMLError as exc:
                    raise ConfigError(f"override '{dotted}={raw}': the value is not valid YAML ({exc})") from None
            return
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise ConfigError(f"override '{dotted}': '{path}{part}' is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{path}{part}' is not a section in the config file")
        node_cls, path = tp, f"{path}{part}."


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a config tree of type ``cls`` from an optional YAML file plus ``key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
        data = loaded or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. engine.zero_stage=2)")
        key, raw = item.split("=", 1)
        _set_dotted(data, cls, key.strip(), raw.strip())
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def describe(cls: type, prefix: str = "", base: Any = None) -> Iterator[tuple[str, str, Any, str]]:
    """Yield ``(dotted key, type name, default, help)`` for every leaf of the config tree ``cls``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(base, f.name) if base is not None else _field_default(f)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from describe(tp, prefix + f.name + ".", default if dataclasses.is_dataclass(default) else None)
            continue
        yield (
            prefix + f.name,
            type_name(tp),
            "(required)" if default is dataclasses.MISSING else default,
            f.metadata.get("help", ""),
        )


def help_text(cls: type) -> str:
    """Every key of the config tree, with its type, default and description, as a text table."""
    lines = []
    section = None
    for key, tname, default, doc in describe(cls):
        head = key.rsplit(".", 1)[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"\n  [{head or 'top level'}]")
        shown = "null" if default is None else (list(default) if isinstance(default, tuple) else default)
        lines.append(f"  {key} ({tname}, default: {shown})\n      {doc}")
    return "\n".join(lines)
