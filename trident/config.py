"""Daemon configuration: flags and TOML files, validated into typed settings.

Scheduler TOML (every key optional; flags override the file; an unknown table or key
is a :class:`~trident.errors.ConfigError` naming it and the valid ones)::

    [scheduler]
    client_addr = "tcp://127.0.0.1:5555"
    node_addr = "tcp://127.0.0.1:5556"
    policy = "trident"         # trident (default), trident-static, b1, b4, b6, authors, fifo
    slo_scale = 2.5
    max_queue = 1024
    heartbeat_s = 1.0
    worker_ttl_s = 10.0        # silent this long -> lost
    log_file = "scheduler.log"
    time_scale = 1.0           # sim devices' --time-scale (the planner scales its times)
    profiles = ["profiles/flux-h100.json"]   # `trident profile` output for the cost model

    [scheduler.policy_options]  # the policy's options (docs/planner.md), e.g.
    max_batch = 4
    dispatch.max_nodes = 200   # a section's setting (or a [scheduler.policy_options.dispatch])

    [[models]]
    name = "flux"
    path = "/models/FLUX.1-dev"    # a local diffusers directory
    dtype = "bfloat16"             # float32, bfloat16, float16; default "auto": bfloat16
                                   # on cuda, float32 on cpu (the worker decides)
    [[models]]
    name = "wan-sim"
    family = "wan"                 # no path: a simulated model (sim devices only)
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from trident.errors import ConfigError
from trident.families import FAMILY_NAMES
from trident.runtime.transport import CLIENT_MAX_MESSAGE_BYTES
from trident.sched.types import DTYPE_BYTES

__all__ = [
    "DTYPES",
    "KNOWN_FAMILIES",
    "ModelSpec",
    "SchedulerConfig",
    "apply_dtype_flags",
    "load_scheduler_config",
    "parse_dtype",
    "parse_model_flag",
]

KNOWN_FAMILIES = FAMILY_NAMES  # the family names of trident.families

# The dtypes a model can be served in. "auto" (the default): bfloat16 on cuda devices,
# float32 on cpu devices, decided by the worker (trident.runtime.devices.TorchExecutor).
DTYPES: tuple[str, ...] = tuple(DTYPE_BYTES)  # float32, bfloat16, float16


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str | None = None
    family: str | None = None  # required when path is None
    dtype: str = "auto"  # one of DTYPES, or "auto"


def parse_dtype(value: object, where: str) -> str:
    """``value`` as a dtype name of :data:`DTYPES` (or ``"auto"``); a ConfigError naming
    the valid values otherwise."""
    if isinstance(value, str) and (value == "auto" or value in DTYPES):
        return value
    raise ConfigError(f"{where}: dtype {value!r} is not one of {', '.join(DTYPES)} (or auto)")


def apply_dtype_flags(models: list[ModelSpec], flags: list[str]) -> list[ModelSpec]:
    """``models`` with each ``--dtype NAME=DTYPE`` applied (the last flag for a name
    wins); a flag naming no configured model is a ConfigError."""
    by_name = {m.name: i for i, m in enumerate(models)}
    out = list(models)
    for flag in flags:
        name, sep, value = flag.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--dtype {flag!r}: expected NAME=DTYPE ({', '.join(DTYPES)})")
        if name not in by_name:
            raise ConfigError(
                f"--dtype {flag!r}: no model named {name!r}; models: {', '.join(by_name) or 'none'}"
            )
        i = by_name[name]
        out[i] = replace(out[i], dtype=parse_dtype(value.strip(), f"--dtype {flag!r}"))
    return out


@dataclass
class SchedulerConfig:
    client_addr: str = "tcp://127.0.0.1:5555"
    node_addr: str = "tcp://127.0.0.1:5556"
    policy: str = "trident"
    slo_scale: float = 2.5
    max_queue: int = 1024
    heartbeat_s: float = 1.0
    worker_ttl_s: float = 10.0
    log_file: str | None = None
    models: list[ModelSpec] = field(default_factory=list)
    curve_dir: str | None = None  # CurveZMQ keys (server.key_secret, ...)
    time_scale: float = 1.0  # sim clusters: the nodes' --time-scale, so plans match
    tick_s: float = 0.05  # how often the core gets a Tick (timeouts, re-planning)
    profiles: list[str] = field(default_factory=list)  # `trident profile` files
    policy_options: dict[str, Any] = field(default_factory=dict)
    # A client that sends heartbeats (the SDK does) and falls silent this long has its
    # requests cancelled: it went away, its work would be wasted.
    client_ttl_s: float = 10.0
    # Largest message a client may send (submit headers; tensors never come from clients).
    client_max_message_bytes: int = CLIENT_MAX_MESSAGE_BYTES
    # The request journal lives here (restart without silent loss); None: no journal.
    state_dir: str | None = None


def parse_model_flag(value: str) -> ModelSpec:
    """``NAME=DIR`` (a diffusers directory) or ``NAME=sim:FAMILY`` / a bare family name
    (a simulated model with no weights, for ``sim`` devices)."""
    name, sep, target = value.partition("=")
    name = name.strip()
    if not sep:
        if name in KNOWN_FAMILIES:
            return ModelSpec(name=name, family=name)
        raise ConfigError(
            f"--model {value!r}: expected NAME=DIR, NAME=sim:FAMILY, or a family name {KNOWN_FAMILIES}"
        )
    if not name:
        raise ConfigError(f"--model {value!r}: empty model name")
    target = target.strip()
    if target.startswith("sim:"):
        family = target[4:]
        if family not in KNOWN_FAMILIES:
            raise ConfigError(
                f"--model {value!r}: unknown family {family!r}; known: {KNOWN_FAMILIES}"
            )
        return ModelSpec(name=name, family=family)
    path = os.path.abspath(os.path.expanduser(target))
    if not Path(path).is_dir():
        raise ConfigError(f"--model {value!r}: {path} is not a directory")
    return ModelSpec(name=name, path=path)


_TOP_TABLES = ("scheduler", "models")
_MODEL_KEYS = ("name", "path", "family", "dtype")


def _scheduler_keys() -> tuple[str, ...]:
    return tuple(f.name for f in fields(SchedulerConfig) if f.name != "models")


def _unknown_key(path: object, table: str, key: str, valid: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(f"{path}: unknown key {table}{key}{hint}; valid keys: {', '.join(valid)}")


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether the TOML ``value`` has the type ``tp`` (an int is a float too)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return any(_type_ok(value, a) for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if typing.get_origin(tp) is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def load_scheduler_config(path: str | os.PathLike[str]) -> SchedulerConfig:
    """The scheduler settings of a TOML file (tables ``[scheduler]``,
    ``[scheduler.policy_options]`` and ``[[models]]``). An unknown table or key is a
    ConfigError naming it and the valid ones; so is a value of the wrong type. The
    policy options are checked by the policy's parser when the daemon builds it
    (:func:`trident.sched.registry.parse_policy_options`: a ``--policy`` flag may name
    another policy than the file)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    for key in raw:
        if key not in _TOP_TABLES:
            raise _unknown_key(path, "", key, _TOP_TABLES)
    cfg = SchedulerConfig()
    section = raw.get("scheduler", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [scheduler] must be a table")
    hints = typing.get_type_hints(SchedulerConfig)
    for key, value in section.items():
        if key not in _scheduler_keys():
            raise _unknown_key(path, "[scheduler].", key, _scheduler_keys())
        if key == "policy_options":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [scheduler.policy_options] must be a table")
            cfg.policy_options = dict(value)
            continue
        if not _type_ok(value, hints[key]):
            name = str(hints[key]).replace("typing.", "")
            if isinstance(hints[key], type):
                name = hints[key].__name__
            raise ConfigError(f"{path}: [scheduler].{key} must be {name}, not {value!r}")
        if hints[key] is float:
            value = float(value)
        setattr(cfg, key, value)
    entries = raw.get("models", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: models must be an array of tables ([[models]])")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{path}: [[models]] #{i + 1} needs a name")
        for key in entry:
            if key not in _MODEL_KEYS:
                raise _unknown_key(path, f"[[models]] #{i + 1} ", key, _MODEL_KEYS)
        dtype = parse_dtype(entry.get("dtype", "auto"), f"{path}: model {entry['name']!r}")
        if "path" in entry:
            base = Path(path).parent
            p = Path(os.path.expanduser(str(entry["path"])))
            p = p if p.is_absolute() else base / p
            if not p.is_dir():
                raise ConfigError(f"{path}: model {entry['name']!r}: {p} is not a directory")
            cfg.models.append(
                ModelSpec(name=str(entry["name"]), path=str(p.resolve()), dtype=dtype)
            )
        elif "family" in entry:
            fam = str(entry["family"])
            if fam not in KNOWN_FAMILIES:
                raise ConfigError(f"{path}: model {entry['name']!r}: unknown family {fam!r}")
            cfg.models.append(ModelSpec(name=str(entry["name"]), family=fam, dtype=dtype))
        else:
            raise ConfigError(f"{path}: model {entry['name']!r} needs a path or a family")
    return cfg
