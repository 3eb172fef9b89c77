"""Batched tasks (``RunBatch``) through the real daemons on ``sim`` devices.

The scheduler process runs the real :class:`~trident.runtime.scheduler.SchedulerDaemon`
around a small test policy (below) that batches every stage of waiting same-shape
requests, so the runtime's batch path is exercised whatever the planner decides.
This module is also that scheduler's entry point (``python -m``, see ``__main__``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.config import SchedulerConfig
from trident.errors import StageFailedError
from trident.runtime import protocol
from trident.runtime.registry import ServedModel
from trident.sched.core import FifoPolicy, RequestState
from trident.sched.types import Command, Event, LogEvent, RequestArrived, RunBatch, RunTask

from .conftest import pid_alive, read_log, read_log_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.integration.test_batching_runtime"
N = 4  # requests per batch in these tests
HOLD_S = 1.5  # the test policy waits this long at most for a full batch
POISON = "poison"  # a request with this prompt gets a broken diffuse in its batch
LOSE_INPUT = "lose my input"  # ...this one's first diffuse names an input nobody keeps


class BatchEverythingPolicy(FifoPolicy):
    """FIFO, except that waiting batchable requests of the same model, shape and next
    stage go out together as one ``RunBatch`` (held until ``N`` are waiting or the
    first has waited ``HOLD_S``). Non-batchable requests go alone."""

    name = "test-batching"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.since: dict[tuple[str, int], float] = {}  # (request, stage index) -> waiting since
        self.lost_once: set[str] = set()  # requests whose input was made to vanish

    def handle(self, event: Event, now: float) -> list[Command]:
        out: list[Command] = []
        if isinstance(event, RequestArrived):
            # Shows the test what reached the core.
            spec = event.request
            out.append(
                LogEvent(
                    "test.request_seen",
                    {"request_id": spec.request_id, "batchable": spec.batchable},
                )
            )
        out.extend(super().handle(event, now))
        return out

    def plan(self, now: float) -> list[Command]:
        out: list[Command] = []
        limit = self.config.max_inflight_per_device
        groups: dict[Any, list[RequestState]] = {}
        for req in self.waiting.values():
            self.since.setdefault((req.request_id, req.next_stage), now)
            key = (
                (req.spec.model, req.spec.shape, req.next_stage)
                if req.spec.batchable
                else req.request_id
            )
            groups.setdefault(key, []).append(req)
        for reqs in groups.values():
            free = [d for d in self.devices.values() if d.up and len(d.inflight) < limit]
            if not free:
                break
            first = reqs[0]
            waited = now - self.since[(first.request_id, first.next_stage)]
            if first.spec.batchable and len(reqs) < N and waited < HOLD_S:
                continue  # wait for the rest of the batch
            # Alternate devices stage by stage, so members fetch their inputs from a peer.
            dev = min(
                free,
                key=lambda d: (len(d.inflight), (d.info.index + first.next_stage) % 2, d.device_id),
            ).device_id
            stage = first.pending_stages[0]
            cmd = self.start_batch(reqs[:N], (stage,), (dev,), now)
            out.append(self._spoiled(cmd) if isinstance(cmd, RunBatch) else cmd)
        return out

    def _spoiled(self, cmd: RunBatch) -> RunBatch:
        """Members the worker must fail alone: one the sim device cannot run (a shape it
        cannot parse), one whose input fetch fails (once; the core retries it)."""
        if "diffuse" not in cmd.stages:
            return cmd

        def spoil(t: RunTask) -> RunTask:
            prompt = t.params.get("prompt")
            if prompt == POISON:
                return replace(t, params={**t.params, "height": "not a number"})
            if prompt == LOSE_INPUT and t.request_id not in self.lost_once:
                self.lost_once.add(t.request_id)
                return replace(t, inputs=tuple(replace(i, key=i.key + ".gone") for i in t.inputs))
            return t

        return RunBatch(cmd.batch_id, tuple(spoil(t) for t in cmd.tasks))


def _make_core(cfg: SchedulerConfig, served: dict[str, ServedModel]) -> BatchEverythingPolicy:
    from trident.runtime.scheduler import make_core

    cfg.policy = "fifo"
    base = make_core(cfg, served)  # the same models, cost model and config as "fifo"
    assert isinstance(base, FifoPolicy)
    return BatchEverythingPolicy(base.models, base.cost, base.config)


class _Cluster(LocalCluster):
    """A LocalCluster whose scheduler is this module's (the daemon + the test policy)."""

    def _popen(self, args: list[str]) -> Any:
        if args and args[0] == "trident.runtime.scheduler":
            args = [MODULE, *args[1:]]
        return super()._popen(args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = _Cluster(
        ["flux"],
        [NodeSpec("sim:2", node_id="b", time_scale=0.02)],
        log_dir=tmp_path_factory.mktemp("batching"),
        policy="fifo",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        )
        with c:
            yield c
    spawned = [e["pid"] for e in read_log(c.log_file or "") if e["event"] == "worker.spawned"]
    assert spawned and not [p for p in spawned if pid_alive(p)], "no worker may outlive the cluster"


def _generate_all(addr: str, jobs: list[dict[str, Any]]) -> list[Any]:
    async def run() -> list[Any]:
        async with AsyncClient(addr, timeout=60) as c:

            async def one(job: dict[str, Any]) -> Any:
                try:
                    return await c.generate(
                        model="flux", height=256, width=256, num_inference_steps=4, **job
                    )
                except StageFailedError as exc:
                    return exc

            return await asyncio.gather(*(one(j) for j in jobs))

    return asyncio.run(run())


def _ours(log_rid: str, client_rids: set[str]) -> bool:
    # The scheduler scopes ids by client: "<client hex>-<client's id>".
    return log_rid.split("-", 1)[1] in client_rids


def test_same_shape_requests_run_as_batches_and_all_complete(cluster: LocalCluster) -> None:
    results = _generate_all(
        cluster.client_addr, [dict(prompt=f"fox {i}", seed=i) for i in range(N)]
    )
    assert all(not isinstance(r, Exception) for r in results), results
    for r in results:
        assert r.array.shape == (4, 4, 3)  # the sim's final layout
        assert set(r.devices) == {"encode", "diffuse", "decode"}
        assert r.timings["diffuse"] > 0
    mine = {r.request_id for r in results}
    log = read_log_until(
        cluster.log_file,
        lambda ls: (
            sum(e["event"] == "request.finished" and _ours(e["request_id"], mine) for e in ls) >= N
        ),
    )
    batches = [
        e for e in log if e["event"] == "batch.dispatched" and _ours(e["request_ids"][0], mine)
    ]
    # every stage went out as one batch of all N (the policy holds for a full batch)
    assert sorted(tuple(e["stages"]) for e in batches) == [
        ("decode",),
        ("diffuse",),
        ("encode",),
    ], batches
    for e in batches:
        assert e["size"] == N and len(e["request_ids"]) == N and len(e["devices"]) == 1
    # per member: dispatched (with its batch), started and finished under its own task id
    by_batch = {e["batch_id"]: e for e in batches}
    dispatched = [
        e for e in log if e["event"] == "stage.dispatched" and e.get("batch_id") in by_batch
    ]
    assert len(dispatched) == 3 * N
    finished = {e["task_id"] for e in log if e["event"] == "stage.finished"}
    started = {e["task_id"] for e in log if e["event"] == "stage.started"}
    assert {e["task_id"] for e in dispatched} <= finished & started
    # members fetched their inputs from the other device (the data plane, per member)
    diffuse_lines = [e for e in dispatched if e["stages"] == ["diffuse"]]
    assert all(e["inputs"] and e["inputs"] != e["devices"] for e in diffuse_lines), diffuse_lines
    # one call: every member of a batch reports the call's seconds
    diffuse_batch = next(e["batch_id"] for e in batches if e["stages"] == ["diffuse"])
    diffuse_tasks = {e["task_id"] for e in dispatched if e["batch_id"] == diffuse_batch}
    secs = {
        e["seconds"]["diffuse"]
        for e in log
        if e["event"] == "stage.finished" and e["task_id"] in diffuse_tasks
    }
    assert len(secs) == 1


def test_allow_batching_false_reaches_the_core_and_runs_alone(cluster: LocalCluster) -> None:
    jobs = [
        dict(prompt="a", seed=1),
        dict(prompt="solo", seed=2, allow_batching=False),
        dict(prompt="b", seed=3),
    ]
    results = _generate_all(cluster.client_addr, jobs)
    assert all(not isinstance(r, Exception) for r in results), results
    solo = results[1].request_id
    mine = {r.request_id for r in results}
    log = read_log_until(
        cluster.log_file,
        lambda ls: (
            sum(e["event"] == "request.finished" and _ours(e["request_id"], mine) for e in ls) >= 3
        ),
    )
    seen = {
        e["request_id"].split("-", 1)[1]: e["batchable"]
        for e in log
        if e["event"] == "test.request_seen"
    }
    assert seen[solo] is False
    assert seen[results[0].request_id] is True and seen[results[2].request_id] is True
    in_batches = {rid for e in log if e["event"] == "batch.dispatched" for rid in e["request_ids"]}
    assert not any(_ours(rid, {solo}) for rid in in_batches)
    # the two batchable ones shared their calls (the policy waited for more, then sent 2)
    assert any(
        e["event"] == "batch.dispatched"
        and {r.split("-", 1)[1] for r in e["request_ids"]} == mine - {solo}
        for e in log
    )


def test_a_failing_member_fails_alone(cluster: LocalCluster) -> None:
    jobs = [dict(prompt=f"ok {i}", seed=i) for i in range(N - 1)] + [dict(prompt=POISON, seed=99)]
    results = _generate_all(cluster.client_addr, jobs)
    assert all(not isinstance(r, Exception) for r in results[:-1]), results
    assert isinstance(results[-1], StageFailedError)
    assert "diffuse" in str(results[-1]) and "shape" in str(results[-1])


def test_a_member_whose_input_is_gone_is_retried_alone(cluster: LocalCluster) -> None:
    jobs = [dict(prompt=f"fine {i}", seed=i) for i in range(N - 1)] + [
        dict(prompt=LOSE_INPUT, seed=7)
    ]
    results = _generate_all(cluster.client_addr, jobs)
    assert all(not isinstance(r, Exception) for r in results), results
    unlucky = results[-1].request_id
    mine = {r.request_id for r in results}
    log = read_log_until(
        cluster.log_file,
        lambda ls: (
            sum(e["event"] == "request.finished" and _ours(e["request_id"], mine) for e in ls) >= N
        ),
    )
    failed = [
        e
        for e in log
        if e["event"] == "stage.failed"
        and e["component"] == "worker"
        and _ours(e["request_id"], {unlucky})
    ]
    assert len(failed) == 1 and "no longer kept" in failed[0]["message"] and failed[0]["batch_id"]
    assert any(e["event"] == "stage.retry" and _ours(e["request_id"], {unlucky}) for e in log)
    # the others finished their diffuse in that same batch
    batch = next(
        e
        for e in log
        if e["event"] == "batch.dispatched" and e["batch_id"] == failed[0]["batch_id"]
    )
    assert batch["size"] == N
    others = {
        e["task_id"]
        for e in log
        if e["event"] == "stage.dispatched" and e.get("batch_id") == batch["batch_id"]
    }
    finished = {e["task_id"] for e in log if e["event"] == "stage.finished"}
    assert len(others & finished) == N - 1


def test_batch_flag_must_be_a_bool(cluster: LocalCluster) -> None:
    ctx = zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(cluster.client_addr)
        raw.send_multipart(
            [
                msgpack.packb(
                    {
                        "t": "submit",
                        "id": "flag",
                        "model": "flux",
                        "params": {"prompt": "x", "height": 256, "width": 256},
                        "batch": "yes",
                    }
                )
            ]
        )
        assert raw.poll(10_000), "no answer to a bad batch flag"
        header = msgpack.unpackb(raw.recv_multipart()[0])
        assert header["t"] == "error" and header["code"] == "protocol"
        assert (
            "Expected `bool`" in header["message"]
            and "$.batch" in header["message"]
            and header["id"] == "flag"
        )
    finally:
        ctx.destroy(0)


# --------------------------------------------------------------------------- scheduler side


def test_scheduler_sends_one_run_batch_and_fails_only_members_it_cannot_send() -> None:
    """In process, no sockets: what ``_execute(RunBatch)`` queues and feeds back."""
    from trident.runtime.scheduler import SchedulerDaemon, _WorkerConn
    from trident.sched.types import DeviceInfo, InputRef, TaskFailed

    daemon = SchedulerDaemon(SchedulerConfig(), {}, core=FifoPolicy({}))
    try:
        for i, up in ((0, True), (1, False)):
            dev = f"n/sim:{i}"
            daemon.workers[dev] = _WorkerConn(
                ident=f"dev:{dev}".encode(),
                info=DeviceInfo(dev, "n", "sim", i, 1 << 30),
                peer_addr=f"tcp://127.0.0.1:{7000 + i}",
                pid=i,
                last_seen=0.0,
                up=up,
            )

        def task(
            i: int, inputs: tuple[InputRef, ...], devices: tuple[str, ...] = ("n/sim:0",)
        ) -> RunTask:
            return RunTask(
                f"r{i}.dif.{i}", f"r{i}", "flux", ("diffuse",), devices, inputs, params={"seed": i}
            )

        kept = (InputRef("r0.enc.1", "n/sim:0"),)
        lost = (InputRef("r1.enc.2", "n/sim:1"),)  # its holder is down
        daemon._execute(RunBatch("batch-1", (task(0, kept), task(1, lost), task(2, ()))))
        failed = [e for e in daemon.events if isinstance(e, TaskFailed)]
        assert [(e.task_id, e.retryable) for e in failed] == [("r1.dif.1", True)]
        assert len(daemon.out) == 1
        _, frames = daemon.out.pop(0)
        assert frames[0] == b"dev:n/sim:0"
        header, _ = protocol.decode(frames[1:], protocol.SCHEDULER_TO_WORKER)
        assert isinstance(header, protocol.RunBatch)
        assert header.batch_id == "batch-1" and header.rank == 0
        assert [m.task_id for m in header.members] == ["r0.dif.0", "r2.dif.2"]
        assert header.members[0].inputs == [
            protocol.InputAddr(key="r0.enc.1", device_id="n/sim:0", addr="tcp://127.0.0.1:7000")
        ]
        assert header.options["load_sources"] == {"diffuse": "disk"}
        assert set(daemon.task_info) == {"r0.dif.0", "r2.dif.2"}
        assert daemon.counters["dispatched"] == 2 and daemon.counters["batches"] == 1

        # every member lost: nothing is sent
        daemon.events.clear()
        daemon._execute(RunBatch("batch-2", (task(3, lost), task(4, lost))))
        assert not daemon.out and len(daemon.events) == 2

        # degree 2: refused member by member, not retryable, nothing sent
        daemon.events.clear()
        pair = ("n/sim:0", "n/sim:1")
        daemon._execute(RunBatch("batch-3", (task(5, (), pair), task(6, (), pair))))
        assert not daemon.out
        assert [
            (e.task_id, e.error, e.retryable) for e in daemon.events if isinstance(e, TaskFailed)
        ] == [("r5.dif.5", "internal", False), ("r6.dif.6", "internal", False)]
    finally:
        daemon.ctx.term()


# --------------------------------------------------------------------------- real stages


@pytest.mark.timeout(300)
def test_real_tiny_flux_batched_matches_diffusers(tmp_path: Path) -> None:
    """cpu devices, the real diffusers stages: batched members match the whole diffusers
    pipeline within 1e-4, a request that opted out matches as closely as unbatched ones do."""
    torch = pytest.importorskip("torch")
    from tests.pipelines.conftest import STEPS, TEST_SHAPES, TinyModels, diffusers_reference

    tiny = TinyModels(tmp_path / "tiny")("flux")
    c = _Cluster(
        [f"tiny-flux={tiny}"],
        [NodeSpec("cpu:2", node_id="c", threads=1)],
        log_dir=tmp_path / "log",
        policy="fifo",
        startup_timeout=180,
    )
    common = dict(num_inference_steps=STEPS, guidance_scale=3.5, **TEST_SHAPES["flux"])
    jobs = [
        dict(prompt="a red fox", seed=1),
        dict(prompt="a blue whale", seed=2),
        dict(prompt="a red fox", seed=3, allow_batching=False),
    ]

    async def run() -> list[Any]:
        async with AsyncClient(c.client_addr, timeout=240) as client:
            return await asyncio.gather(
                *(client.generate(model="tiny-flux", **common, **j) for j in jobs)
            )

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        )
        with c:
            results = asyncio.run(run())
            log = read_log_until(
                c.log_file,
                lambda ls: sum(e["event"] == "request.finished" for e in ls) >= len(jobs),
            )
    spawned = [e["pid"] for e in read_log(c.log_file or "") if e["event"] == "worker.spawned"]
    assert spawned and not [p for p in spawned if pid_alive(p)], "no worker may outlive the cluster"
    batched = {
        r.split("-", 1)[1]
        for e in log
        if e["event"] == "batch.dispatched" and e["stages"] == ["diffuse"]
        for r in e["request_ids"]
    }
    assert batched == {results[0].request_id, results[1].request_id}, (
        "the two batchable requests share diffuse"
    )
    torch.set_num_threads(1)  # as the workers
    for job, res in zip(jobs, results, strict=True):
        kwargs = {k: v for k, v in job.items() if k not in ("seed", "allow_batching")}
        ref = diffusers_reference(tiny, int(job["seed"]), **common, **kwargs)
        diff = float(np.abs(res.array - ref).max())
        assert diff <= (1e-5 if job.get("allow_batching") is False else 1e-4), (job, diff)


@pytest.mark.timeout(300)
def test_trident_policy_batches_a_burst_of_small_images(tmp_path: Path) -> None:
    """The default planner, one cpu device, real tiny flux: a burst of same-shape requests
    waits for the one device, so the planner batches them; every result stays within
    1e-4 of diffusers and a request that opted out never shares a call."""
    pytest.importorskip("torch")
    from tests.pipelines.conftest import STEPS, TEST_SHAPES, TinyModels, diffusers_reference

    tiny = TinyModels(tmp_path / "tiny")("flux")
    c = LocalCluster(
        [f"tiny-flux={tiny}"], [NodeSpec("cpu:1", node_id="t", threads=1)],
        log_dir=tmp_path / "log", startup_timeout=180,
    )  # fmt: skip
    common = dict(num_inference_steps=STEPS, guidance_scale=3.5, **TEST_SHAPES["flux"])
    jobs: list[dict[str, Any]] = [dict(prompt=f"a fox, take {i}", seed=20 + i) for i in range(5)]
    jobs.append(dict(prompt="a lone fox", seed=7, allow_batching=False))

    async def run() -> list[Any]:
        async with AsyncClient(c.client_addr, timeout=240) as client:
            return await asyncio.gather(
                *(client.generate(model="tiny-flux", **common, **j) for j in jobs)
            )

    with c:
        results = asyncio.run(run())
        log = read_log_until(
            c.log_file, lambda ls: sum(e["event"] == "request.finished" for e in ls) >= len(jobs)
        )
    batches = [e for e in log if e["event"] == "batch.dispatched"]
    assert batches and max(e["size"] for e in batches) >= 2, "the burst should share calls"
    lone = results[-1].request_id
    assert all(not _ours(r, {lone}) for e in batches for r in e["request_ids"])
    import torch

    torch.set_num_threads(1)  # as the worker
    for job, res in zip(jobs, results, strict=True):
        kwargs = {k: v for k, v in job.items() if k not in ("seed", "allow_batching")}
        ref = diffusers_reference(tiny, int(job["seed"]), **common, **kwargs)
        diff = float(np.abs(res.array - ref).max())
        assert diff <= (1e-5 if job.get("allow_batching") is False else 1e-4), (job, diff)


if __name__ == "__main__":
    # The scheduler of the cluster above: the real daemon around the test policy.
    from trident.runtime.scheduler import main

    sys.exit(main(sys.argv[1:], core_factory=_make_core))
