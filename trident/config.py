"""Daemon configuration: flags and TOML files, validated into typed settings.

Scheduler TOML (every key optional; flags override the file)::

    [scheduler]
    client_addr = "tcp://127.0.0.1:5555"
    node_addr = "tcp://127.0.0.1:5556"
    policy = "trident"         # trident (default), b1, b4, b6, authors, fifo
    slo_scale = 2.5
    max_queue = 1024
    heartbeat_s = 1.0
    worker_ttl_s = 10.0        # silent this long -> lost
    log_file = "scheduler.log"
    time_scale = 1.0           # sim devices' --time-scale (the planner scales its times)
    profiles = ["profiles/flux-h100.json"]   # `trident profile` output for the cost model

    [[models]]
    name = "flux"
    path = "/models/FLUX.1-dev"    # a local diffusers directory
    [[models]]
    name = "wan-sim"
    family = "wan"                 # no path: a simulated model (sim devices only)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trident.errors import ConfigError
from trident.families import FAMILY_NAMES
from trident.runtime.transport import CLIENT_MAX_MESSAGE_BYTES

__all__ = [
    "KNOWN_FAMILIES",
    "ModelSpec",
    "SchedulerConfig",
    "load_scheduler_config",
    "parse_model_flag",
]

KNOWN_FAMILIES = FAMILY_NAMES  # the family names of trident.families


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str | None = None
    family: str | None = None  # required when path is None


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


def load_scheduler_config(path: str | os.PathLike[str]) -> SchedulerConfig:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    cfg = SchedulerConfig()
    section = raw.get("scheduler", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [scheduler] must be a table")
    for key, value in section.items():
        if key == "policy_options":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: policy_options must be a table")
            cfg.policy_options = dict(value)
            continue
        if not hasattr(cfg, key) or key == "models":
            raise ConfigError(f"{path}: unknown key [scheduler].{key}")
        expected = type(getattr(cfg, key))
        if getattr(cfg, key) is not None and expected is float and isinstance(value, int):
            value = float(value)
        if getattr(cfg, key) is not None and not isinstance(value, expected):
            raise ConfigError(f"{path}: [scheduler].{key} must be {expected.__name__}")
        setattr(cfg, key, value)
    for i, entry in enumerate(raw.get("models", [])):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{path}: [[models]] #{i + 1} needs a name")
        if "path" in entry:
            base = Path(path).parent
            p = Path(os.path.expanduser(str(entry["path"])))
            p = p if p.is_absolute() else base / p
            if not p.is_dir():
                raise ConfigError(f"{path}: model {entry['name']!r}: {p} is not a directory")
            cfg.models.append(ModelSpec(name=str(entry["name"]), path=str(p.resolve())))
        elif "family" in entry:
            fam = str(entry["family"])
            if fam not in KNOWN_FAMILIES:
                raise ConfigError(f"{path}: model {entry['name']!r}: unknown family {fam!r}")
            cfg.models.append(ModelSpec(name=str(entry["name"]), family=fam))
        else:
            raise ConfigError(f"{path}: model {entry['name']!r} needs a path or a family")
    return cfg
