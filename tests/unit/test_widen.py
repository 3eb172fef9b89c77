"""Widening (trident.sched.widen) on the simulator: a diffuse that started at degree 1
because only one device was free pauses at a step boundary when the device beside it
falls idle, resumes there at degree 2 and ends when the cost model says it will."""

from __future__ import annotations

from typing import Any

import pytest

from trident.sched.cost import load_cost_model
from trident.sched.types import Event, LogEvent, Shape
from trident.sim.engine import GIB, ClusterSpec, SimConfig, SimResult, simulate
from trident.sim.scenario import build_models, make_requests, make_sim_policy
from trident.sim.traces import TraceRequest

pytestmark = pytest.mark.timeout(120)

COST = load_cost_model()
# A 33-frame clip takes device 0; a 81-frame clip arrives 0.5 s later and starts alone
# on device 1 (at degree 1 it misses its deadline by ~390 s; at degree 2 from the start
# it would be on time, but device 0 is busy for ~530 s).
TRACE = [
    TraceRequest(0.0, "wan", 480, 832, 33, 50),
    TraceRequest(0.5, "wan", 480, 832, 81, 50),
]


def _run(policy_name: str, **options: Any) -> tuple[SimResult, list[tuple[float, LogEvent]]]:
    served = build_models(COST, ["wan"])
    reqs = make_requests(TRACE, served, COST, 2.5, 8)
    policy = make_sim_policy(policy_name, served, COST, **options)
    logs: list[tuple[float, LogEvent]] = []
    handle = policy.handle

    def recording(ev: Event, now: float) -> list[Any]:
        cmds = handle(ev, now)
        logs.extend(
            (now, c) for c in cmds if isinstance(c, LogEvent) and c.event.startswith("dispatch.")
        )
        return cmds

    policy.handle = recording  # type: ignore[method-assign]
    cluster = ClusterSpec(1, 2, memory_bytes=80 * GIB)
    return simulate(policy, COST, served, cluster, reqs, SimConfig()), logs


def test_a_diffuse_widens_onto_the_device_that_falls_idle_and_ends_as_predicted() -> None:
    res, logs = _run("trident")
    short, clip = sorted(res.records, key=lambda r: r.arrival)
    assert short.status == clip.status == "completed"
    widening = [(t, e.fields) for t, e in logs if e.event == "dispatch.widening"]
    widened = [(t, e.fields) for t, e in logs if e.event == "dispatch.widened"]
    assert len(widening) == 1 and len(widened) == 1
    (t_pause, pause), (t_resume, resume) = widening[0], widened[0]
    assert pause["request_id"] == resume["request_id"] == clip.request_id
    assert pause["from_devices"] == ["n0/sim:1"]
    assert resume["devices"] == ["n0/sim:0", "n0/sim:1"] and resume["degree"] == 2
    # It asked when device 0 freed (the short clip's end) and resumed at its next step
    # boundary, with the steps done so far.
    assert t_pause == pytest.approx(short.finish)
    shape = Shape(480, 832, 81, 50)
    t1 = COST.stage_seconds("wan", "diffuse", shape, 1)
    t2 = COST.stage_seconds("wan", "diffuse", shape, 2)
    done = resume["steps_done"]
    assert 0 < done < 50
    assert t_pause <= t_resume <= t_pause + t1 / 50 + 1e-6
    # The rest at degree 2 after the resume overhead, then decode on the leader.
    decode = COST.stage_seconds("wan", "decode", shape, 1)
    overhead = SimConfig().chunk_overhead_s
    assert clip.finish == pytest.approx(
        t_resume + overhead + (50 - done) / 50 * t2 + decode, abs=1e-3
    )
    assert clip.finish == pytest.approx(resume["predicted_end"], abs=0.1)
    assert clip.devices["diffuse"] == ("n0/sim:0", "n0/sim:1")
    assert clip.met_slo and short.met_slo
    assert res.stats["yields"] == 1


@pytest.mark.parametrize(
    ("policy", "options"), [("trident", {"preempt.widen": False}), ("trident-np", {})]
)
def test_without_widening_the_clip_runs_alone_to_the_end_and_is_late(
    policy: str, options: dict[str, Any]
) -> None:
    wide, wide_logs = _run("trident")
    res, logs = _run(policy, **options)
    clip = max(res.records, key=lambda r: r.arrival)
    assert not [e for _, e in logs if e.event.startswith("dispatch.widen")]
    assert clip.devices["diffuse"] == ("n0/sim:1",) and not clip.met_slo
    # The saving widening announced is what the clip gained (a lower bound: it counts
    # a whole step for the wait at the boundary).
    wide_clip = max(wide.records, key=lambda r: r.arrival)
    saved = next(e.fields["saved_s"] for _, e in wide_logs if e.event == "dispatch.widening")
    assert clip.finish - wide_clip.finish >= saved - 1e-3
