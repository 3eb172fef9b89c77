"""The policies by name — each registered once, here — and building one from options.

- ``trident``: :class:`~trident.sched.tridentpolicy.TridentPolicy` (``TridentConfig``)
- ``trident-np``: :class:`~trident.sched.tridentpolicy.TridentNoPreemptPolicy`
- ``trident-static``: :class:`~trident.sched.tridentpolicy.TridentStaticPolicy`
  (``TridentConfig``)
- ``b1``: :class:`~trident.sched.baselines.StaticFifoPolicy` (``StaticFifoConfig``)
- ``b4``: :class:`~trident.sched.baselines.PipelineSrtfPolicy` (``BaselineConfig``)
- ``b6``: :class:`~trident.sched.baselines.StageSrtfPolicy` (``StageSplitConfig``)
- ``authors``: :class:`~trident.sched.baselines.AuthorsPolicy` (``AuthorsConfig``)
- ``fifo``: :class:`~trident.sched.core.FifoPolicy` (``CoreConfig``)

:func:`parse_policy_options` is *the* option parser: the scheduler daemon
(``--policy-option``, ``[scheduler.policy_options]``), ``trident bench sim``
(``--policy-opt``) and the simulator's :func:`~trident.sim.scenario.make_sim_policy` all
come through it (via :func:`make_policy`). Option names and value conversion:
:mod:`trident.sched.options`; an unknown name, a bad value or a value that is not one
of an enumerated field's choices is a :class:`~trident.errors.ConfigError` naming it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from trident.errors import ConfigError
from trident.sched.baselines import (
    AuthorsConfig,
    AuthorsPolicy,
    BaselineConfig,
    PipelineSrtfPolicy,
    StageSplitConfig,
    StageSrtfPolicy,
    StaticFifoConfig,
    StaticFifoPolicy,
)
from trident.sched.core import CoreConfig, FifoPolicy
from trident.sched.options import apply_options, option_names
from trident.sched.tridentpolicy import (
    TridentConfig,
    TridentNoPreemptPolicy,
    TridentPolicy,
    TridentStaticPolicy,
)
from trident.sched.types import CostModel, ModelInfo, Policy

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "POLICY_NAMES",
    "PolicySpec",
    "config_keys",
    "make_policy",
    "parse_policy_options",
    "policy_spec",
]

DEFAULT_POLICY = "trident"


@dataclass(frozen=True)
class PolicySpec:
    """A registered policy: its name, its class (``cls(models, cost, config)``), its
    config dataclass (default-constructible) and a one-line description."""

    name: str
    cls: Callable[[Mapping[str, ModelInfo], CostModel, Any], Policy]
    config: type
    summary: str


def _register(*specs: PolicySpec) -> Mapping[str, PolicySpec]:
    out: dict[str, PolicySpec] = {}
    for spec in specs:
        if spec.name in out:
            raise RuntimeError(f"policy {spec.name!r} registered twice")
        out[spec.name] = spec
    return MappingProxyType(out)


POLICIES: Mapping[str, PolicySpec] = _register(
    PolicySpec(
        "trident",
        TridentPolicy,
        TridentConfig,
        "MIP placement re-planned on triggers + MIP dispatch",
    ),
    PolicySpec(
        "trident-np",
        TridentNoPreemptPolicy,
        TridentConfig,
        "trident without step-level preemption",
    ),
    PolicySpec(
        "trident-static",
        TridentStaticPolicy,
        TridentConfig,
        "trident with the placement frozen after the first window",
    ),
    PolicySpec("b1", StaticFifoPolicy, StaticFifoConfig, "static pipeline-level FIFO (xDiT)"),
    PolicySpec("b4", PipelineSrtfPolicy, BaselineConfig, "dynamic pipeline-level SRTF"),
    PolicySpec("b6", StageSrtfPolicy, StageSplitConfig, "dynamic stage-level SRTF, manual split"),
    PolicySpec("authors", AuthorsPolicy, AuthorsConfig, "the TridentServe authors' dispatch ILP"),
    PolicySpec("fifo", FifoPolicy, CoreConfig, "the core's stage-level FIFO"),
)
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def policy_spec(name: str | None) -> PolicySpec:
    """The registered policy ``name`` (case-insensitive; empty: ``trident``); an unknown
    name is a ConfigError listing the known ones."""
    key = (name or DEFAULT_POLICY).strip().lower()
    spec = POLICIES.get(key)
    if spec is None:
        close = difflib.get_close_matches(key, POLICY_NAMES, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown policy {name!r}{hint}; known: {', '.join(POLICY_NAMES)}")
    return spec


def config_keys(name: str) -> tuple[str, ...]:
    """Every option policy ``name`` accepts: flat names, then ``section.field``."""
    return option_names(policy_spec(name).config)


def parse_policy_options(
    name: str | None, options: Mapping[str, Any] | None = None, base: Any = None
) -> Any:
    """The config of policy ``name``: ``base`` (default: the config class's defaults;
    never modified) with ``options`` applied — values are converted to each field's
    type (strings from the command line included). Unknown options and bad values raise
    ConfigError naming the option and what is valid."""
    spec = policy_spec(name)
    if base is None:
        base = spec.config()
    elif not isinstance(base, spec.config):
        raise ConfigError(
            f"policy {spec.name!r} takes a {spec.config.__name__}, not {type(base).__name__}"
        )
    return apply_options(base, dict(options or {}), f"policy {spec.name!r}")


def make_policy(
    name: str | None,
    models: Mapping[str, ModelInfo],
    cost: CostModel,
    config: Any = None,
    /,
    **options: Any,
) -> Policy:
    """Policy ``name`` (see :data:`POLICIES`) with its config from ``config`` (an
    instance of its config class; copied, never modified) and ``options``
    (:func:`parse_policy_options`)."""
    spec = policy_spec(name)
    return spec.cls(models, cost, parse_policy_options(spec.name, options, config))
