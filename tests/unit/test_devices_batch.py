"""Batched tasks below the daemons: the executors' ``run_batch`` and the ``run_batch``
wire message."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest

from trident.errors import ProtocolError
from trident.runtime import protocol
from trident.runtime.devices import Executor, OutOfMemory, SimExecutor, StageError, TaskResult
from trident.sched.cost import batch_peak_bytes, batch_stage_seconds, load_cost_model
from trident.sched.types import Shape

pytestmark = pytest.mark.timeout(60)

MODELS = {"flux": {"family": "flux", "path": None}}
SHAPE = Shape(256, 256, 1, 4)
STAGES = ("encode", "diffuse", "decode")


def params(i: int = 0, **over: Any) -> dict[str, Any]:
    p: dict[str, Any] = dict(
        prompt=f"p{i}", seed=i, height=256, width=256, num_frames=1, num_inference_steps=4
    )
    p.update(over)
    return p


def sim(memory_gb: float = 80.0, time_scale: float = 0.0) -> SimExecutor:
    ex = SimExecutor(MODELS, int(memory_gb * (1 << 30)), time_scale=0.0)
    for stage in STAGES:
        ex.load("flux", stage)  # resident (instantly): no load sleeps in what follows
    ex.time_scale = time_scale
    return ex


# --------------------------------------------------------------------------- sim timing


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_sim_batch_plans_one_call_priced_by_the_batched_cost(batch: int) -> None:
    cost = load_cost_model()
    ex = sim(time_scale=0.5)
    _, sleeps, shape, _ = ex._prepare("flux", STAGES, params(), {"degree": 1}, batch=batch)
    planned = dict((s, secs) for s, secs in sleeps if s is not None)
    assert shape == SHAPE
    # encode and decode: member by member; diffuse: the cost model's batched call
    assert planned["encode"] == pytest.approx(
        batch * cost.stage_seconds("flux", "encode", SHAPE) * 0.5
    )
    assert planned["decode"] == pytest.approx(
        batch * cost.stage_seconds("flux", "decode", SHAPE) * 0.5
    )
    assert planned["diffuse"] == pytest.approx(
        batch_stage_seconds(cost, "flux", "diffuse", SHAPE, 1, batch) * 0.5
    )
    if batch > 1:  # cheaper than separate calls: the point of batching
        assert planned["diffuse"] < batch * cost.stage_seconds("flux", "diffuse", SHAPE) * 0.5


def test_sim_run_batch_sleeps_once_and_every_member_gets_the_calls_times() -> None:
    cost = load_cost_model()
    scale = 0.1
    ex = sim(time_scale=scale)
    n = 4
    t0 = time.perf_counter()
    results = ex.run_batch("flux", STAGES, [{}] * n, [params(i) for i in range(n)], {"degree": 1})
    wall = time.perf_counter() - t0
    assert len(results) == n
    want = scale * sum(batch_stage_seconds(cost, "flux", s, SHAPE, 1, n) for s in STAGES)  # type: ignore[arg-type]
    separate = scale * n * sum(cost.stage_seconds("flux", s, SHAPE) for s in STAGES)  # type: ignore[arg-type]
    assert want <= wall < separate, (want, wall, separate)
    first = results[0]
    assert isinstance(first, TaskResult)
    for r in results:
        assert isinstance(r, TaskResult)
        assert r.stage_seconds == first.stage_seconds  # one call, the same seconds for all
        assert r.outputs["output"].shape == (4, 4, 3)  # the final layout, scaled down
        assert r.outputs["output"] is not first.outputs["output"] or r is first
    assert (
        first.stage_seconds["diffuse"]
        >= scale * batch_stage_seconds(cost, "flux", "diffuse", SHAPE, 1, n) * 0.9
    )


def test_sim_batch_reports_its_loads_on_every_member() -> None:
    ex = SimExecutor(MODELS, 80 << 30, time_scale=0.0)
    results = ex.run_batch(
        "flux",
        ("encode",),
        [{}, {}],
        [params(0), params(1)],
        {"degree": 1, "load_sources": {"encode": "disk"}},
    )
    assert all(isinstance(r, TaskResult) for r in results)
    for r in results:
        assert isinstance(r, TaskResult)
        assert [(m, s, src) for m, s, _, src in r.loaded] == [("flux", "encode", "disk")]
    assert ("flux", "encode") in ex.resident


# --------------------------------------------------------------------------- sim memory


def test_sim_batch_accounts_the_batched_peak_and_fails_a_batch_that_does_not_fit() -> None:
    cost = load_cost_model()
    weights = sum(cost.weight_bytes("flux", s) for s in STAGES)  # type: ignore[arg-type]
    peak2 = batch_peak_bytes(cost, "flux", "diffuse", SHAPE, 1, 2)
    peak3 = batch_peak_bytes(cost, "flux", "diffuse", SHAPE, 1, 3)
    assert peak3 > peak2
    ex = sim(memory_gb=(weights + peak2) / (1 << 30))
    two = ex.run_batch("flux", STAGES, [{}, {}], [params(0), params(1)], {"degree": 1})
    assert all(isinstance(r, TaskResult) for r in two)
    # The whole batch's activations do not fit: the call fails (every member with it).
    with pytest.raises(OutOfMemory):
        ex.run_batch("flux", STAGES, [{}] * 3, [params(i) for i in range(3)], {"degree": 1})
    # ...while each member alone would have fitted.
    assert isinstance(ex.run("flux", STAGES, {}, params(0), {"degree": 1}), TaskResult)


def test_sim_batch_evicts_stages_it_does_not_need_to_fit() -> None:
    cost = load_cost_model()
    need = cost.weight_bytes("flux", "diffuse") + batch_peak_bytes(
        cost, "flux", "diffuse", SHAPE, 1, 4
    )
    ex = sim(memory_gb=(need + (1 << 20)) / (1 << 30))  # only diffuse's weights + the batch
    results = ex.run_batch(
        "flux", ("diffuse",), [{}] * 4, [params(i) for i in range(4)], {"degree": 1}
    )
    evicted = {e for r in results if isinstance(r, TaskResult) for e in r.evicted}
    assert evicted == {("flux", "encode")} or evicted == {("flux", "encode"), ("flux", "decode")}
    assert ("flux", "diffuse") in ex.resident


# --------------------------------------------------------------------------- isolation


def test_sim_batch_member_with_bad_or_different_shape_fails_alone() -> None:
    ex = sim()
    results = ex.run_batch(
        "flux",
        ("diffuse",),
        [{}] * 4,
        [params(0), params(1, height="tall"), params(2, width=512), params(3)],
        {"degree": 1},
    )
    assert isinstance(results[0], TaskResult) and isinstance(results[3], TaskResult)
    assert isinstance(results[1], StageError) and "shape" in str(results[1])
    assert isinstance(results[2], StageError) and "differs" in str(results[2])


def test_sim_batch_refuses_degree_k_and_mismatched_lists() -> None:
    ex = sim()
    with pytest.raises(StageError, match="degree 1"):
        ex.run_batch("flux", ("diffuse",), [{}], [params()], {"degree": 2}, parallel=object())
    with pytest.raises(ValueError, match="one inputs and one params"):
        ex.run_batch("flux", ("diffuse",), [{}], [params(0), params(1)], {"degree": 1})


class _OneByOne(Executor):
    """The base executor's run_batch over a run that fails for one member."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: Mapping[str, Any] | None,
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        parallel: Any | None = None,
    ) -> TaskResult:
        self.calls.append(str(params["prompt"]))
        if params["prompt"] == "bad":
            raise StageError("bad prompt")
        return TaskResult(
            outputs={"x": np.array([len(self.calls)])}, stage_seconds={s: 0.0 for s in stages}
        )


def test_base_run_batch_runs_members_one_by_one_and_isolates_failures() -> None:
    ex = _OneByOne()
    results = ex.run_batch(
        "m", ("encode",), [{}, {}, {}], [{"prompt": "a"}, {"prompt": "bad"}, {"prompt": "c"}], {}
    )
    assert ex.calls == ["a", "bad", "c"]
    assert isinstance(results[0], TaskResult) and isinstance(results[2], TaskResult)
    assert isinstance(results[1], StageError)


# --------------------------------------------------------------------------- torch fallback


class _FakePipe:
    """A pipeline whose batched call fails for a poisoned member's batch."""

    def __init__(self, batched: bool = True) -> None:
        self.batched_calls: list[tuple[str, int]] = []
        self.single_calls: list[tuple[str, str]] = []
        if not batched:
            self.run_batch = None  # type: ignore[assignment]

    def loaded(self) -> set[str]:
        return set(STAGES)

    def load(self, stage: str) -> float:
        return 0.0

    def run_batch(  # type: ignore[no-redef]
        self,
        stage: str,
        inputs: list[Any],
        params: list[Mapping[str, Any]],
        options: Any = None,
        parallel: Any = None,
    ) -> list[dict[str, Any]]:
        self.batched_calls.append((stage, len(params)))
        if stage == "diffuse" and any(p["prompt"] == "poison" for p in params):
            raise ValueError("cannot batch this")
        if stage == "diffuse" and len(params) > 2:
            raise OutOfMemory("the batch does not fit")  # each member alone does
        return [{"t": np.array([i]), "stage": stage} for i in range(len(params))]  # type: ignore[dict-item]

    def run(
        self,
        stage: str,
        inputs: Any,
        params: Mapping[str, Any],
        options: Any = None,
        parallel: Any = None,
    ) -> dict[str, Any]:
        self.single_calls.append((stage, str(params["prompt"])))
        if params["prompt"] == "poison":
            raise ValueError("poisoned")
        return {"t": np.array([0]), "stage": stage}  # type: ignore[dict-item]


def _torch_executor(pipe: _FakePipe) -> Any:
    pytest.importorskip("torch")
    from trident.runtime.devices import TorchExecutor

    ex = TorchExecutor({"m": {"family": "flux", "path": "/nowhere"}}, "cpu")
    ex.pipes["m"] = pipe
    return ex


def test_torch_run_batch_batches_each_stage_in_one_call() -> None:
    pipe = _FakePipe()
    ex = _torch_executor(pipe)
    results = ex.run_batch("m", STAGES, [{}, {}], [{"prompt": "a"}, {"prompt": "b"}], {})
    assert pipe.batched_calls == [("encode", 2), ("diffuse", 2), ("decode", 2)]
    assert pipe.single_calls == []
    assert all(isinstance(r, TaskResult) and set(r.stage_seconds) == set(STAGES) for r in results)
    assert [int(r.outputs["t"][0]) for r in results] == [0, 1]


def test_torch_run_batch_falls_back_to_one_by_one_so_one_bad_member_fails_alone() -> None:
    pipe = _FakePipe()
    ex = _torch_executor(pipe)
    results = ex.run_batch(
        "m", STAGES, [{}, {}, {}], [{"prompt": "a"}, {"prompt": "poison"}, {"prompt": "c"}], {}
    )
    # encode batched; diffuse's batched call failed, so the members went on alone
    assert pipe.batched_calls == [("encode", 3), ("diffuse", 3)]
    assert ("diffuse", "a") in pipe.single_calls and ("decode", "c") in pipe.single_calls
    assert isinstance(results[0], TaskResult) and isinstance(results[2], TaskResult)
    assert isinstance(results[1], ValueError)
    assert set(results[0].stage_seconds) == set(STAGES)


def test_torch_run_batch_that_does_not_fit_runs_its_members_one_by_one() -> None:
    pipe = _FakePipe()
    ex = _torch_executor(pipe)
    results = ex.run_batch("m", STAGES, [{}, {}, {}], [{"prompt": p} for p in "abc"], {})
    assert pipe.batched_calls == [("encode", 3), ("diffuse", 3)]
    assert [c for c in pipe.single_calls if c[0] == "diffuse"] == [("diffuse", p) for p in "abc"]
    assert all(isinstance(r, TaskResult) for r in results)


def test_torch_run_batch_without_adapter_support_runs_one_by_one() -> None:
    pipe = _FakePipe(batched=False)
    ex = _torch_executor(pipe)
    results = ex.run_batch(
        "m", ("encode", "diffuse"), [{}, {}], [{"prompt": "a"}, {"prompt": "b"}], {}
    )
    assert pipe.single_calls == [
        ("encode", "a"),
        ("diffuse", "a"),
        ("encode", "b"),
        ("diffuse", "b"),
    ]
    assert all(isinstance(r, TaskResult) for r in results)


# --------------------------------------------------------------------------- wire


def _member(i: int, **over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "task_id": f"r{i}.dif.{i}",
        "request_id": f"r{i}",
        "final": False,
        "params": params(i),
        "inputs": [{"key": f"r{i}.enc.0", "device_id": "n/sim:0", "addr": "tcp://127.0.0.1:1"}],
    }
    m.update(over)
    return m


def test_run_batch_round_trips() -> None:
    members = [_member(0), _member(1, final=True)]
    raw = msgpack.packb(
        {
            "t": "run_batch",
            "batch_id": "batch-7",
            "model": "flux",
            "stages": ["diffuse"],
            "devices": ["n/sim:0"],
            "rank": 0,
            "members": members,
            "options": {"load_sources": {"diffuse": "disk"}},
            "leader_addr": "tcp://x",
            "group": None,
        }
    )
    decoded, frames = protocol.decode([raw], protocol.SCHEDULER_TO_WORKER)
    assert frames == []
    assert isinstance(decoded, protocol.RunBatch) and decoded.batch_id == "batch-7"
    assert [
        msgspec.structs.asdict(m)
        | {
            "inputs": [
                {k: v for k, v in msgspec.structs.asdict(i).items() if k != "shm"} for i in m.inputs
            ]
        }
        for m in decoded.members
    ] == members
    assert all(i.shm is None for m in decoded.members for i in m.inputs)  # none was sent
    assert decoded.options == {"load_sources": {"diffuse": "disk"}}
    # and back: the encoded struct decodes to the same struct
    again, _ = protocol.decode([protocol.encode(decoded)], protocol.SCHEDULER_TO_WORKER)
    assert again == decoded


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([], "length >= 1"),
        ("nope", "Expected `array`"),
        ([_member(0), 3], "members[1]"),
        ([{k: v for k, v in _member(0).items() if k != "final"}], "missing required field `final`"),
    ],
)
def test_malformed_run_batch_is_refused(members: Any, problem: str) -> None:
    fields = dict(
        batch_id="b", model="flux", stages=["diffuse"], devices=["d"], rank=0, members=members
    )
    raw = msgpack.packb({"t": "run_batch", **fields}, use_bin_type=True)
    with pytest.raises(ProtocolError, match=re.escape(problem)):
        protocol.decode([raw], protocol.SCHEDULER_TO_WORKER)
    with pytest.raises(ProtocolError, match="missing required field"):
        protocol.decode(
            [msgpack.packb({"t": "run_batch", "batch_id": "b"})], protocol.SCHEDULER_TO_WORKER
        )
