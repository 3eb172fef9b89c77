"""The policy-time memos (issue #14) give exactly the uncached figures, never stale ones."""

from __future__ import annotations

import random

import pytest

from trident.sched.cost import (
    ProfileEntry,
    ProfileFile,
    ReferenceCostModel,
    ScaledCostModel,
    best_degree,
    efficient_degrees,
    memo_table,
    supported_degrees,
)
from trident.sched.monitor import Monitor
from trident.sched.orchestrator import demand_from_window
from trident.sched.types import STAGES, ModelInfo, Shape, Stage


class _Plain:
    """Delegates to a cost model; not a built-in type, so nothing is memoised."""

    def __init__(self, base: object) -> None:
        self.base = base

    def stage_seconds(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> float:
        return float(self.base.stage_seconds(family, stage, shape, degree))  # type: ignore[attr-defined]


MODELS = {
    "flux": ModelInfo("flux", "flux"),
    "sd3": ModelInfo("sd3", "sd3", max_degree=2),
    "cog": ModelInfo("cog", "cogvideox", is_video=True),
    "hy": ModelInfo("hy", "hunyuanvideo", is_video=True),
}


def _shape(rng: random.Random, video: bool) -> Shape:
    side = rng.choice((256, 512, 768, 1024, 2048))
    frames = rng.choice((17, 49, 129)) if video else 1
    return Shape(side, side, frames, rng.choice((20, 28, 50)), rng.random() < 0.3)


def _window(seed: int, n: int = 300) -> list[tuple[str, Shape]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = rng.choice([*MODELS, "unknown"])
        out.append((m, _shape(rng, m in ("cog", "hy"))))
    return out


def _reference_demand(cost: object, window: list[tuple[str, Shape]], span: float) -> dict:
    """The pre-memo demand_from_window, computed on an unmemoised cost model."""
    out = {m: dict.fromkeys(STAGES, 0.0) for m in MODELS}
    sec = cost.stage_seconds  # type: ignore[attr-defined]
    for model, shape in window:
        info = MODELS.get(model)
        if info is None:
            continue
        fam = info.family
        k = best_degree(cost, fam, shape, info.max_degree, 0.8)
        out[model]["encode"] += sec(fam, "encode", shape)
        out[model]["diffuse"] += k * sec(fam, "diffuse", shape, k)
        out[model]["decode"] += sec(fam, "decode", shape)
    return {m: {s: v / span for s, v in st.items()} for m, st in out.items()}


def test_memo_only_for_builtin_models() -> None:
    cost = ReferenceCostModel()
    assert memo_table(cost, "x") is not None
    assert memo_table(ScaledCostModel(cost, 2.0), "x") is not None
    assert memo_table(_Plain(cost), "x") is None
    assert memo_table(ScaledCostModel(_Plain(cost), 2.0), "x") is None  # type: ignore[arg-type]

    class Sub(ReferenceCostModel):
        pass

    assert memo_table(Sub(), "x") is None
    # Two models never share a table.
    assert memo_table(cost, "x") is not memo_table(ReferenceCostModel(), "x")


def test_cached_demand_equals_uncached_bit_for_bit() -> None:
    cost = ReferenceCostModel()
    for seed in range(3):
        win = _window(seed)
        want = _reference_demand(_Plain(cost), win, 60.0)
        # Twice: the first call fills the memo, the second reads it.
        assert demand_from_window(cost, MODELS, win, 60.0) == want
        assert demand_from_window(cost, MODELS, win, 60.0) == want
        assert demand_from_window(_Plain(cost), MODELS, win, 60.0) == want  # type: ignore[arg-type]


def test_monitor_demand_per_model_windows() -> None:
    cost = ReferenceCostModel()
    mon = Monitor(window_s=30.0, min_model_arrivals=8, max_window_s=300.0)
    rng = random.Random(7)
    t = 0.0
    for m, shape in _window(11, 400):
        t += rng.expovariate(2.0)
        mon.record_arrival(t, m, shape)
    spans = mon.model_spans(t)
    win = mon.window(t)
    got = mon.demand(cost, MODELS, t)
    for m in MODELS:
        if m not in spans:
            assert got[m] == dict.fromkeys(STAGES, 0.0)
            continue
        mine = [x for x in win if x[0] == m]
        want = _reference_demand(_Plain(cost), mine, spans[m])[m]
        assert got[m] == want


def test_degree_helpers_equal_uncached() -> None:
    cost = ReferenceCostModel()
    plain = _Plain(cost)
    rng = random.Random(3)
    for _ in range(200):
        info = rng.choice(list(MODELS.values()))
        shape = _shape(rng, info.is_video)
        eff = rng.choice((0.5, 0.8, 0.95))
        for _ in range(2):
            assert efficient_degrees(cost, info.family, shape, info.max_degree, eff) == (
                efficient_degrees(plain, info.family, shape, info.max_degree, eff)
            )
            assert best_degree(cost, info.family, shape, info.max_degree, eff) == (
                best_degree(plain, info.family, shape, info.max_degree, eff)
            )
            assert supported_degrees(cost, info.family, shape, info.max_degree) == (
                supported_degrees(plain, info.family, shape, info.max_degree)
            )


def _profile(seconds_per_step: float) -> ProfileFile:
    """A flux profile whose degree-1 diffuse is ``seconds_per_step`` per step at 1024^2
    and degree 2 nearly twice as fast (efficient at 0.8)."""
    entries = tuple(
        ProfileEntry(
            "diffuse", 1024, 1024, 1, 28, k, seconds_per_step * 28 / (k * 0.95 ** (k - 1)), 0
        )
        for k in (1, 2)
    )
    return ProfileFile("l20", "bfloat16", "flux", "flux", {}, entries)


def test_add_profile_is_never_served_stale() -> None:
    cost = ReferenceCostModel()
    shape = Shape(1024, 1024, 1, 28)
    win = [("flux", shape)] * 5
    info = {"flux": MODELS["flux"]}
    before = demand_from_window(cost, info, win, 10.0)
    sec_before = cost.stage_seconds("flux", "diffuse", shape, 1)
    degs_before = efficient_degrees(cost, "flux", shape, 8, 0.8)
    best_before = best_degree(cost, "flux", shape, 8, 0.8)
    scaled = ScaledCostModel(cost, 1.0)
    assert best_degree(scaled, "flux", shape, 8, 0.8) == best_before

    cost.add_profile(_profile(sec_before / 28 * 10))  # ten times slower, only k = 1, 2
    fresh = ReferenceCostModel()
    fresh.add_profile(_profile(sec_before / 28 * 10))
    assert cost.stage_seconds("flux", "diffuse", shape, 1) == pytest.approx(
        sec_before * 10, rel=1e-9
    )
    assert cost.stage_seconds("flux", "diffuse", shape, 1) == fresh.stage_seconds(
        "flux", "diffuse", shape, 1
    )
    assert efficient_degrees(cost, "flux", shape, 8, 0.8) == (
        efficient_degrees(fresh, "flux", shape, 8, 0.8)
    )
    assert best_degree(cost, "flux", shape, 8, 0.8) == best_degree(fresh, "flux", shape, 8, 0.8)
    after = demand_from_window(cost, info, win, 10.0)
    assert after == demand_from_window(fresh, info, win, 10.0)
    assert after["flux"]["diffuse"] != before["flux"]["diffuse"]
    assert degs_before != efficient_degrees(cost, "flux", shape, 8, 0.8) or (
        best_before != best_degree(cost, "flux", shape, 8, 0.8)
    )
    # The scaled model over it sees the change too.
    assert best_degree(scaled, "flux", shape, 8, 0.8) == best_degree(fresh, "flux", shape, 8, 0.8)


def test_scaled_model_factor_change_is_not_stale() -> None:
    base = ReferenceCostModel()
    shape = Shape(1024, 1024, 1, 28)
    scaled = ScaledCostModel(base, 1.0)
    win = [("flux", shape)] * 3
    info = {"flux": MODELS["flux"]}
    one = demand_from_window(scaled, info, win, 10.0)
    scaled.factor = 3.0
    three = demand_from_window(scaled, info, win, 10.0)
    assert three == demand_from_window(ScaledCostModel(base, 3.0), info, win, 10.0)
    assert three["flux"]["encode"] == pytest.approx(one["flux"]["encode"] * 3.0, rel=1e-12)
    scaled.factor = 0.0  # zero-time stages: only degree 1 is "efficient"
    assert efficient_degrees(scaled, "flux", shape, 8, 0.8) == (1,)
    scaled.base = ReferenceCostModel()
    scaled.factor = 1.0
    assert demand_from_window(scaled, info, win, 10.0) == one
