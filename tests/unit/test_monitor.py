"""The monitor's window, snapshot and mix distance, with plain calls."""

from __future__ import annotations

import pytest

from trident.sched.cost import load_cost_model
from trident.sched.monitor import Monitor, shape_key, total_variation
from trident.sched.types import ModelInfo, Shape

pytestmark = pytest.mark.timeout(30)
COST = load_cost_model([])
MODELS = {m: ModelInfo(m, m) for m in ("flux", "cogvideox")}
IMG = Shape(512, 512, 1, 28)
VID = Shape(768, 432, 17, 50)


def test_total_variation() -> None:
    assert total_variation({"a": 1.0}, {"a": 5.0}) == 0.0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    assert total_variation({"a": 1.0, "b": 1.0}, {"a": 1.0}) == pytest.approx(0.5)
    assert total_variation({}, {}) == 0.0
    assert total_variation({"a": 1.0}, {}) == 1.0


def test_window_slides_and_snapshot_reports_everything() -> None:
    mon = Monitor(window_s=10.0)
    for i in range(10):
        mon.record_arrival(float(i), "flux", IMG)
    mon.record_arrival(9.5, "cogvideox", VID)
    mon.record_stage("flux", "diffuse", 2.0, now=9.0, degree=1)
    mon.record_stage("cogvideox", "diffuse", 3.0, now=9.0, degree=2)
    mon.record_busy(9.0, ["n0/sim:0"], 5.0)
    placement = {
        "n0/sim:0": {"flux": frozenset({"encode", "diffuse", "decode"})},
        "n0/sim:1": {"cogvideox": frozenset({"diffuse"})},
    }
    s = mon.snapshot(
        10.0,
        COST,
        MODELS,
        placement,  # type: ignore[arg-type]
        {"n0/sim:0": 1.0, "n0/sim:1": 1.0},
        queue=[("flux", 8.0), ("cogvideox", 9.5)],
        free_memory={"n0/sim:0": 10, "n0/sim:1": 20},
    )
    assert s.arrivals == {"flux": 10, "cogvideox": 1}
    assert s.shapes["flux"] == {shape_key(IMG): 10}
    assert sum(s.mix.values()) == pytest.approx(1.0)
    fl = s.stages["flux"]
    # an EDC device's speed is split by demand: equal supply ratios within the model
    assert fl["encode"].supply_ratio == pytest.approx(fl["diffuse"].supply_ratio)
    assert s.stage_imbalance("flux")[0] == pytest.approx(1.0)
    # cogvideox holds diffuse only: encode/decode have demand and no capacity
    assert s.stage_imbalance("cogvideox")[0] == float("inf")
    assert s.stages["cogvideox"]["diffuse"].served == pytest.approx(6.0 / 10.0)
    assert s.queue_len == 2 and s.oldest_wait_s == pytest.approx(2.0)
    assert s.devices["n0/sim:0"].busy_fraction == pytest.approx(0.5)
    assert s.devices["n0/sim:1"].free_memory == 20
    assert "mix" in s.summary() and "model_ratio" in s.summary()
    # the window slides: at t=25 nothing is left
    assert mon.window(25.0) == []
    assert mon.snapshot(25.0, COST, MODELS, placement, {}).arrivals == {}  # type: ignore[arg-type]
