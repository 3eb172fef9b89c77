"""Step-level preemption in the runtime (docs/runtime.md "Yield and resume"): the
``yield_task`` / ``task_finished.steps_done`` wire messages, the worker's flag, and the
executors' chunks — the simulated diffuse sleeping only for steps ``[a, stop)`` and
pausing at a step boundary on a yield, a real executor skipping the stages after a
paused diffuse."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest

from trident.errors import ProtocolError
from trident.runtime import protocol
from trident.runtime.devices import (
    ProgressFlag,
    SimExecutor,
    StageError,
    TaskResult,
    diffuse_span,
)
from trident.sched.cost import load_cost_model
from trident.sched.types import Shape

pytestmark = pytest.mark.timeout(60)

MODELS = {"flux": {"family": "flux", "path": None}}
STAGES = ("encode", "diffuse", "decode")
STEPS = 20
SHAPE = Shape(1024, 1024, 1, STEPS)
FULL_S = 1.0  # the simulated diffuse's whole duration in these tests
PARAMS: dict[str, Any] = {
    "prompt": "p",
    "seed": 0,
    "height": 1024,
    "width": 1024,
    "num_inference_steps": STEPS,
}


def _sim(full_s: float = FULL_S) -> SimExecutor:
    ex = SimExecutor(MODELS, 80 << 30, time_scale=0.0)
    for stage in STAGES:
        ex.load("flux", stage)  # resident instantly: no load sleeps below
    ex.time_scale = full_s / load_cost_model().stage_seconds("flux", "diffuse", SHAPE)
    return ex


class _Steps(ProgressFlag):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        super().__init__(lambda step, total: self.seen.append((step, total)))


# --------------------------------------------------------------------------- protocol


def _roundtrip(msg: protocol.Message, channel: protocol.Channel) -> Any:
    decoded, frames = protocol.decode([protocol.encode(msg)], channel)
    assert frames == []
    return decoded


def test_yield_task_travels_scheduler_to_worker_only() -> None:
    msg = protocol.YieldTask(task_id="r1.diffuse.3")
    assert _roundtrip(msg, protocol.SCHEDULER_TO_WORKER) == msg
    assert protocol.YieldTask in protocol.message_types()
    for channel in (
        protocol.CLUSTER_TO_SCHEDULER,
        protocol.PEER_REQUEST,
        protocol.SCHEDULER_TO_NODE,
    ):
        with pytest.raises(ProtocolError):
            protocol.decode([protocol.encode(msg)], channel)
    with pytest.raises(ProtocolError):  # an empty task id fails at the edge
        protocol.decode(
            [msgspec.msgpack.encode({"t": "yield_task", "task_id": ""})],
            protocol.SCHEDULER_TO_WORKER,
        )


def test_task_finished_carries_steps_done_and_validates_it() -> None:
    msg = protocol.TaskFinished(task_id="t", stage_seconds={"diffuse": 0.1}, steps_done=7)
    assert _roundtrip(msg, protocol.CLUSTER_TO_SCHEDULER).steps_done == 7
    # An older-style report (no field) means "every stage ran".
    raw = msgspec.msgpack.encode({"t": "task_finished", "task_id": "t", "stage_seconds": {}})
    assert protocol.decode([raw], protocol.CLUSTER_TO_SCHEDULER)[0].steps_done is None
    for bad in (0, -1, 100_001, "3", 2.5):
        raw = msgspec.msgpack.encode(
            {"t": "task_finished", "task_id": "t", "stage_seconds": {}, "steps_done": bad}
        )
        with pytest.raises(ProtocolError):
            protocol.decode([raw], protocol.CLUSTER_TO_SCHEDULER)


def test_protocol_version_was_bumped_for_yield() -> None:
    assert protocol.PROTOCOL_VERSION >= 5  # 6: shared-memory references (test_shm_protocol)


# --------------------------------------------------------------------------- the flag


def test_progress_flag_polls_cancel_and_yield() -> None:
    flag = ProgressFlag()
    assert flag.poll() == (False, False)
    flag.request_yield()
    assert flag.poll() == (False, True)
    flag.set()
    assert flag.poll() == (True, True)


def test_diffuse_span() -> None:
    assert diffuse_span({}, 10) == (0, 10)
    assert diffuse_span({"diffuse_steps": [3, None]}, 10) == (3, 10)
    assert diffuse_span({"diffuse_steps": [3, 50]}, 10) == (3, 10)
    for bad in ([10, None], [5, 5], [-1, None], "x", [1]):
        with pytest.raises(StageError):
            diffuse_span({"diffuse_steps": bad}, 10)


# --------------------------------------------------------------------------- sim


def test_sim_resumed_chunk_sleeps_only_its_steps_and_counts_the_requests_steps() -> None:
    ex = _sim()
    flag = _Steps()
    t0 = time.perf_counter()
    res = ex.run(
        "flux", ("diffuse", "decode"), {}, PARAMS, {"diffuse_steps": [15, None]}, cancel=flag
    )
    elapsed = time.perf_counter() - t0
    assert res.steps_done is None  # ran to the end, decode too
    assert set(res.stage_seconds) == {"diffuse", "decode"}
    assert "output" in res.outputs
    # 5 of 20 steps: a quarter of the diffuse's second
    assert res.stage_seconds["diffuse"] == pytest.approx(FULL_S / 4, abs=0.1)
    assert elapsed < FULL_S * 0.6
    assert [s for s, _ in flag.seen] == [16, 17, 18, 19, 20]
    assert {t for _, t in flag.seen} == {STEPS}


def test_sim_chunk_that_ends_early_pauses_without_its_later_stages() -> None:
    ex = _sim()
    for cancel in (None, ProgressFlag()):
        res = ex.run("flux", STAGES, {}, PARAMS, {"diffuse_steps": [0, 8]}, cancel=cancel)
        assert res.steps_done == 8
        assert set(res.stage_seconds) == {"encode", "diffuse"}
        assert set(res.outputs) == {"latents"}  # a stand-in for the chunk state
        assert res.stage_seconds["diffuse"] == pytest.approx(FULL_S * 8 / 20, abs=0.1)


def test_sim_yield_pauses_at_the_next_step_boundary() -> None:
    ex = _sim()
    flag = _Steps()
    timer = threading.Timer(0.3, flag.request_yield)
    t0 = time.perf_counter()
    timer.start()
    try:
        res = ex.run("flux", ("diffuse", "decode"), {}, PARAMS, {"degree": 1}, cancel=flag)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    assert res.steps_done is not None and 3 <= res.steps_done < STEPS  # 50 ms a step
    assert elapsed < FULL_S * 0.7, elapsed
    assert set(res.stage_seconds) == {"diffuse"} and set(res.outputs) == {"latents"}
    assert flag.seen[-1] == (res.steps_done, STEPS)
    # ...and the resumed chunk runs the rest, reporting the request's steps.
    rest = _Steps()
    res2 = ex.run(
        "flux",
        ("diffuse", "decode"),
        {},
        PARAMS,
        {"diffuse_steps": [res.steps_done, None]},
        cancel=rest,
    )
    assert res2.steps_done is None and "output" in res2.outputs
    assert rest.seen[0][0] == res.steps_done + 1 and rest.seen[-1] == (STEPS, STEPS)


def test_sim_yield_asked_before_diffuse_stops_after_its_first_step() -> None:
    ex = _sim()
    flag = ProgressFlag()
    flag.request_yield()  # e.g. heard during encode
    res = ex.run("flux", STAGES, {}, PARAMS, {"diffuse_steps": [4, None]}, cancel=flag)
    assert res.steps_done == 5
    assert set(res.stage_seconds) == {"encode", "diffuse"}


def test_sim_yield_at_the_last_step_is_no_pause() -> None:
    ex = _sim()
    flag = ProgressFlag()
    flag.request_yield()
    res = ex.run(
        "flux", ("diffuse", "decode"), {}, PARAMS, {"diffuse_steps": [19, None]}, cancel=flag
    )
    assert res.steps_done is None and "output" in res.outputs


def test_sim_batch_ignores_a_yield() -> None:
    ex = _sim(full_s=0.2)
    flag = ProgressFlag()
    flag.request_yield()
    out = ex.run_batch("flux", ("diffuse",), [{}, {}], [PARAMS, PARAMS], {}, cancel=flag)
    assert all(isinstance(r, TaskResult) and r.steps_done is None for r in out)


# --------------------------------------------------------------------------- torch executor


class _ChunkPipe:
    """Diffuse returns chunk state (``_trident.step``) when the flag asks for a yield."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def loaded(self) -> set[str]:
        return set(STAGES)

    def load(self, stage: str) -> float:
        return 0.0

    def run(
        self,
        stage: str,
        inputs: Any,
        params: Mapping[str, Any],
        options: Any = None,
        parallel: Any = None,
        *,
        cancel: Any = None,
    ) -> dict[str, Any]:
        import torch

        self.calls.append((stage, dict(options or {}).get("diffuse_steps")))
        if stage == "diffuse" and cancel is not None and cancel.poll()[1]:
            return {"latents": torch.zeros(2), "_trident.step": torch.tensor(3)}
        return {"x": torch.zeros(1)}


def test_torch_executor_stops_after_a_paused_diffuse() -> None:
    pytest.importorskip("torch")
    from trident.runtime.devices import TorchExecutor

    ex = TorchExecutor({"m": {"family": "flux", "path": "/nowhere"}}, "cpu")
    pipe = _ChunkPipe()
    ex.pipes["m"] = pipe
    flag = ProgressFlag()
    flag.request_yield()
    res = ex.run("m", STAGES, {}, {"prompt": "a"}, {"diffuse_steps": [1, None]}, cancel=flag)
    assert res.steps_done == 3
    assert [c[0] for c in pipe.calls] == ["encode", "diffuse"]  # no decode
    assert pipe.calls[1][1] == [1, None]  # the options reach the family
    assert set(res.outputs) == {"latents", "_trident.step"}
    assert set(res.stage_seconds) == {"encode", "diffuse"}
    # Unyielded: every stage, no steps_done.
    pipe.calls.clear()
    res = ex.run("m", STAGES, {}, {"prompt": "a"}, {}, cancel=ProgressFlag())
    assert res.steps_done is None and [c[0] for c in pipe.calls] == list(STAGES)
