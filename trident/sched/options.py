"""Typed policy options: one parser from ``name -> value`` pairs onto a config dataclass.

A policy's configuration is a dataclass whose fields are either plain settings
(``bool``, ``int``, ``float``, ``str``, a ``Literal`` of choices, ``X | None``, a
``tuple``, a ``Mapping``) or *sections*: nested config dataclasses of the parts it is
made of (``TridentConfig.dispatch`` is the dispatcher's ``DispatchConfig``, ...). An
option is named

- ``field`` — a plain setting of the config itself;
- ``section.field`` — a setting of one section (``dispatch.max_nodes``; or the section's
  name with a table of its fields, as a TOML sub-table gives it);
- an *alias* from the config class's ``ALIASES`` table — the flat names that the docs
  and older commands use, each mapped onto one or more ``section.field`` paths
  (``dispatch_max_nodes`` -> ``dispatch.max_nodes``; ``efficiency`` -> the core's, the
  dispatcher's and the placement's).

:func:`apply_options` returns a *copy* of a config with the options set, each value
converted to its field's type (the CLI and TOML hand over strings, ints, floats and
bools alike); anything it cannot place or convert is a
:class:`~trident.errors.ConfigError` that names the option and lists what is valid
(with the closest matches first). :func:`check_config` validates the enumerated
(``Literal``) fields of a config built in code.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal, TypeVar, Union

from trident.errors import ConfigError

__all__ = ["apply_options", "check_config", "convert_value", "option_names"]

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", ""}


@cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of the dataclass ``cls`` (annotations are strings here)."""
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, Any]:
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _aliases(cls: type) -> Mapping[str, tuple[str, ...]]:
    got: Mapping[str, tuple[str, ...]] = getattr(cls, "ALIASES", {})
    return got


@cache
def option_names(cls: type) -> tuple[str, ...]:
    """Every option ``cls`` accepts: its plain fields and aliases, then every
    ``section.field`` — the order error messages list them in."""
    flat: list[str] = []
    dotted: list[str] = []
    for name, tp in _fields(cls).items():
        if _is_section(tp):
            dotted += [f"{name}.{sub}" for sub in _fields(tp)]
        else:
            flat.append(name)
    flat += [a for a in _aliases(cls) if a not in flat]
    return tuple(sorted(flat)) + tuple(dotted)


def _paths(cls: type, key: str) -> tuple[tuple[str, ...], ...] | None:
    """The field paths option ``key`` sets on a ``cls`` config; None if it is unknown."""
    fields_ = _fields(cls)
    if key in fields_ and not _is_section(fields_[key]):
        return ((key,),)
    aliases = _aliases(cls)
    if key in aliases:
        return tuple(tuple(p.split(".")) for p in aliases[key])
    section, dot, sub = key.partition(".")
    tp = fields_.get(section)
    if dot and tp is not None and _is_section(tp) and sub in _fields(tp):
        return ((section, sub),)
    return None


def _unknown(cls: type, key: str, what: str) -> ConfigError:
    names = option_names(cls)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    section, dot, _ = key.partition(".")
    tp = _fields(cls).get(section)
    if dot and tp is not None and _is_section(tp):  # a known section, an unknown field
        valid = ", ".join(f"{section}.{f}" for f in _fields(tp))
    else:
        flat = [n for n in names if "." not in n]
        sections = [n for n, t in _fields(cls).items() if _is_section(t)]
        valid = ", ".join(flat)
        if sections:
            valid += f" (or SECTION.FIELD, SECTION one of {', '.join(sections)})"
    return ConfigError(f"{what}: unknown option {key!r}{hint}; valid options: {valid}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if origin is not None:
        return str(tp).replace("typing.", "").replace("collections.abc.", "")
    return getattr(tp, "__name__", str(tp))


def _split_items(text: str) -> list[str]:
    text = text.strip()
    if text[:1] in "([{" and text[-1:] in ")]}":
        text = text[1:-1]
    return [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]


def convert_value(value: Any, tp: Any, name: str) -> Any:
    """``value`` as the type ``tp`` of option ``name`` (strings are parsed); a
    ConfigError when it is not one."""

    def bad(extra: str = "") -> ConfigError:
        return ConfigError(
            f"option {name!r}: {value!r} is not {_type_name(tp)}{'; ' + extra if extra else ''}"
        )

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value.strip()):
                return c
        raise ConfigError(
            f"option {name!r}: {value!r} is not one of the choices "
            f"{', '.join(repr(c) for c in choices)}"
        )
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        ):
            return None
        rest = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        for a in rest:
            try:
                return convert_value(value, a, name)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        raise bad("use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin is tuple:
        args = typing.get_args(tp)
        items = _split_items(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert_value(v, args[0], name) for v in items)
        if len(items) != len(args):
            raise bad(f"expected {len(args)} values")
        return tuple(convert_value(v, a, name) for v, a in zip(items, args, strict=True))
    if origin in (dict, Mapping):
        kt, vt = typing.get_args(tp) or (Any, Any)
        if isinstance(value, str):
            pairs: list[tuple[str, str]] = []
            for item in _split_items(value):
                k, sep, v = item.replace(":", "=", 1).partition("=")
                if not sep:
                    raise bad("expected KEY=VALUE,KEY=VALUE")
                pairs.append((k.strip().strip("'\""), v.strip()))
            return {convert_value(k, kt, name): convert_value(v, vt, name) for k, v in pairs}
        if isinstance(value, Mapping):
            return {
                convert_value(k, kt, name): convert_value(v, vt, name) for k, v in value.items()
            }
        raise bad()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


def _set(config: Any, path: tuple[str, ...], value: Any, key: str) -> Any:
    """``config`` with the field at ``path`` set to ``value`` (converted); sections are
    rebuilt with ``dataclasses.replace`` (some are frozen)."""
    name = path[0]
    if len(path) == 1:
        new = convert_value(value, _fields(type(config))[name], key)
    else:
        new = _set(getattr(config, name), path[1:], value, key)
    return dataclasses.replace(config, **{name: new})


def check_config(config: Any, what: str = "config") -> None:
    """Raise ConfigError where an enumerated (``Literal``) field of ``config`` or of one
    of its sections holds a value that is not one of its choices."""
    for name, tp in _fields(type(config)).items():
        value = getattr(config, name)
        if _is_section(tp):
            check_config(value, f"{what}: {name}")
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{what}: {name}={value!r} is not one of the choices {choices}")


def _flatten(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"dispatch": {"max_nodes": 7}}`` (a TOML sub-table, a JSON object) as
    ``{"dispatch.max_nodes": 7}``: a table under a section's name sets its fields."""
    out: dict[str, Any] = {}
    fields_ = _fields(cls)
    for key, value in options.items():
        tp = fields_.get(str(key))
        if isinstance(value, Mapping) and tp is not None and _is_section(tp):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[str(key)] = value
    return out


def apply_options(config: T, options: Mapping[str, Any], what: str = "config") -> T:
    """A deep copy of ``config`` (a config dataclass; never modified) with ``options``
    set — plain fields, ``section.field`` or aliases, values converted to each field's
    type. Unknown options and bad values raise ConfigError (``what`` starts the
    message: e.g. "policy 'trident'")."""
    out = copy.deepcopy(config)
    cls = type(config)
    for key, value in _flatten(cls, options).items():
        paths = _paths(cls, str(key))
        if paths is None:
            raise _unknown(cls, str(key), what)
        for path in paths:
            try:
                out = _set(out, path, value, str(key))
            except ConfigError as exc:
                raise ConfigError(f"{what}: {exc}") from None
    check_config(out, what)
    return out
