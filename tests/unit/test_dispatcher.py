"""Dispatcher: exhaustive agreement, validity properties, fallback."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trident.sched.cost import load_cost_model
from trident.sched.dispatcher import DeviceView, DispatchConfig, Dispatcher, QueueItem
from trident.sched.types import STAGES, Shape

pytestmark = pytest.mark.timeout(60)

COST = load_cost_model([])
GB = 10**9
EDC = frozenset(STAGES)


def _state(
    seed: int, n_dev: int = 4, n_req: int = 6, mixed: bool = True
) -> tuple[list[QueueItem], list[DeviceView]]:
    rng = random.Random(seed)
    devs = []
    for i in range(n_dev):
        holds = EDC
        if mixed and rng.random() < 0.4:
            holds = rng.choice(
                [
                    frozenset(("diffuse", "decode")),
                    frozenset(("diffuse",)),
                    frozenset(("encode",)),
                    frozenset(("decode",)),
                ]
            )
        devs.append(
            DeviceView(
                f"n0/sim:{i}",
                "n0",
                i,
                rng.choice([1.0, 1.0, 2.0]),
                rng.choice([0.0, 0.0, 1.0, 5.0]),
                rng.choice([10 * GB, 20 * GB]),
                {"flux": holds},
            )
        )
    items = []
    for r in range(n_req):
        s = rng.choice([512, 1024, 2048])
        shape = Shape(s, s, 1, rng.choice([4, 28]))
        base = COST.standalone_seconds("flux", shape, 1)
        arr = -rng.uniform(0, base)
        items.append(
            QueueItem(
                f"r{r}",
                "flux",
                "flux",
                shape,
                arr,
                arr + rng.uniform(0.5, 3.0) * base,
                rng.choice(["encode", "diffuse"]),
                rng.choice([None, "n0/sim:0"]),
            )
        )
    return items, devs


def _exhaustive(d: Dispatcher, items: list[QueueItem], devs: list[DeviceView]) -> float:
    queue = sorted(
        (i for i in items if i.next_stage != "decode"), key=lambda i: d.window_key(i, 0.0)
    )
    cands = d.candidates(queue, {v.device_id: v for v in devs}, 0.0)
    by_req: dict[str, list] = {}
    for c in cands:
        by_req.setdefault(c.item.request_id, []).append(c)
    best = 0.0
    for combo in itertools.product(*[[None, *cs] for cs in by_req.values()]):
        used: set[str] = set()
        ok, w = True, 0.0
        for c in combo:
            if c is None:
                continue
            devset = set(c.group) | set(c.devices)
            if used & devset:
                ok = False
                break
            used |= devset
            w += c.weight
        if ok:
            best = max(best, w)
    return best


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_mip_matches_exhaustive(solver: str) -> None:
    d = Dispatcher(COST, DispatchConfig(solver=solver, max_nodes=100_000, lookahead_s=10.0))  # type: ignore[arg-type]
    for seed in range(12):
        items, devs = _state(seed)
        res = d.solve(items, devs, 0.0)
        assert res.reason in ("optimal", "trivial", "empty")
        assert res.objective == pytest.approx(_exhaustive(d, items, devs), abs=1e-6), seed


def _check_valid(res_assign: list, devs: list[DeviceView], items: list[QueueItem]) -> None:
    view = {v.device_id: v for v in devs}
    item = {i.request_id: i for i in items}
    seen: set[str] = set()
    reqs: set[str] = set()
    for a in res_assign:
        assert a.request_id not in reqs
        reqs.add(a.request_id)
        devset = set(a.group) | set(a.devices)
        assert not (devset & seen), "a device assigned twice in one round"
        seen |= devset
        it = item[a.request_id]
        peak = COST.stage_peak_bytes("flux", "diffuse", it.shape, a.degree)
        assert all(view[g].free_memory >= peak for g in a.group), "memory exceeded"
        assert a.degree in COST.efficient_degrees("flux", it.shape)
        assert all("diffuse" in view[g].holds["flux"] for g in a.group)
        assert a.stages[0] == it.next_stage


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_dev=st.sampled_from([2, 4, 8]), n_req=st.integers(1, 10))
def test_plans_are_valid(seed: int, n_dev: int, n_req: int) -> None:
    items, devs = _state(seed, n_dev, n_req)
    d = Dispatcher(COST, DispatchConfig(max_nodes=100_000, lookahead_s=10.0))
    res = d.solve(items, devs, 0.0)
    _check_valid(res.assignments, devs, items)
    _check_valid(
        [
            c.assignment()
            for c in d.greedy(d.candidates(items, {v.device_id: v for v in devs}, 0.0))
        ],
        devs,
        items,
    )


def test_node_limit_keeps_the_greedy_plan_unless_the_incumbent_beats_it() -> None:
    items, devs = _state(3, n_dev=8, n_req=10, mixed=False)
    for v in devs:
        v.free_at = 0.0
    greedy = Dispatcher(COST, DispatchConfig(lookahead_s=10.0))
    g = greedy.greedy(greedy.candidates(items, {v.device_id: v for v in devs}, 0.0))
    d = Dispatcher(COST, DispatchConfig(max_nodes=0, lookahead_s=10.0))
    res = d.solve(items, devs, 0.0)
    assert res.reason in ("optimal", "feasible", "node_limit", "trivial"), res.reason
    assert res.assignments
    assert res.objective >= sum(c.weight for c in g) - 1e-9  # never worse than greedy
    _check_valid(res.assignments, devs, items)


def test_same_state_same_plan_whatever_the_clock() -> None:
    """Deterministic budgets: the plan does not depend on how fast the machine is."""
    items, devs = _state(5, n_dev=8, n_req=10)
    slow = iter(range(0, 10**9, 10**6))  # a clock that jumps 1e6 s per reading
    plans = [
        Dispatcher(COST, DispatchConfig(lookahead_s=10.0)).solve(
            items, devs, 0.0, clock=(lambda: float(next(slow))) if i else (lambda: 0.0)
        )
        for i in range(2)
    ]
    assert plans[0].assignments == plans[1].assignments
    assert (plans[0].solver, plans[0].reason) == (plans[1].solver, plans[1].reason)


def test_merges_and_follows() -> None:
    devs = [
        DeviceView("n0/sim:0", "n0", 0, 1.0, 0.0, 20 * GB, {"flux": frozenset(("diffuse",))}),
        DeviceView("n0/sim:1", "n0", 1, 1.0, 0.0, 20 * GB, {"flux": frozenset(("encode",))}),
        DeviceView("n0/sim:2", "n0", 2, 1.0, 0.0, 20 * GB, {"flux": EDC}),
        DeviceView("n0/sim:3", "n0", 3, 1.0, 0.0, 20 * GB, {"flux": frozenset(("decode",))}),
    ]
    it = QueueItem("a", "flux", "flux", Shape(512, 512, 1, 10), 0.0, 100.0, "encode")
    d = Dispatcher(COST)
    a = d.solve([it], devs, 0.0).assignments[0]
    # ⟨EDC⟩ device: the whole request merged into one task
    assert a.devices == ("n0/sim:2",) and a.stages == ("encode", "diffuse", "decode")
    devs[2].available = False
    a = d.solve([it], devs, 0.0).assignments[0]
    assert a.group == ("n0/sim:0",) and a.stages == ("encode",) and a.devices == ("n0/sim:1",)
    dec = QueueItem("b", "flux", "flux", Shape(512, 512, 1, 10), 0.0, 100.0, "decode", "n0/sim:0")
    f = d.follow_decode(dec, devs, 0.0)
    assert f is not None and f.devices == ("n0/sim:3",)


def test_inefficient_degree_when_no_efficient_one_fits_memory() -> None:
    # flux 512^2: only k=1 is efficient, its diffuse peak (2.13 GB) does not fit 1.9 GB
    # free; k=2 (1.56 GB per device) does: offered rather than waiting forever.
    sh = Shape(512, 512, 1, 28)
    devs = [
        DeviceView(f"n0/sim:{i}", "n0", i, 1.0, 0.0, int(1.9 * GB), {"flux": EDC}, True)
        for i in range(4)
    ]
    item = QueueItem("r", "flux", "flux", sh, 0.0, 1e9, "encode")
    res = Dispatcher(COST).solve([item], devs, 0.0)
    assert len(res.assignments) == 1 and res.assignments[0].degree == 2
    # with room for k=1, the efficient degree is used
    for d in devs:
        d.free_memory = 4 * GB
    res = Dispatcher(COST).solve([item], devs, 0.0)
    assert res.assignments[0].degree == 1


# ---------------------------------------------------------------- deadline-aware choices

COG = Shape(768, 432, 33, 50)


def _cog_view(i: int, free_at: float, node: str = "n0") -> DeviceView:
    return DeviceView(f"{node}/sim:{i}", node, i, 1.0, free_at, 30 * GB, {"cogvideox": EDC})


def _cog_item(rid: str, deadline: float, shape: Shape = COG, arrival: float = 0.0) -> QueueItem:
    return QueueItem(rid, "cogvideox", "cogvideox", shape, arrival, deadline, "encode")


def _cog_times(shape: Shape = COG) -> tuple[float, float, float]:
    enc = COST.stage_seconds("cogvideox", "encode", shape)
    dec = COST.stage_seconds("cogvideox", "decode", shape)
    return (
        enc + COST.stage_seconds("cogvideox", "diffuse", shape, 1) + dec,
        enc + COST.stage_seconds("cogvideox", "diffuse", shape, 2) + dec,
        enc + dec,
    )


def test_waits_for_an_on_time_pair_rather_than_a_certain_miss_now() -> None:
    t1, t2, _ = _cog_times()
    deadline = t2 + 20.0
    assert t1 > deadline  # degree 1 is late even with no queue
    d = Dispatcher(COST, DispatchConfig(use_mip=False))
    # device 1 frees in 10 s: the pair is on time then -> nothing is dispatched now
    res = d.solve([_cog_item("r", deadline)], [_cog_view(0, 0.0), _cog_view(1, 10.0)], 0.0)
    assert res.assignments == []
    # device 1 frees too late for any on-time option: the late single device is used
    res = d.solve([_cog_item("r", deadline)], [_cog_view(0, 0.0), _cog_view(1, 500.0)], 0.0)
    assert [a.degree for a in res.assignments] == [1] and not res.assignments[0].on_time


@pytest.mark.parametrize("use_mip", [False, True])
def test_idle_cluster_uses_the_fastest_efficient_degree(use_mip: bool) -> None:
    from trident.sched.cost import efficient_degrees

    shape = Shape(768, 1360, 81, 50)
    ks = efficient_degrees(COST, "cogvideox", shape, 8, 0.8)
    views = [  # two idle nodes: one request can take a whole node, half stays idle
        DeviceView(f"n{n}/sim:{i}", f"n{n}", i, 1.0, 0.0, 40 * GB, {"cogvideox": EDC})
        for n in range(2)
        for i in range(8)
    ]
    d = Dispatcher(COST, DispatchConfig(use_mip=use_mip, max_nodes=100_000))
    res = d.solve([_cog_item("r", 1e6, shape)], views, 0.0)
    assert [a.degree for a in res.assignments] == [max(ks)]
    # a busier round (more requests waiting) stays thrifty
    items = [_cog_item(f"r{i}", 1e6, shape) for i in range(3)]
    res = d.solve(items, views, 0.0)
    assert res.assignments and min(a.degree for a in res.assignments) < max(ks)


def test_requests_that_can_still_make_it_come_before_hopeless_ones() -> None:
    t1, _, _ = _cog_times()
    d = Dispatcher(COST, DispatchConfig(use_mip=False))
    hopeless = _cog_item("late", 10.0, arrival=-100.0)  # its deadline cannot be met
    ok = _cog_item("ok", t1 + 50.0, arrival=0.0)
    assert d.hopeless(hopeless, 0.0) and not d.hopeless(ok, 0.0)
    assert sorted([hopeless, ok], key=lambda i: d.window_key(i, 0.0))[0] is ok
    # one device: the request that can still make its deadline gets it
    res = d.solve([hopeless, ok], [_cog_view(0, 0.0)], 0.0)
    assert [a.request_id for a in res.assignments] == ["ok"]
    # hopeless ones shortest first
    long_shape = Shape(768, 1360, 33, 50)
    h2 = _cog_item("late-long", 10.0, long_shape, arrival=-200.0)
    assert sorted([h2, hopeless], key=lambda i: d.window_key(i, 0.0))[0] is hopeless


@pytest.mark.parametrize("use_mip", [False, True])
def test_a_request_whose_on_time_group_is_taken_waits_rather_than_take_a_late_leftover(
    use_mip: bool,
) -> None:
    t1, t2, _ = _cog_times()
    first, second = _cog_item("first", t2 + 15.0), _cog_item("second", t2 + 20.0)
    assert t1 > second.deadline  # degree 1 is late even with no queue
    # Devices 0-2 idle, 3 frees in 10 s: "first" takes the idle pair; "second" could
    # still be on time on (2, 3) then, so it must not run late on device 2 alone now.
    views = [_cog_view(0, 0.0), _cog_view(1, 0.0), _cog_view(2, 0.0), _cog_view(3, 10.0)]
    res = Dispatcher(COST, DispatchConfig(use_mip=use_mip)).solve([first, second], views, 0.0)
    assert [(a.request_id, a.degree, a.on_time) for a in res.assignments] == [("first", 2, True)]
    # The same round with the late leftover allowed (the behaviour before): device 2
    # serves "second" at degree 1, certain to miss its deadline.
    cfg = DispatchConfig(use_mip=use_mip, drop_late_if_on_time=False)
    res = Dispatcher(COST, cfg).solve([first, second], views, 0.0)
    got = sorted((a.request_id, a.degree, a.on_time) for a in res.assignments)
    assert got == [("first", 2, True), ("second", 1, False)]


@pytest.mark.parametrize("use_mip", [False, True])
def test_a_wide_request_waiting_for_its_group_holds_it_others_only_backfill(
    use_mip: bool,
) -> None:
    t1, t2, _ = _cog_times()
    wide = _cog_item("wide", t2 + 20.0)  # only degree 2 is on time: it waits for (0, 1)
    assert t1 > wide.deadline
    narrow = _cog_item("narrow", 1e6, Shape(768, 432, 17, 50))  # ~65 s at degree 1
    short = _cog_item("short", 1e6, Shape(768, 432, 17, 1))  # a few seconds
    views = [_cog_view(0, 0.0), _cog_view(1, 10.0)]  # device 1 frees in 10 s
    cfg = DispatchConfig(use_mip=use_mip)
    # Held: the narrow request would still run on device 0 when the pair frees.
    res = Dispatcher(COST, cfg).solve([wide, narrow], views, 0.0)
    assert res.assignments == []
    # A request done before the pair frees backfills device 0.
    res = Dispatcher(COST, cfg).solve([wide, short], views, 0.0)
    assert [(a.request_id, a.devices) for a in res.assignments] == [("short", ("n0/sim:0",))]
    assert res.assignments[0].task_end <= 10.0
    # The hold lasts across rounds: 5 s later the narrow request is still kept off.
    d = Dispatcher(COST, cfg)
    d.solve([wide], views, 0.0)
    res = d.solve([wide, narrow], [_cog_view(0, 5.0), _cog_view(1, 10.0)], 5.0)
    assert res.assignments == []
    # Without holds (the behaviour before) the narrow request takes device 0 at once,
    # and the wide one waits a whole narrow run for its pair.
    res = Dispatcher(COST, DispatchConfig(use_mip=use_mip, max_holds=0)).solve(
        [wide, narrow], views, 0.0
    )
    assert [a.request_id for a in res.assignments] == ["narrow"]
