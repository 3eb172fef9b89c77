"""The discrete-event simulator: exact timings on a hand-computed scenario, memory,
faults, determinism."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from trident.sched.types import (
    Command,
    CompleteRequest,
    Event,
    FailRequest,
    InputRef,
    ModelInfo,
    RequestArrived,
    RequestSpec,
    RunTask,
    Shape,
    Stage,
    StageLoaded,
    StageUnloaded,
    TaskFailed,
    TaskFinished,
    TaskStarted,
)
from trident.sim.engine import GIB, ClusterSpec, DeviceFault, SimConfig, simulate
from trident.sim.metrics import summarize

pytestmark = pytest.mark.timeout(60)

D0, D1 = "n0/sim:0", "n0/sim:1"


class FixedCost:
    """encode 1 s, diffuse 10 s (6 s at degree 2), decode 2 s; 1 GiB weights per stage;
    loads 0.5 s from the node cache, 0.25 s from a peer; 1 GB/s within a node."""

    def stage_seconds(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> float:
        if stage == "diffuse":
            return {1: 10.0, 2: 6.0}.get(degree, 4.0)
        return {"encode": 1.0, "decode": 2.0}[stage]

    def stage_peak_bytes(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> int:
        return shape.height * shape.width  # 1 byte per pixel: tests pick huge shapes to OOM

    def weight_bytes(self, family: str, stage: Stage) -> int:
        return GIB

    def output_bytes(self, family: str, stage: Stage, shape: Shape) -> int:
        return {"encode": 100_000_000, "diffuse": 2_000_000_000, "decode": 5}[stage]

    def transfer_seconds(self, nbytes: int, same_node: bool) -> float:
        return nbytes / (1e9 if same_node else 0.5e9)

    def load_seconds(self, family: str, stage: Stage, source: str) -> float:
        return 0.25 if source == "peer" else 0.5


class ScriptedPolicy:
    """Runs each request's tasks from a fixed script, one after the other: stage-level
    dispatch with explicit devices. Retries a task once after a retryable failure."""

    name = "scripted"

    def __init__(self, script: Mapping[str, Sequence[tuple[tuple[Stage, ...], tuple[str, ...]]]]):
        self.script = script
        self.reqs: dict[str, RequestSpec] = {}
        self.step: dict[str, int] = {}
        self.task_req: dict[str, str] = {}
        self.last_output: dict[str, InputRef | None] = {}
        self.seq = 0
        self.seen: list[tuple[float, Event]] = []

    def _send(self, rid: str) -> RunTask:
        stages, devices = self.script[rid][self.step[rid]]
        self.seq += 1
        tid = f"{rid}.{self.seq}"
        self.task_req[tid] = rid
        ref = self.last_output[rid]
        return RunTask(
            task_id=tid,
            request_id=rid,
            model=self.reqs[rid].model,
            stages=stages,
            devices=devices,
            inputs=(ref,) if ref is not None else (),
            final=self.step[rid] == len(self.script[rid]) - 1,
        )

    def handle(self, event: Event, now: float) -> list[Command]:
        self.seen.append((now, event))
        if isinstance(event, RequestArrived):
            rid = event.request.request_id
            self.reqs[rid] = event.request
            self.step[rid] = 0
            self.last_output[rid] = None
            return [self._send(rid)]
        if isinstance(event, TaskFinished):
            rid = self.task_req[event.task_id]
            _stages, devices = self.script[rid][self.step[rid]]
            self.step[rid] += 1
            if self.step[rid] == len(self.script[rid]):
                return [CompleteRequest(rid, timings={}, devices={})]
            self.last_output[rid] = InputRef(event.task_id, devices[0])
            return [self._send(rid)]
        if isinstance(event, TaskFailed):
            rid = self.task_req[event.task_id]
            if event.retryable and self.seq < 50:
                return [self._send(rid)]
            return [FailRequest(rid, event.error, event.message)]
        return []


MODELS = {"m": ModelInfo(name="m", family="fam")}


def _spec(rid: str, t: float, size: int = 64) -> RequestSpec:
    return RequestSpec(request_id=rid, model="m", shape=Shape(size, size), arrival=t, slo_s=20.0)


def _hand_scenario() -> tuple[ScriptedPolicy, list[RequestSpec]]:
    script = {
        "r0": [(("encode",), (D0,)), (("diffuse", "decode"), (D0, D1))],
        "r1": [(("encode",), (D1,)), (("diffuse",), (D1,)), (("decode",), (D0,))],
        "r2": [(("encode", "diffuse", "decode"), (D0,))],
    }
    reqs = [_spec("r0", 0.0), _spec("r1", 1.0), _spec("r2", 2.0)]
    return ScriptedPolicy(script), reqs  # type: ignore[arg-type]


def test_hand_computed_scenario_is_reproduced_exactly() -> None:
    # Worked by hand (see the comments): FIFO per device, degree-2 waits for both
    # devices, loads on demand (peer vs node cache), transfers overlap with other work.
    policy, reqs = _hand_scenario()
    res = simulate(
        policy,
        FixedCost(),
        MODELS,
        ClusterSpec(1, 2, memory_bytes=100 * GIB),
        reqs,
        SimConfig(tick_s=0),
    )
    lat = {r.request_id: r.latency for r in res.records}
    # r0.enc on d0: load encode 0.5 (disk) + 1 -> 1.5. r0.dd on (d0, d1) waits for
    # d1 to finish r1.enc (t=1 + 0.25 peer load + 1 = 2.25); loads diffuse+decode on both
    # (1.0) -> 3.25; diffuse k=2 6 + decode 2 -> 11.25.
    assert lat["r0"] == pytest.approx(11.25)
    # r2 (whole pipeline) queued on d0 behind r0.dd: all stages resident: 13 s -> 24.25.
    assert lat["r2"] == pytest.approx(24.25 - 2.0)
    # r1.dif on d1 after r0.dd: 11.25 + 10 = 21.25; its 2 GB output moves to d0 in 2 s
    # (arrives 23.25, while d0 runs r2); r1.dec starts at 24.25, ends 26.25.
    assert lat["r1"] == pytest.approx(26.25 - 1.0)
    assert [r.met_slo for r in res.records] == [True, False, False]

    fin = {ev.task_id: ev for _t, ev in policy.seen if isinstance(ev, TaskFinished)}
    assert fin["r1.6"].transfer_seconds == pytest.approx(2.0)  # r1.dec
    assert fin["r1.6"].load_seconds == 0.0
    assert fin["r0.3"].load_seconds == pytest.approx(1.0)
    assert dict(fin["r0.3"].stage_seconds) == {"diffuse": 6.0, "decode": 2.0}
    starts = {ev.task_id: t for t, ev in policy.seen if isinstance(ev, TaskStarted)}
    assert starts == pytest.approx(
        {"r0.1": 0.5, "r1.2": 1.25, "r0.3": 3.25, "r2.4": 11.25, "r1.5": 11.25, "r1.6": 24.25}
    )
    loaded = [
        (t, ev.device_id, ev.stage, ev.source)
        for t, ev in policy.seen
        if isinstance(ev, StageLoaded)
    ]
    assert (1.25, D1, "encode", "peer") in loaded
    assert (0.5, D0, "encode", "disk") in loaded  # the first load on a node reads disk
    assert res.stats["stuck_tasks"] == 0
    s = summarize(res)
    assert (s.completed, s.failed, s.oom) == (3, 0, 0)
    assert s.slo_attainment == pytest.approx(1 / 3)


def test_out_of_memory_fails_the_request() -> None:
    script = {
        "big": [(("encode", "diffuse", "decode"), (D0,))],
        "ok": [(("encode", "diffuse", "decode"), (D1,))],
    }
    policy = ScriptedPolicy(script)  # type: ignore[arg-type]
    # 3 GiB of weights + a 2 GiB activation on a 4 GiB device: out of memory.
    reqs = [_spec("big", 0.0, size=46341), _spec("ok", 0.0)]
    res = simulate(
        policy,
        FixedCost(),
        MODELS,
        ClusterSpec(1, 2, memory_bytes=4 * GIB),
        reqs,
        SimConfig(tick_s=0),
    )
    by = {r.request_id: r for r in res.records}
    assert by["big"].status == "failed" and by["big"].error == "out_of_memory"
    assert by["ok"].status == "completed"
    s = summarize(res)
    assert (s.completed, s.failed, s.oom, s.oom_tasks) == (1, 1, 1, 1)


def test_lru_eviction_makes_room_for_a_new_stage() -> None:
    # 2.5 GiB device: encode + diffuse fit, then decode needs one evicted.
    script = {"r": [(("encode",), (D0,)), (("diffuse",), (D0,)), (("decode",), (D0,))]}
    policy = ScriptedPolicy(script)  # type: ignore[arg-type]
    res = simulate(
        policy,
        FixedCost(),
        MODELS,
        ClusterSpec(1, 1, memory_bytes=int(2.5 * GIB)),
        [_spec("r", 0.0)],
        SimConfig(tick_s=0),
    )
    assert res.records[0].status == "completed"
    assert res.stats["evictions"] == 1
    unloaded = [ev for _t, ev in policy.seen if isinstance(ev, StageUnloaded)]
    assert [(ev.device_id, ev.stage) for ev in unloaded] == [(D0, "encode")]


def test_device_lost_fails_tasks_waiting_for_its_output() -> None:
    # r's encode output lives on d0; d0 dies before the decode... the diffuse task on d1
    # (sent when encode finished, input still in flight) fails retryably.
    script = {"r": [(("encode",), (D0,)), (("diffuse", "decode"), (D1,))]}
    policy = ScriptedPolicy(script)  # type: ignore[arg-type]
    cfg = SimConfig(tick_s=0, faults=(DeviceFault(1.55, device_id=D0),))

    class SlowLink(FixedCost):
        def transfer_seconds(self, nbytes: int, same_node: bool) -> float:
            return 1.0

    res = simulate(
        policy,
        SlowLink(),
        MODELS,
        ClusterSpec(1, 2, memory_bytes=100 * GIB),
        [_spec("r", 0.0)],
        cfg,
    )
    failed = [ev for _t, ev in policy.seen if isinstance(ev, TaskFailed)]
    assert failed and failed[0].retryable
    assert res.records[0].status in ("failed", "completed")  # the script retries blindly
    assert res.stats["stuck_tasks"] == 0


def _flux_run(seed: int, noise: float) -> list[tuple[str, str, float | None]]:
    from trident.sched.core import CoreConfig, FifoPolicy
    from trident.sched.cost import load_cost_model
    from trident.sim.traces import make_trace, to_request_specs

    cost = load_cost_model([])
    models = {"flux": ModelInfo(name="flux", family="flux")}
    trace = make_trace("flux", rate=4.0, duration_s=30, seed=seed, arrival="poisson")
    reqs = to_request_specs(trace, slo_for=lambda r, m: 30.0)
    res = simulate(
        FifoPolicy(models, cost, CoreConfig()),
        cost,
        models,
        ClusterSpec(2, 4),
        reqs,
        SimConfig(
            seed=seed, noise=noise, faults=(DeviceFault(5.0, "n1/sim:2", restart_after_s=3.0),)
        ),
    )
    assert res.stats["stuck_tasks"] == 0
    return [(r.request_id, r.status, r.latency) for r in res.records]


def test_same_seed_same_result_and_noise_changes_it() -> None:
    a = _flux_run(1, 0.2)
    assert a == _flux_run(1, 0.2)
    assert all(status == "completed" for _rid, status, _lat in a)
    assert a != _flux_run(2, 0.2)
    b = _flux_run(1, 0.0)
    assert [x[2] for x in a] != [x[2] for x in b]


def test_device_loss_with_restart_completes_every_request_under_the_fifo_core() -> None:
    from trident.sched.core import CoreConfig, FifoPolicy
    from trident.sched.cost import load_cost_model
    from trident.sim.traces import make_trace, to_request_specs

    cost = load_cost_model([])
    models = {"flux": ModelInfo(name="flux", family="flux")}
    trace = make_trace("flux", rate=2.0, duration_s=60, seed=3)
    reqs = to_request_specs(trace, slo_for=lambda r, m: 60.0)
    faults = tuple(
        DeviceFault(t, f"n0/sim:{i}", restart_after_s=5.0)
        for t, i in ((3.0, 0), (7.0, 1), (12.0, 0))
    )
    res = simulate(
        FifoPolicy(models, cost, CoreConfig()),
        cost,
        models,
        ClusterSpec(1, 4),
        reqs,
        SimConfig(faults=faults),
    )
    s = summarize(res)
    assert s.requests == len(reqs)
    assert s.completed + s.failed == s.requests
    assert s.unfinished == 0
    assert res.log_events.get("stage.rerun", 0) >= 1


def test_losing_one_device_of_an_instance_frees_the_others() -> None:
    # r0 runs diffuse at degree 2 on (d0, d1); d1 dies mid-run. d0 must move on to r1.
    script = {
        "r0": [(("diffuse",), (D0, D1))],
        "r1": [(("diffuse",), (D0,))],
    }
    policy = ScriptedPolicy(script)  # type: ignore[arg-type]
    cfg = SimConfig(tick_s=0, faults=(DeviceFault(3.0, device_id=D1),))
    res = simulate(
        policy,
        FixedCost(),
        MODELS,
        ClusterSpec(1, 2, memory_bytes=100 * GIB),
        [_spec("r0", 0.0), _spec("r1", 0.1)],
        cfg,
    )
    by = {r.request_id: r for r in res.records}
    assert by["r0"].status == "unfinished"  # the script ignores DeviceLost
    # r1 starts when d1 is lost (t=3; diffuse already resident on d0) and takes 10 s.
    assert by["r1"].finish == pytest.approx(13.0)
    assert summarize(res).errors == {"unfinished": 1}


class PipelinedPolicy:
    """Sends both tasks of a request on arrival: the second's input does not exist yet."""

    name = "pipelined"

    def handle(self, event: Event, now: float) -> list[Command]:
        if isinstance(event, RequestArrived):
            rid = event.request.request_id
            return [
                RunTask(f"{rid}.a", rid, "m", ("encode",), (D0,)),
                RunTask(
                    f"{rid}.b",
                    rid,
                    "m",
                    ("diffuse", "decode"),
                    (D1,),
                    inputs=(InputRef(f"{rid}.a", D0),),
                    final=True,
                ),
            ]
        if isinstance(event, TaskFinished) and event.task_id.endswith(".b"):
            return [CompleteRequest(event.task_id[:-2], timings={}, devices={})]
        return []


def test_input_sent_before_it_exists_is_pushed_when_produced() -> None:
    res = simulate(
        PipelinedPolicy(),
        FixedCost(),
        MODELS,
        ClusterSpec(1, 2, memory_bytes=100 * GIB),
        [_spec("r", 0.0)],
        SimConfig(tick_s=0),
    )
    # encode: 0.5 load + 1 -> 1.5; 100 MB at 1 GB/s -> 1.6; load diffuse+decode 1.0,
    # compute 10 + 2 -> 14.6.
    assert res.records[0].latency == pytest.approx(14.6)
