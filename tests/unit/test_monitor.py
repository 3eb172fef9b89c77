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


def test_rare_model_rate_is_estimated_over_its_last_arrivals() -> None:
    """A model with fewer than ``min_model_arrivals`` arrivals in the window gets a
    longer window (its last N arrivals, at most ``max_window_s``); a frequent one keeps
    the short window. Off (0): one window for all."""
    mon = Monitor(window_s=60.0, min_model_arrivals=4, max_window_s=300.0)
    for i in range(300):  # flux: 1 req/s for 300 s
        mon.record_arrival(float(i), "flux", IMG)
    for t in (20.0, 100.0, 180.0, 260.0):  # cogvideox: one per 80 s
        mon.record_arrival(t, "cogvideox", VID)
    now = 300.0
    spans = mon.model_spans(now)
    assert spans["flux"] == pytest.approx(60.0)
    assert spans["cogvideox"] == pytest.approx(280.0)  # back to its 4th-last arrival
    rates = mon.rates(now)
    assert rates["flux"] == pytest.approx(60 / 60.0, rel=0.05)
    assert rates["cogvideox"] == pytest.approx(4 / 280.0)
    dem = mon.demand(COST, MODELS, now)
    one = sum(
        COST.stage_seconds("cogvideox", s, VID, 2 if s == "diffuse" else 1)
        * (2 if s == "diffuse" else 1)
        for s in ("encode", "diffuse", "decode")
    )
    assert sum(dem["cogvideox"].values()) == pytest.approx(4 * one / 280.0, rel=1e-6)
    snap = mon.snapshot(now, COST, MODELS, {}, {})
    assert snap.arrivals == {"flux": 60, "cogvideox": 4}
    # fewer than N arrivals in the whole lookback: the longest window
    mon2 = Monitor(window_s=60.0, min_model_arrivals=4, max_window_s=300.0)
    mon2.record_arrival(0.0, "flux", IMG)
    mon2.record_arrival(400.0, "cogvideox", VID)
    mon2.record_arrival(500.0, "cogvideox", VID)
    assert mon2.model_spans(550.0)["cogvideox"] == pytest.approx(300.0)
    # off: the plain sliding window
    off = Monitor(window_s=60.0)
    for t in (20.0, 100.0, 180.0, 260.0):
        off.record_arrival(t, "cogvideox", VID)
    assert off.rates(300.0) == {"cogvideox": pytest.approx(1 / 60.0)}
