"""Policies through handle(): placement on join, dispatch commands, end-to-end runs."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _minisim import MiniSim, arrive, devices, join, models

from trident.sched.cost import load_cost_model
from trident.sched.policy import config_keys, make_policy
from trident.sched.types import (
    DeviceLost,
    LoadStage,
    LogEvent,
    NodeJoined,
    RequestArrived,
    RequestSpec,
    RunTask,
    Shape,
    StageLoaded,
)

pytestmark = pytest.mark.timeout(60)
COST = load_cost_model([])
NAMES = ["trident", "b1", "b4", "b6", "authors", "fifo"]


def test_join_emits_loads_and_arrival_dispatches_merged_task() -> None:
    ms = models("flux")
    pol = make_policy("trident", ms, COST)
    devs = devices(1, 2)
    out = pol.handle(NodeJoined("n0", tuple(devs)), 0.0)
    loads = [c for c in out if isinstance(c, LoadStage)]
    assert {(c.device_id, c.stage) for c in loads} >= {
        ("n0/sim:0", "diffuse"),
        ("n0/sim:1", "diffuse"),
    }
    assert any(isinstance(c, LogEvent) and c.event == "placement.changed" for c in out)
    for c in loads:
        pol.handle(StageLoaded(c.device_id, c.model, c.stage), 0.0)
    out = pol.handle(RequestArrived(RequestSpec("r1", "flux", Shape(512, 512, 1, 10), 0.1)), 0.1)
    runs = [c for c in out if isinstance(c, RunTask)]
    assert len(runs) == 1 and runs[0].stages[0] == "encode" and "diffuse" in runs[0].stages
    logs = [c for c in out if isinstance(c, LogEvent) and c.event == "dispatch.solved"]
    assert logs and logs[0].fields["solver"] in ("mip", "greedy") and "ms" in logs[0].fields


def _workload(sim: MiniSim, ms: dict, n: int, seed: int) -> None:  # type: ignore[type-arg]
    rng = random.Random(seed)
    t = 0.5
    for i in range(n):
        m = rng.choice(list(ms))
        if m == "cogvideox":
            sh = Shape(768, 1360, rng.choice([17, 33]), 4)
        else:
            s = rng.choice([512, 1024, 2048])
            sh = Shape(s, s, 1, 20)
        arrive(sim, RequestSpec(f"r{i}", m, sh, t))
        t += rng.expovariate(0.4)


@pytest.mark.parametrize("name", NAMES)
def test_every_policy_completes_a_workload(name: str) -> None:
    ms = models("flux", "sd3", "cogvideox")
    pol = make_policy(name, ms, COST)
    sim = MiniSim(pol, COST)
    join(sim, devices(2, 4))
    _workload(sim, ms, 30, 7)
    sim.run()
    assert len(sim.done) == 30 and not sim.failed
    if name != "fifo":
        assert sim.loads, "initial placement must be loaded"
    for d, spans in sim.busy.items():  # worker FIFO: never two tasks at once
        spans.sort()
        for (_, e1), (s2, _) in itertools.pairwise(spans):
            assert s2 >= e1 - 1e-9, d


def test_trident_beats_static_fifo_on_mixed_load() -> None:
    ms = models("flux", "sd3", "cogvideox")
    met = {}
    for name in ("trident", "b1"):
        sim = MiniSim(make_policy(name, ms, COST), COST)
        join(sim, devices(2, 4))
        _workload(sim, ms, 40, 11)
        sim.run()
        met[name] = sum(1 for c in sim.done if c.met_slo)
    assert met["trident"] >= met["b1"]


def test_device_lost_requeues_and_config_keys() -> None:
    ms = models("flux")
    pol = make_policy("trident", ms, COST, slo_scale=3.0, solver="highs")
    pol.handle(NodeJoined("n0", tuple(devices(1, 2))), 0.0)
    out = pol.handle(RequestArrived(RequestSpec("r1", "flux", Shape(512, 512, 1, 10), 0.0)), 0.0)
    run = next(c for c in out if isinstance(c, RunTask))
    out = pol.handle(DeviceLost(run.devices[0], "test"), 1.0)
    rerun = [c for c in out if isinstance(c, RunTask)]
    assert rerun and run.devices[0] not in rerun[0].devices
    assert "slo_scale" in config_keys("trident") and "degree" in config_keys("b1")
    with pytest.raises(TypeError):
        make_policy("trident", ms, COST, nope=1)
    with pytest.raises(ValueError):
        make_policy("nope", ms, COST)
