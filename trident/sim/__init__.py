"""Discrete-event simulator driving the scheduler core on virtual time.

Public API::

    from trident.sim import simulate, ClusterSpec, SimConfig, DeviceFault, summarize
    from trident.sim.traces import make_trace, load_trace, dump_trace, to_request_specs
    from trident.sim.scenario import GPU_PROFILES, build_models, make_requests, make_sim_policy

``trident bench sim`` (the driver) is :mod:`trident.bench.sim`.
"""

from __future__ import annotations

from trident.sim.engine import (
    ClusterSpec,
    DeviceFault,
    RequestRecord,
    SimConfig,
    SimResult,
    Simulator,
    simulate,
)
from trident.sim.metrics import Summary, summarize
from trident.sim.traces import (
    TraceError,
    TraceRequest,
    dump_trace,
    load_trace,
    make_trace,
    to_request_specs,
)

__all__ = [
    "ClusterSpec",
    "DeviceFault",
    "RequestRecord",
    "SimConfig",
    "SimResult",
    "Simulator",
    "Summary",
    "TraceError",
    "TraceRequest",
    "dump_trace",
    "load_trace",
    "make_trace",
    "simulate",
    "summarize",
    "to_request_specs",
]
