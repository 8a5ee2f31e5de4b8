"""Typed config dataclasses from plain dicts, with strict keys and documented fields.

Every config section is a dataclass whose fields are declared with :func:`doc`, so the help
text lives next to the default. :func:`from_dict` builds a dataclass from a (YAML-loaded)
dict, rejects unknown keys naming the nearest valid one, and coerces scalar types;
:func:`apply_overrides` applies ``a.b=value`` strings (``--set`` on the command line).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ds_relora.errors import ConfigError


def doc(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a help text (shown by ``ds-relora config --explain``)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": help})
    return dataclasses.field(default=default, metadata={"doc": help})


class Checked:
    """Base of config sections whose fields carry range checks (run on every construction).

    ``SECTION`` names the YAML section in messages; ``validate`` calls :meth:`require` once per
    rule, next to the field declarations, so a bad value fails with one line when the config is
    read (from YAML, ``--set`` or code), long before a worker would trip over it.
    """

    SECTION = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Override: one :meth:`require` per rule."""

    def require(self, name: str, ok: bool, rule: str) -> None:
        """Raise ``ConfigError('<section>.<name>=<value> <rule>')`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"{self.SECTION}.{name}={getattr(self, name)!r} {rule}")


def field_docs(cls: type) -> dict[str, str]:
    """Help text of each field of a config dataclass."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return close[0] if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = _nearest(str(value), [str(a) for a in allowed])
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}"
                + (f" (did you mean '{hint}'?)" if hint else "")
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise with the nearest valid name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            hint = _nearest(str(key), names)
            raise ConfigError(
                f"unknown config key '{path}'"
                + (f" (did you mean '{(where + '.') if where else ''}{hint}'?)" if hint else "")
            )
        kwargs[key] = _coerce(value, hints[key], path)
    for f in dataclasses.fields(cls):
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and f.name not in kwargs:
            path = f"{where}.{f.name}" if where else f.name
            raise ConfigError(f"missing required config key '{path}': set it in the YAML or with --set {path}=...")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-dict form of a config dataclass (what is written next to every checkpoint)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars."""
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no '=': write it as --set section.key=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key: write it as --set section.key=value")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data
