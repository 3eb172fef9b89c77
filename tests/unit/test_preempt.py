"""Step-level preemption (trident.sched.preempt) on the simulator: a short request that
would miss its deadline behind long running diffuses pauses one of them at a step
boundary; the paused diffuse resumes from its state and ends with the predicted delay."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from trident.sched.cost import load_cost_model
from trident.sched.types import Event, LogEvent
from trident.sim.engine import GIB, ClusterSpec, SimConfig, SimResult, simulate
from trident.sim.scenario import build_models, make_requests, make_sim_policy
from trident.sim.traces import TraceRequest

pytestmark = pytest.mark.timeout(120)

COST = load_cost_model()


def _run(
    policy_name: str,
    trace: list[TraceRequest],
    devices: int = 2,
    models: tuple[str, ...] = ("wan",),
) -> tuple[SimResult, list[dict[str, Any]]]:
    served = build_models(COST, list(models))
    reqs = make_requests(trace, served, COST, 2.5, 8)
    policy = make_sim_policy(policy_name, served, COST)
    preempted: list[dict[str, Any]] = []
    handle = policy.handle

    def recording(ev: Event, now: float) -> list[Any]:
        cmds = handle(ev, now)
        for c in cmds:
            if isinstance(c, LogEvent) and c.event == "dispatch.preempted":
                preempted.append(dict(c.fields))
            elif isinstance(c, LogEvent) and c.event == "dispatch.widening":
                # A widening pauses too (trident.sched.widen): same bound, same count.
                preempted.append({"paused_request_id": c.fields["request_id"], "widen": True})
        return cmds

    policy.handle = recording  # type: ignore[method-assign]
    cluster = ClusterSpec(1, devices, memory_bytes=80 * GIB)
    return simulate(policy, COST, served, cluster, reqs, SimConfig()), preempted


def test_a_short_request_preempts_a_long_diffuse_which_ends_with_the_predicted_delay() -> None:
    # Two long clips fill both devices (the first at degree 2); a short clip arrives
    # 30 s in. Without preemption it waits ~920 s for the first clip and misses its
    # deadline; with it, the first clip pauses at a step boundary, the short one runs on
    # its devices, and the first clip resumes there and is still on time.
    trace = [
        TraceRequest(0.0, "wan", 480, 832, 81, 50),
        TraceRequest(1.0, "wan", 480, 832, 81, 50),
        TraceRequest(30.0, "wan", 480, 832, 9, 10),
    ]
    np_res, np_pre = _run("trident-np", trace)
    res, pre = _run("trident", trace)
    assert np_pre == [] and np_res.stats.get("yields") is None
    assert not [p for p in pre if p.get("widen")]  # both devices stay busy
    long_np, _, short_np = sorted(np_res.records, key=lambda r: r.arrival)
    long1, long2, short = sorted(res.records, key=lambda r: r.arrival)
    assert all(r.status == "completed" for r in (*res.records, *np_res.records))
    assert not short_np.met_slo and short.met_slo
    assert [p["request_id"] for p in pre] == [short.request_id]
    assert pre[0]["paused_request_id"] == long1.request_id
    assert res.stats["yields"] == 1 and res.log_events["stage.paused"] == 1
    # The paused clip runs the same steps in all: its diffuse time is unchanged but
    # for the resumed chunk's overhead...
    overhead = SimConfig().chunk_overhead_s
    assert long1.timings["diffuse"] == pytest.approx(long_np.timings["diffuse"] + overhead)
    # ... and it ends later by exactly what ran on its devices meanwhile: the short
    # clip's encode, diffuse and decode (the resume queues behind them), plus that
    # overhead.
    delay = short.timings["encode"] + short.timings["diffuse"] + short.timings["decode"]
    assert long1.finish == pytest.approx(long_np.finish + delay + overhead, abs=1e-6)
    assert long1.met_slo and long_np.met_slo
    # SLO attainment 2/3 against 1/3, and the second long clip is not hurt either.
    assert sum(r.met_slo for r in res.records) == 2
    assert sum(r.met_slo for r in np_res.records) == 1
    assert long2.finish < sorted(np_res.records, key=lambda r: r.arrival)[1].finish


@pytest.mark.parametrize("seed", range(6))
def test_no_request_is_preempted_more_than_the_bound_and_none_is_lost(seed: int) -> None:
    rng = random.Random(seed)
    trace = []
    for _ in range(14):
        t = rng.uniform(0.0, 300.0)
        if rng.random() < 0.4:
            trace.append(TraceRequest(t, "wan", 480, 832, rng.choice([33, 81]), 50))
        else:
            trace.append(TraceRequest(t, "wan", 480, 832, 9, rng.choice([10, 20])))
    trace.sort(key=lambda r: r.arrival_s)
    res, pre = _run("trident", trace, devices=rng.choice([2, 4]))
    assert all(r.status == "completed" for r in res.records), [r.error for r in res.records]
    paused = Counter(p["paused_request_id"] for p in pre)
    bound = make_sim_policy("trident", build_models(COST, ["wan"]), COST).tconfig.preempt
    assert max(paused.values(), default=0) <= bound.max_preemptions
    assert res.stats.get("yields", 0) <= len(pre)
    assert not res.stats.get("stuck_tasks")


def test_an_idle_device_of_another_model_does_not_stop_a_preemption() -> None:
    # The same clips on three devices, one of which holds flux and idles after its one
    # image. The short clip's own model has no free device: it must still pause a long
    # clip (urgency is judged by the model's own homes, not by any free device).
    trace = [
        TraceRequest(0.0, "flux", 512, 512, 1, 28),
        TraceRequest(0.5, "wan", 480, 832, 81, 50),
        TraceRequest(1.0, "wan", 480, 832, 81, 50),
        TraceRequest(30.0, "wan", 480, 832, 9, 10),
    ]
    np_res, np_pre = _run("trident-np", trace, devices=3, models=("wan", "flux"))
    res, pre = _run("trident", trace, devices=3, models=("wan", "flux"))
    short_np = max(np_res.records, key=lambda r: r.arrival)
    short = max(res.records, key=lambda r: r.arrival)
    assert all(r.status == "completed" for r in (*res.records, *np_res.records))
    assert np_pre == [] and not short_np.met_slo
    assert [p["request_id"] for p in pre] == [short.request_id]
    assert short.met_slo
    assert short.finish < short_np.finish - 1000.0


def test_two_degree_1_diffuses_pause_together_for_a_clip_that_needs_a_pair() -> None:
    # Two 81-frame cogvideox clips run at degree 1, one per device. A 33-frame clip
    # arrives 30 s in: at degree 1 it cannot meet its deadline even alone, at degree 2
    # it can. No single victim has two devices, so both pause together at a step
    # boundary, the short clip runs on the pair, and both long clips resume on time.
    trace = [
        TraceRequest(0.0, "cogvideox", 768, 432, 81, 50),
        TraceRequest(1.0, "cogvideox", 768, 432, 81, 50),
        TraceRequest(30.0, "cogvideox", 768, 432, 33, 50),
    ]
    np_res, np_pre = _run("trident-np", trace, models=("cogvideox",))
    res, pre = _run("trident", trace, models=("cogvideox",))
    assert all(r.status == "completed" for r in (*res.records, *np_res.records))
    *longs, short = sorted(res.records, key=lambda r: r.arrival)
    *longs_np, short_np = sorted(np_res.records, key=lambda r: r.arrival)
    assert np_pre == [] and not short_np.met_slo  # it waits ~290 s for the pair
    assert short.met_slo and len(short.devices["diffuse"]) == 2
    assert sorted(p["paused_request_id"] for p in pre) == sorted(r.request_id for r in longs)
    assert {p["request_id"] for p in pre} == {short.request_id}
    assert res.stats["yields"] == 2
    assert all(r.met_slo for r in (*longs, *longs_np))
    # Each long clip runs the same steps (plus the resumed chunk's overhead) and ends
    # later by about the short clip's run on its device.
    overhead = SimConfig().chunk_overhead_s
    for r, r_np in zip(longs, longs_np, strict=True):
        assert r.timings["diffuse"] == pytest.approx(r_np.timings["diffuse"] + overhead)
        assert r_np.finish < r.finish < r_np.finish + short.latency + 10.0
