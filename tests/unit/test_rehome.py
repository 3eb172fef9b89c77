"""Work conservation: an idle device that holds nothing a waiting request can use is
re-homed to that request's model (TridentPolicy._rehome_idle), on the simulator."""

from __future__ import annotations

from typing import Any

import pytest

from trident.sched.cost import load_cost_model
from trident.sched.types import Event, LogEvent, RunTask, TaskFinished, TaskStarted
from trident.sim.engine import GIB, ClusterSpec, SimConfig, SimResult, simulate
from trident.sim.scenario import build_models, make_requests, make_sim_policy
from trident.sim.traces import TraceRequest

pytestmark = pytest.mark.timeout(120)


def _shift_trace() -> list[TraceRequest]:
    # A run of images, then a burst of video and no more images: the windowed demand
    # still says "flux" long after the only work waiting is wan's.
    flux = [TraceRequest(i * 2.0, "flux", 1024, 1024) for i in range(20)]
    wan = [TraceRequest(60.0 + i, "wan", 480, 832, 33, 20) for i in range(4)]
    return flux + wan


def _run(**opts: Any) -> tuple[SimResult, list[tuple[float, float, tuple[str, ...]]], list[str]]:
    cost = load_cost_model()
    models = build_models(cost, ["flux", "wan"])
    reqs = make_requests(_shift_trace(), models, cost, 2.5, 8)
    policy = make_sim_policy("trident", models, cost, **opts)
    tasks: dict[str, RunTask] = {}
    started: dict[str, float] = {}
    spans: list[tuple[float, float, tuple[str, ...]]] = []
    rehomed: list[str] = []
    handle = policy.handle

    def recording(ev: Event, now: float) -> list[Any]:
        if isinstance(ev, TaskStarted):
            started[ev.task_id] = now
        elif isinstance(ev, TaskFinished) and ev.task_id in tasks:
            spans.append((started.get(ev.task_id, now), now, tasks[ev.task_id].devices))
        cmds = handle(ev, now)
        for c in cmds:
            if isinstance(c, RunTask):
                tasks[c.task_id] = c
            elif isinstance(c, LogEvent) and c.event == "placement.rehomed":
                rehomed.append(str(c.fields["model"]))
        return cmds

    policy.handle = recording  # type: ignore[method-assign]
    res = simulate(
        policy, cost, models, ClusterSpec(1, 4, memory_bytes=80 * GIB), reqs, SimConfig()
    )
    return res, spans, rehomed


def _idle_while_video_waits(
    res: SimResult, spans: list[tuple[float, float, tuple[str, ...]]]
) -> float:
    """Device-seconds (0.5 s resolution) a device sat idle while a wan request waited."""
    waits = [
        (r.arrival, r.arrival + r.timings.get("queue", 0.0))
        for r in res.records
        if r.model == "wan"
    ]
    devices = sorted({d for _, _, ds in spans for d in ds})
    idle = 0.0
    t = 0.0
    while t < res.end_time:
        if any(a <= t < b for a, b in waits):
            busy = {d for a, b, ds in spans if a <= t < b for d in ds}
            idle += 0.5 * (len(devices) - len(busy))
        t += 0.5
    return idle


def test_an_idle_device_is_rehomed_to_the_model_whose_requests_wait() -> None:
    res, spans, rehomed = _run()
    assert all(r.status == "completed" for r in res.records)
    assert "wan" in rehomed
    on = _idle_while_video_waits(res, spans)

    res_off, spans_off, rehomed_off = _run(rehome_idle=False)
    assert rehomed_off == []
    off = _idle_while_video_waits(res_off, spans_off)
    # Without re-homing, the image devices idle for minutes while video queues.
    assert off > 200.0
    assert on < 0.25 * off, (on, off)

    def mean_latency(r: SimResult) -> float:
        return sum(x.latency or 0.0 for x in r.records) / len(r.records)

    assert mean_latency(res) < mean_latency(res_off)
    assert sum(r.met_slo for r in res.records) >= sum(r.met_slo for r in res_off.records)
