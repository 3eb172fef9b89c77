"""The simulator and the real daemons agree on the same trace (issue #5's credibility check).

The live run replays the trace through a real scheduler and a `trident-node --devices
sim:4` process at a compressed time scale; the simulator runs the same policy code on
virtual time. At a load where no request sits on its deadline, per-request latencies,
hence the mean and the SLO attainment, must agree closely.
"""

from __future__ import annotations

import math

import pytest

from trident.bench.live import run_live
from trident.bench.sim import BenchConfig, run_policies

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_live_daemons_match_the_simulator_on_a_short_trace(tmp_path) -> None:
    cfg = BenchConfig(
        trace="flux",
        nodes=1,
        gpus_per_node=4,
        policies=("trident",),
        rate=0.1,
        duration_s=120.0,
        seed=3,
    )
    sim = run_policies(cfg)[0]["trident"]
    live = run_live(cfg, "trident", time_scale=0.2, log_dir=str(tmp_path))
    assert live["requests"] == sim.requests > 5
    assert live["failed"] == 0 and sim.failed == 0
    assert math.isclose(live["mean_latency_s"], sim.mean_latency_s, rel_tol=0.10), (live, sim)
    assert abs(live["slo_attainment"] - sim.slo_attainment) <= 0.10, (live, sim)
