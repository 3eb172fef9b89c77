"""Yield and resume through the real daemons, on ``cpu`` devices with a tiny real Flux.

The scheduler process runs the real :class:`~trident.runtime.scheduler.SchedulerDaemon`
around a small test policy (below: the core's FIFO plus one rule) because no planner
decides to yield yet: every request after the first has its diffuse yielded once, as
soon as its worker says the diffuse started (the core's own ``yield_task``), and its
resumed chunk goes to a device other than the one keeping the paused state, when one is
free. Everything else — the ``yield_task`` message, the worker's flag, the pipelines'
chunk state as a kept output fetched over the data plane, ``steps_done`` back to the
core, ``diffuse_steps`` on the resume — is the production path. This module is also that
scheduler's entry point (``python -m``, see ``__main__``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.pipelines.conftest import TinyModels
from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.config import SchedulerConfig
from trident.runtime.registry import ServedModel
from trident.sched.core import FifoPolicy
from trident.sched.types import Command, Event, LogEvent, RequestArrived, TaskStarted

from .conftest import pid_alive, read_log, read_log_until

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.integration.test_yield_runtime"
# 24 ms a step on this machine at 256x256 with one thread: the yield lands within the
# first few steps, and the resumed chunk lasts long enough to kill its worker.
STEPS = 80
REQUEST: dict[str, Any] = dict(
    prompt="a tiny flux test", height=256, width=256, num_inference_steps=STEPS, guidance_scale=3.5
)


class YieldOncePolicy(FifoPolicy):
    """FIFO; every request but the first has its diffuse yielded once when it starts, and
    a paused diffuse resumes on another device than its state's, when one is free."""

    name = "test-yield"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[str] = []
        self.yielded: set[str] = set()

    def apply(self, event: Event, now: float, out: list[Command]) -> None:
        super().apply(event, now, out)
        if isinstance(event, RequestArrived):
            self.arrivals.append(event.request.request_id)
        if not isinstance(event, TaskStarted):
            return
        task = self.tasks.get(event.task_id)
        if task is None or "diffuse" not in task.cmd.stages:
            return
        rid = task.cmd.request_id
        steps: Any = task.cmd.options.get("diffuse_steps")
        if steps is not None:
            out.append(
                LogEvent(
                    "test.resumed_started",
                    {
                        "request_id": rid,
                        "task_id": event.task_id,
                        "device_id": task.cmd.devices[0],
                        "diffuse_steps": list(steps),
                    },
                )
            )
            return
        if rid in self.yielded or rid == self.arrivals[0]:
            return
        cmd = self.yield_task(event.task_id)
        if cmd is not None:
            self.yielded.add(rid)
            out.append(cmd)

    def plan(self, now: float) -> list[Command]:
        out: list[Command] = []
        limit = self.config.max_inflight_per_device
        for req in list(self.waiting.values()):
            if req.steps_done <= 0 or req.output is None:
                continue
            free = [d for d in self.devices.values() if d.up and len(d.inflight) < limit]
            if not free:
                break
            holder = req.output.device_id
            dev = min(free, key=lambda d: (d.device_id == holder, len(d.inflight), d.device_id))
            out.append(self.start_task(req, ("diffuse",), (dev.device_id,), now))
        return out + super().plan(now)


def _make_core(cfg: SchedulerConfig, served: dict[str, ServedModel]) -> YieldOncePolicy:
    from trident.runtime.scheduler import make_core

    cfg.policy = "fifo"
    base = make_core(cfg, served)
    assert isinstance(base, FifoPolicy)
    return YieldOncePolicy(base.models, base.cost, base.config)


class _Cluster(LocalCluster):
    def _popen(self, args: list[str]) -> Any:
        if args and args[0] == "trident.runtime.scheduler":
            args = [MODULE, *args[1:]]
        return super()._popen(args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    flux = TinyModels(tmp_path_factory.mktemp("tiny"))("flux")
    c = _Cluster(
        [f"tiny-flux={flux}"],
        [NodeSpec("cpu:2", node_id="c", threads=1)],
        log_dir=tmp_path_factory.mktemp("yield"),
        policy="fifo",
        startup_timeout=180,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        )
        with c:
            yield c
    spawned = [e["pid"] for e in read_log(c.log_file or "") if e["event"] == "worker.spawned"]
    assert spawned and not [p for p in spawned if pid_alive(p)], "no worker may outlive the cluster"


def _generate(addr: str, seed: int) -> Any:
    async def run() -> Any:
        async with AsyncClient(addr, timeout=240) as c:
            return await c.generate(model="tiny-flux", seed=seed, **REQUEST)

    return asyncio.run(run())


def _ours(log_rid: Any, client_rid: str) -> bool:
    # The scheduler scopes ids by client: "<client hex>-<client's id>".
    return isinstance(log_rid, str) and log_rid.split("-", 1)[-1] == client_rid


def _events(log: list[dict[str, Any]], event: str, request_id: str) -> list[dict[str, Any]]:
    return [e for e in log if e["event"] == event and _ours(e.get("request_id"), request_id)]


def test_a_yielded_and_resumed_diffuse_is_bit_identical_to_an_unyielded_one(
    cluster: LocalCluster,
) -> None:
    plain = _generate(cluster.client_addr, seed=5)  # the first request: never yielded
    resumed = _generate(cluster.client_addr, seed=5)
    assert resumed.array.shape == plain.array.shape == (256, 256, 3)
    assert np.array_equal(resumed.array, plain.array), float(
        np.abs(resumed.array - plain.array).max()
    )
    log = read_log_until(
        cluster.log_file or "",
        lambda ls: bool(_events(ls, "request.finished", resumed.request_id)),
    )
    assert not _events(log, "stage.yielded", plain.request_id)
    (yielded,) = _events(log, "stage.yielded", resumed.request_id)
    assert 1 <= yielded["steps_done"] < STEPS
    (paused,) = _events(log, "stage.paused", resumed.request_id)  # the core's view
    assert paused["steps_done"] == yielded["steps_done"]
    (started,) = _events(log, "test.resumed_started", resumed.request_id)
    assert started["diffuse_steps"] == [yielded["steps_done"], None]
    # The chunk state went to the other device over the data plane.
    assert started["device_id"] != yielded["device_id"]
    assert resumed.devices["diffuse"] == [started["device_id"]]
    dispatched = _events(log, "stage.dispatched", resumed.request_id)
    assert [tuple(e["stages"]) for e in dispatched] == [
        ("encode",),
        ("diffuse",),
        ("diffuse",),
        ("decode",),
    ]


def test_a_dead_worker_during_a_resumed_chunk_costs_only_that_chunk(cluster: LocalCluster) -> None:
    # The reference: a seed of its own, yielded and resumed too (bit-exact, as above).
    reference = _generate(cluster.client_addr, seed=9)
    seen = {
        e.get("task_id")
        for e in read_log(cluster.log_file or "")
        if e["event"] == "test.resumed_started"
    }
    done: dict[str, Any] = {}
    client = threading.Thread(target=lambda: done.update(res=_generate(cluster.client_addr, 9)))
    client.start()

    def new_resumes(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            e for e in lines if e["event"] == "test.resumed_started" and e["task_id"] not in seen
        ]

    lines = read_log_until(cluster.log_file or "", lambda ls: bool(new_resumes(ls)), timeout=120)
    (started,) = new_resumes(lines)
    victim = started["device_id"]
    pids = [e["pid"] for e in lines if e["event"] == "worker.spawned" and e["device_id"] == victim]
    os.kill(pids[-1], signal.SIGKILL)  # mid-chunk: it has ~80 steps of 24 ms to run
    client.join(timeout=240)
    res = done["res"]
    rid = res.request_id
    assert _ours(started["request_id"], rid)
    assert np.array_equal(res.array, reference.array)
    log = read_log_until(
        cluster.log_file or "", lambda ls: bool(_events(ls, "request.finished", rid)), timeout=30
    )
    dispatched = [tuple(e["stages"]) for e in _events(log, "stage.dispatched", rid)]
    # encode once and the first chunk once: only the killed resumed chunk ran again,
    # from the first chunk's state, which its own device still kept.
    assert dispatched == [("encode",), ("diffuse",), ("diffuse",), ("diffuse",), ("decode",)]
    resumes = _events(log, "test.resumed_started", rid)
    assert len(resumes) == 2 and resumes[0]["diffuse_steps"] == resumes[1]["diffuse_steps"]


if __name__ == "__main__":
    # The scheduler of the cluster above: the real daemon around the test policy.
    from trident.runtime.scheduler import main

    sys.exit(main(sys.argv[1:], core_factory=_make_core))
