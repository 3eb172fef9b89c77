"""Cancelling a running task between denoising steps: the simulated executor stops its
diffuse sleep at the next step once the task's flag is set, with the memory accounting
as after a normal task; an unset flag changes nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from trident.pipelines.api import StageName
from trident.runtime.devices import Executor, SimExecutor, TaskCancelled, TaskResult
from trident.sched.cost import load_cost_model
from trident.sched.types import Shape

pytestmark = pytest.mark.timeout(60)

MODELS = {"flux": {"family": "flux", "path": None}}
STAGES: tuple[StageName, ...] = ("encode", "diffuse", "decode")
STEPS = 50
SHAPE = Shape(1024, 1024, 1, STEPS)
FULL_S = 2.0  # the simulated diffuse's whole duration in these tests
PARAMS: dict[str, Any] = {
    "prompt": "p",
    "seed": 0,
    "height": 1024,
    "width": 1024,
    "num_inference_steps": STEPS,
}


def _scale(full_s: float = FULL_S) -> float:
    """The time scale at which the flux diffuse of SHAPE lasts ``full_s`` seconds."""
    return full_s / load_cost_model().stage_seconds("flux", "diffuse", SHAPE)


def _sim(time_scale: float, memory_bytes: int = 80 << 30) -> SimExecutor:
    ex = SimExecutor(MODELS, memory_bytes, time_scale=0.0)
    for stage in STAGES:
        ex.load("flux", stage)  # resident instantly: no load sleeps below
    ex.time_scale = time_scale
    return ex


def _used(ex: SimExecutor) -> int:
    return sum(ex.resident.values())


def test_cancel_from_another_thread_stops_diffuse_at_the_next_step() -> None:
    ex = _sim(_scale())
    before = (dict(ex.resident), _used(ex))
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(TaskCancelled) as info:
            ex.run("flux", ("diffuse",), {}, PARAMS, {"degree": 1}, cancel=cancel)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - t0
    # A step is FULL_S / 50 = 40 ms: it stops soon after 0.3 s, long before 2 s.
    assert 0.25 <= elapsed < FULL_S / 2, elapsed
    assert "denoising step" in str(info.value)
    done = int(str(info.value).split("step ")[1].split(" ")[0])
    assert 1 <= done < STEPS
    # Memory accounting as after a finished task: the same weights resident, no peak held.
    assert (dict(ex.resident), _used(ex)) == before
    assert ex.evicted == []
    partial = info.value.partial
    assert isinstance(partial, TaskResult) and partial.outputs == {}
    assert "diffuse" not in partial.stage_seconds


def test_cancel_on_the_event_loop_path_and_the_device_is_free_afterwards() -> None:
    """The worker awaits ``run_async``; after a cancel, a task needing all the memory the
    device has (weights + the diffuse peak) still fits: nothing of the peak leaked."""
    from trident.sched.cost import batch_peak_bytes

    cost = load_cost_model()
    weights = sum(cost.weight_bytes("flux", s) for s in STAGES)
    peak = batch_peak_bytes(cost, "flux", "diffuse", SHAPE, 1, 1)
    ex = _sim(_scale(), memory_bytes=weights + peak)
    before = _used(ex)
    cancel = threading.Event()

    async def go() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, cancel.set)
        t0 = time.perf_counter()
        with pytest.raises(TaskCancelled):
            await ex.run_async("flux", ("diffuse",), {}, PARAMS, {"degree": 1}, cancel=cancel)
        return time.perf_counter() - t0

    elapsed = asyncio.run(go())
    assert elapsed < FULL_S / 2, elapsed
    assert _used(ex) == before
    ex.time_scale = 0.0
    result = ex.run("flux", STAGES, None, PARAMS, {"degree": 1}, cancel=threading.Event())
    assert set(result.stage_seconds) == set(STAGES)
    assert "output" in result.outputs


def test_a_set_flag_stops_before_the_first_stage_and_reports_the_loads() -> None:
    ex = SimExecutor(MODELS, 80 << 30, time_scale=0.0)  # nothing resident yet
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(TaskCancelled, match="before encode") as info:
        ex.run("flux", STAGES, None, PARAMS, {"degree": 1}, cancel=cancel)
    partial = info.value.partial
    assert partial is not None and partial.stage_seconds == {}
    # The loads happened (and stay resident, as on a normal path); the caller reports them.
    assert [(m, s) for m, s, _, _ in partial.loaded] == [("flux", s) for s in STAGES]
    assert set(ex.resident) == {("flux", s) for s in STAGES}


def test_an_unset_flag_changes_nothing() -> None:
    full = 0.5
    ex = _sim(_scale(full))
    planned = {s: secs for s, secs in ex._prepare("flux", STAGES, PARAMS, {"degree": 1})[1] if s}
    before = _used(ex)
    plain = ex.run("flux", STAGES, None, PARAMS, {"degree": 1})
    t0 = time.perf_counter()
    flagged = ex.run("flux", STAGES, None, PARAMS, {"degree": 1}, cancel=threading.Event())
    elapsed = time.perf_counter() - t0
    assert set(flagged.stage_seconds) == set(plain.stage_seconds) == set(STAGES)
    assert np.array_equal(flagged.outputs["output"], plain.outputs["output"])
    # The sliced sleep does not drift: the whole planned time, not much more.
    assert flagged.stage_seconds["diffuse"] == pytest.approx(planned["diffuse"], abs=0.25)
    assert sum(planned.values()) - 0.01 <= elapsed < sum(planned.values()) + 0.5
    assert _used(ex) == before


def test_cancel_stops_a_whole_sim_batch() -> None:
    ex = _sim(_scale())
    before = _used(ex)
    cancel = threading.Event()
    timer = threading.Timer(0.2, cancel.set)
    params: list[Mapping[str, Any]] = [{**PARAMS, "seed": i, "prompt": f"p{i}"} for i in range(2)]
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(TaskCancelled):
            ex.run_batch("flux", ("diffuse",), [{}, {}], params, {"degree": 1}, cancel=cancel)
    finally:
        timer.cancel()
    assert time.perf_counter() - t0 < FULL_S / 2
    assert _used(ex) == before
    # unset: both members come back
    ex.time_scale = 0.0
    out = ex.run_batch(
        "flux", ("diffuse",), [{}, {}], params, {"degree": 1}, cancel=threading.Event()
    )
    assert all(isinstance(r, TaskResult) for r in out)


class _Counting(Executor):
    """The base executor's member-by-member run_batch over a run that honours the flag."""

    def __init__(self, cancel_after: int) -> None:
        self.calls = 0
        self.cancel_after = cancel_after

    def run(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: Mapping[str, Any] | None,
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> TaskResult:
        self.calls += 1
        if self.calls == self.cancel_after and cancel is not None:
            cancel.set()
            raise TaskCancelled("cancelled mid-member")
        return TaskResult(outputs={}, stage_seconds={})


def test_base_run_batch_lets_a_cancel_stop_the_whole_call() -> None:
    ex = _Counting(cancel_after=2)
    with pytest.raises(TaskCancelled):
        ex.run_batch("m", ("encode",), [{}, {}, {}], [{}, {}, {}], {}, cancel=threading.Event())
    assert ex.calls == 2  # the third member never started
    ex = _Counting(cancel_after=99)
    out = ex.run_batch("m", ("encode",), [{}, {}], [{}, {}], {})
    assert len(out) == 2 and all(isinstance(r, TaskResult) for r in out)
