"""The LP upper bound on SLO attainment: hand-checkable cases, and no policy beats it."""

from __future__ import annotations

import random

import pytest

from trident.sched.cost import load_cost_model
from trident.sched.types import ModelInfo, RequestSpec, Shape
from trident.sim.bound import slo_attainment_bound
from trident.sim.engine import ClusterSpec, SimConfig, simulate
from trident.sim.metrics import summarize
from trident.sim.scenario import make_sim_policy

pytestmark = pytest.mark.timeout(120)

COST = load_cost_model(None)
MODELS = {
    "flux": ModelInfo("flux", "flux", stage_weight_bytes={}),
    "cogvideox": ModelInfo("cogvideox", "cogvideox", is_video=True),
}
SHAPE = Shape(1024, 1024, 1, 28)


def _t(k: int = 1) -> float:
    return COST.stage_seconds("flux", "diffuse", SHAPE, k)


def test_one_device_fits_only_what_its_time_allows() -> None:
    t = _t()
    # two requests arriving together, each needs t on the only device, deadline 1.5 t:
    # together 2 t of work in 1.5 t of time -> at most 1.5 of 2 on time (fluid)
    reqs = [RequestSpec(f"r{i}", "flux", SHAPE, arrival=0.0, slo_s=1.5 * t) for i in range(2)]
    b = slo_attainment_bound(reqs, MODELS, COST, devices=1, gpus_per_node=1, min_interval_s=1.5 * t)
    assert b.status == "optimal"
    assert b.bound == pytest.approx(0.75, abs=1e-6)
    # the same on two devices: both fit
    b2 = slo_attainment_bound(reqs, MODELS, COST, devices=2, gpus_per_node=2)
    assert b2.bound == pytest.approx(1.0)


def test_a_deadline_shorter_than_the_fastest_degree_is_unreachable() -> None:
    fastest = min(_t(k) for k in (1, 2, 4, 8))
    reqs = [RequestSpec("r", "flux", SHAPE, arrival=0.0, slo_s=0.5 * fastest)]
    b = slo_attainment_bound(reqs, MODELS, COST, devices=8, gpus_per_node=8)
    assert b.bound == pytest.approx(0.0, abs=1e-9)


def test_requests_without_a_deadline_count_against_the_bound() -> None:
    reqs = [
        RequestSpec("a", "flux", SHAPE, arrival=0.0, slo_s=10 * _t()),
        RequestSpec("b", "flux", SHAPE, arrival=0.0, slo_s=None),
    ]
    b = slo_attainment_bound(reqs, MODELS, COST, devices=4, gpus_per_node=4)
    assert b.bound == pytest.approx(0.5) and b.with_deadline == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_no_policy_beats_the_bound_on_random_small_traces(seed: int) -> None:
    rng = random.Random(seed)
    reqs = []
    t = 0.0
    for i in range(16):
        t += rng.expovariate(0.15)
        if rng.random() < 0.7:
            shape = Shape(rng.choice([512, 1024]), 1024, 1, 28)
            model = "flux"
        else:
            shape = Shape(768, 1360, rng.choice([17, 33]), 50, cfg=True)
            model = "cogvideox"
        base = COST.standalone_seconds(MODELS[model].family, shape, 1)
        reqs.append(RequestSpec(f"r{i}", model, shape, arrival=t, slo_s=rng.uniform(1.2, 3) * base))
    cluster = ClusterSpec(1, 4)
    b = slo_attainment_bound(reqs, MODELS, COST, devices=4, gpus_per_node=4)
    assert b.status == "optimal"
    for name in ("fifo", "b1", "b4", "trident", "trident-np"):
        res = simulate(
            make_sim_policy(name, MODELS, COST), COST, MODELS, cluster, reqs, SimConfig()
        )
        got = summarize(res.records).slo_attainment
        assert got <= b.bound + 1e-9, (name, got, b.bound)
