"""A simulation scenario from a trace: GPU profiles, models, deadlines and policies.

The pieces every simulator run needs besides the trace and the engine::

    from trident.sim.scenario import GPU_PROFILES, build_models, make_requests, make_sim_policy

- :data:`GPU_PROFILES`: simulated device kinds (memory, speed relative to the cost
  model's reference L20), for :class:`trident.sim.ClusterSpec`.
- :func:`build_models`: a :class:`ModelInfo` per served model name in the trace.
- :func:`make_requests`: the trace's requests with explicit deadlines (the trace's
  ``slo_s``, else ``slo_scale`` x standalone latency).
- :func:`make_sim_policy`: a scheduling policy by name (``fifo``, ``trident``, baselines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trident.sched.core import standalone_latency
from trident.sched.registry import make_policy
from trident.sched.types import CostModel, ModelInfo, Policy, RequestSpec
from trident.sim.engine import GIB
from trident.sim.traces import VIDEO_FAMILIES, TraceError, TraceRequest, to_request_specs

__all__ = [
    "GPU_PROFILES",
    "GpuProfile",
    "build_models",
    "make_requests",
    "make_sim_policy",
]


@dataclass(frozen=True)
class GpuProfile:
    name: str
    memory_bytes: int
    speed: float  # relative to the cost model's reference device (L20 = 1.0)
    note: str = ""


# Speeds other than L20's are rough (dense bf16 throughput ratios, discounted for
# memory-bound parts); measure with `trident profile` for real numbers.
GPU_PROFILES: dict[str, GpuProfile] = {
    "l20": GpuProfile("l20", 48 * GIB, 1.0, "the paper's device; the cost model's reference"),
    "l40s": GpuProfile("l40s", 48 * GIB, 1.6, "rough"),
    "a100": GpuProfile("a100", 80 * GIB, 1.8, "A100 80GB; rough"),
    "h100": GpuProfile("h100", 80 * GIB, 3.0, "H100 SXM; rough"),
    "h200": GpuProfile("h200", 141 * GIB, 3.3, "rough"),
}


def build_models(
    cost: CostModel, names: Sequence[str], model_map: Mapping[str, str] | None = None
) -> dict[str, ModelInfo]:
    """A :class:`ModelInfo` per served model name used by the trace.

    A name is its own family when the cost model knows it (``flux``); ``model_map``
    maps other served names (``my-flux-dev``) to families; otherwise a name that
    starts with a known family (``flux-dev``) gets that family.
    """
    mm = dict(model_map or {})
    known = tuple(getattr(cost, "families", ()))
    out: dict[str, ModelInfo] = {}
    for name in dict.fromkeys(names):
        family = mm.get(name)
        if family is None:
            if name in known or not known:
                family = name
            else:
                family = next(
                    (f for f in sorted(known, key=len, reverse=True) if name.startswith(f)), None
                )
        if family is None:
            raise TraceError(
                f"model {name!r}: unknown family (known: {', '.join(known)}); "
                f"map it with --model {name}=FAMILY"
            )
        out[name] = ModelInfo(
            name=name,
            family=family,
            is_video=family in VIDEO_FAMILIES,
            stage_weight_bytes={
                s: int(cost.weight_bytes(family, s)) for s in ("encode", "diffuse", "decode")
            },
            max_degree=8,
        )
    return out


def make_requests(
    trace: Sequence[TraceRequest],
    models: Mapping[str, ModelInfo],
    cost: CostModel,
    slo_scale: float,
    max_degree: int,
) -> list[RequestSpec]:
    """Requests with explicit ``slo_s`` = trace's, else ``slo_scale`` x standalone."""

    def slo_for(req: TraceRequest, served: str) -> float:
        info = models[served]
        spec = RequestSpec("slo", served, req.shape, 0.0)
        base, _k = standalone_latency(cost, info.family, spec, min(info.max_degree, max_degree))
        return slo_scale * base

    return to_request_specs(trace, slo_for=slo_for)


def make_sim_policy(
    name: str, models: Mapping[str, ModelInfo], cost: CostModel, **config: Any
) -> Policy:
    """The named policy (:func:`trident.sched.registry.make_policy`: ``trident``,
    ``trident-static``, the baselines, ``fifo``) with options ``config``; an unknown
    policy, option or value is a :class:`~trident.errors.ConfigError`."""
    return make_policy(name, models, cost, **config)
