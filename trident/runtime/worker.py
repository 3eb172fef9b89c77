"""A stage worker: one process per device, spawned and supervised by ``trident-node``.

Channels:
- control: a DEALER to the scheduler (identity ``dev:<device_id>``): hello/welcome
  handshake, heartbeats, ``run_task`` in, ``task_*`` reports out.
- peer: a ROUTER other workers fetch kept stage outputs from (``fetch`` -> ``data``),
  and a DEALER per peer to fetch from them. Stage outputs go worker to worker, never
  through the scheduler; only a final output goes to the scheduler, for the client.

Tasks run first-in-first-out in the order the scheduler sent them. Inputs of queued
tasks are fetched while earlier tasks compute, and compute runs in a thread so the
event loop keeps answering heartbeats and peers' fetches during a long stage.

A ``run_batch`` (several requests' tasks as one call) is one queue entry; each member
is reported under its own task id as if it had come alone, and a member's failure
(lost input, bad request) fails that member only.

``cancel_task`` drops a queued task, or sets the running task's flag, which the
executor checks between denoising steps (degree k: the ranks agree on the step).
The same flag hears each denoising step: rank 0 reports them (``task_progress``,
throttled to one per 0.5 s plus the last step, sent without waiting: dropped when the
queue to the scheduler is full).
``yield_task`` asks the running task's diffuse to pause at its next step boundary (the
flag's yield order; degree k: every rank hears it and they agree on the step): the task
then finishes with ``steps_done``, keeping the chunk state under its task id like any
output, never sent on even from a final task. A yield for a queued or unknown task, or
a batch, is ignored.
Every loop is supervised: one that dies exits the worker with status 1 and its node
restarts it. Re-registration (``reregister``) happens on the control loop without
blocking it: hello, then on welcome the old executor is closed and a new one made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from trident.errors import ProtocolError
from trident.families import STAGES
from trident.log import configure_logging, get_logger
from trident.runtime import protocol
from trident.runtime.dataplane import (
    FetchMissing,
    PeerClient,
    PeerServer,
    attach_output,
    shm_output,
)
from trident.runtime.devices import (
    Executor,
    OutOfMemory,
    ProgressFlag,
    StageError,
    TaskCancelled,
    TaskResult,
    make_executor,
)
from trident.runtime.encode import DEFAULT_FPS, OUTPUT_TYPES, encode_output
from trident.runtime.peerweights import PeerWeights, peer_weights_enabled
from trident.runtime.protocol import SCHEDULER_TO_WORKER
from trident.runtime.ratelimit import RejectionLog
from trident.runtime.serial import pack_tensors
from trident.runtime.shm import (
    ShmError,
    ShmStore,
    detach,
    eager_export_enabled,
    segment_prefix,
    shm_enabled,
)
from trident.runtime.supervise import supervised
from trident.runtime.transport import make_socket

__all__ = ["StepThrottle", "Worker", "WorkerArgs", "main"]

EXIT_REJECTED = 3
EXIT_NO_SCHEDULER = 4
# A partner that never joins (it died) must not wedge this worker for long.
GROUP_TIMEOUT_S = 60.0
# Progress reports (task_progress) of a running diffuse: at most one per this many
# seconds, and the last step.
PROGRESS_INTERVAL_S = 0.5


class StepThrottle:
    """Passes a denoising step on to ``send(step, total)`` at most once per ``interval``
    seconds, and always the last step (``step == total``); repeats and steps going
    backwards are dropped. Called from the compute thread (or the loop, on sim
    devices): it only compares numbers and hands over."""

    def __init__(
        self,
        send: Callable[[int, int], None],
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.interval = interval
        self.clock = clock
        self.last = -float("inf")
        self.step = 0

    def __call__(self, step: int, total: int) -> None:
        if step <= self.step:
            return
        now = self.clock()
        if step < total and now - self.last < self.interval:
            return
        self.last = now
        self.step = step
        self.send(step, total)


@dataclass
class WorkerArgs:
    scheduler: str
    node_id: str
    kind: str
    index: int
    ordinal: int
    memory_bytes: int
    speed: float = 1.0
    host: str = "127.0.0.1"
    time_scale: float = 1.0
    threads: int | None = None
    heartbeat_s: float = 1.0
    log_file: str | None = None
    parent_pid: int | None = None
    curve_dir: str | None = None

    @property
    def device_id(self) -> str:
        return f"{self.node_id}/{self.kind}:{self.index}"


class InputLost(StageError):
    """A task's input is no longer kept where it was: the holder's failure, not the
    request's, so a re-run from an earlier stage may succeed (retryable)."""


@dataclass
class _Task:
    # The message: RunTask, RunBatch, LoadStage or UnloadStage; for a batch member,
    # its BatchMember.
    msg: Any
    inputs: asyncio.Future[dict[str, Any]] | None = None
    transfer_seconds: float = 0.0
    members: list[_Task] = field(default_factory=list)  # run_batch only

    @property
    def task_id(self) -> str | None:
        return getattr(self.msg, "task_id", None)


def _failure(exc: BaseException, degree: int) -> tuple[str, str, bool]:
    """(error code, message, retryable) reported for a task that raised ``exc``."""
    if isinstance(exc, TaskCancelled):
        return "cancelled", "cancelled by the client", False
    if isinstance(exc, OutOfMemory) or _is_torch_oom(exc):
        return "out_of_memory", str(exc), False
    if isinstance(exc, InputLost):
        return "stage_failed", str(exc), True
    if isinstance(exc, StageError):
        return "stage_failed", str(exc), False
    # At degree k a failure is usually a partner's (a collective broke): another
    # instance may well succeed. At degree 1 it is the request's own.
    return "stage_failed", f"{type(exc).__name__}: {exc}", degree > 1


def _is_torch_oom(exc: BaseException) -> bool:
    """A torch out-of-memory error the executor did not turn into OutOfMemory."""
    torch = sys.modules.get("torch")  # never imported for it (sim workers have none)
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(oom, type) and isinstance(exc, oom)


class Worker:
    def __init__(self, args: WorkerArgs) -> None:
        self.args = args
        self.log = get_logger("worker", device_id=args.device_id)
        self.ctx = zmq.asyncio.Context()
        self.ctl: Any = None
        self.server: PeerServer | None = None
        self.peers: PeerClient | None = None
        self.peer_addr = ""
        self.outputs: dict[str, dict[str, Any]] = {}  # kept stage outputs by task id
        # Their same-node shared-memory copies (made when the output is kept, or on a
        # same-node fetch; recycled into a bounded pool with the output;
        # trident/runtime/shm.py); None: TRIDENT_SHM=0.
        self.shm: ShmStore | None = None
        # Export a kept output into shared memory before reporting it (TRIDENT_SHM_EAGER).
        self.eager_shm = eager_export_enabled()
        self.queue: deque[_Task] = deque()
        self.queue_event = asyncio.Event()
        self.models: dict[str, dict[str, Any]] = {}
        self.executor: Executor | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.stopping = asyncio.Event()
        self.barriers: dict[str, list[bytes]] = {}  # task id -> peers arrived (leader side)
        self.barrier_event = asyncio.Event()
        self.go: dict[str, asyncio.Future[None]] = {}
        self.store_addr: str | None = None
        self.auth: Any = None
        # The task computing now and its cancel flag (checked between denoising steps;
        # it also hears the diffuse stage's steps, for progress reports).
        self.running: _Task | None = None
        self.running_cancel: threading.Event | None = None
        self.progress_dropped = 0
        self.cancelled_members: set[str] = set()  # members of the running batch
        # The queue entry whose out-of-memory failure freed memory last (weak: the
        # entry's inputs are not kept for it).
        self._freed_after: weakref.ref[_Task] | None = None
        # Re-registration (the scheduler restarted or forgot us): hello sent, welcome
        # awaited by the control loop; the executor is replaced between tasks.
        self.rejoining = False
        self.exit_code = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        a = self.args
        keys = None
        if a.curve_dir:
            from trident.runtime.security import daemon_keys, start_authenticator

            keys = daemon_keys(a.curve_dir)
            self.auth = start_authenticator(self.ctx, a.curve_dir)
        self.ctl = make_socket(
            self.ctx, zmq.DEALER, identity=f"dev:{a.device_id}".encode(), curve=keys
        )
        self.ctl.connect(a.scheduler)
        self.rejections = RejectionLog(self.log)
        if shm_enabled():
            self.shm = ShmStore(segment_prefix(a.node_id, a.index, os.getpid()))
        self.server = PeerServer(
            self.ctx,
            a.host,
            self.outputs,
            on_barrier=self._on_barrier,
            on_error=self._peer_rejected,
            curve=keys,
            shm=self.shm,
        )
        self.peer_addr = self.server.address
        self.peers = PeerClient(self.ctx, on_go=self._on_go, curve=keys)
        if a.kind in ("cpu", "cuda"):
            # Import torch before saying hello so the first task does not pay for it,
            # and host the rendezvous store degree-k instances led by us will use.
            await asyncio.get_running_loop().run_in_executor(self.pool, _warm_torch)
            self.store_addr = await asyncio.get_running_loop().run_in_executor(
                self.pool, _host_store, a.host
            )
        if a.kind == "cuda":
            # The planner gets the device's own word for its memory, not the node's
            # configured figure (docs/runtime.md "Memory truth").
            try:
                mem = await asyncio.get_running_loop().run_in_executor(
                    self.pool, _cuda_memory, a.ordinal, a.memory_bytes
                )
                a.memory_bytes = mem["memory_bytes"]
                self.log.info("worker.memory", ordinal=a.ordinal, **mem)
            except Exception as exc:
                self.log.warning("worker.memory_unknown", error=repr(exc), bytes=a.memory_bytes)
        code = await self._handshake()
        if code is not None:
            await self._close()
            return code
        self.log.info("worker.joined", peer_addr=self.peer_addr, kind=a.kind, pid=os.getpid())
        loops = [
            asyncio.create_task(self._supervised("control", self._control_loop), name="control"),
            asyncio.create_task(self._supervised("peer", self.server.serve), name="peer"),
            asyncio.create_task(self._supervised("run", self._run_loop), name="run"),
            asyncio.create_task(
                self._supervised("heartbeat", self._heartbeat_loop), name="heartbeat"
            ),
            asyncio.create_task(
                self._supervised("watchdog", self._parent_watchdog), name="watchdog"
            ),
        ]
        await self.stopping.wait()
        if self.running_cancel is not None:
            self.running_cancel.set()
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self._close()
        return self.exit_code

    def _supervised(
        self, name: str, loop_fn: Callable[[], Coroutine[Any, Any, None]]
    ) -> Coroutine[Any, Any, None]:
        # A loop that dies takes the process down (exit 1): its supervisor restarts it.
        return supervised(
            name, loop_fn, log=self.log, stopping=self.stopping, on_crash=self._crashed
        )

    def _crashed(self, exc: BaseException) -> None:
        self.exit_code = 1
        self.stopping.set()

    def _hello(self) -> bytes:
        a = self.args
        return protocol.encode(
            protocol.WorkerHello(
                version=protocol.PROTOCOL_VERSION,
                device_id=a.device_id,
                node_id=a.node_id,
                index=a.index,
                kind=a.kind,  # type: ignore[arg-type]
                memory_bytes=a.memory_bytes,
                speed=a.speed,
                peer_addr=self.peer_addr,
                store_addr=self.store_addr,
                pid=os.getpid(),
            )
        )

    async def _handshake(self) -> int | None:
        """The first hello, before any loop runs (re-registration is the control loop's)."""
        a = self.args
        hello = self._hello()
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not self.stopping.is_set():
            await self.ctl.send_multipart([hello])
            if not await self.ctl.poll(2000):
                continue
            try:
                msg, _ = protocol.decode(await self.ctl.recv_multipart(), SCHEDULER_TO_WORKER)
            except ProtocolError as exc:
                self.log.warning("protocol.rejected", channel="control", error=exc.message)
                continue
            if isinstance(msg, protocol.Reject):
                self.log.error("worker.rejected", reason=msg.reason)
                print(f"trident worker: rejected by scheduler: {msg.reason}", file=sys.stderr)
                return EXIT_REJECTED
            if isinstance(msg, protocol.WorkerWelcome):
                self._welcomed(msg)
                return None
            # reregister (our node has not said hello yet) or stale traffic: hello again
        self.log.error("worker.no_scheduler", scheduler=a.scheduler)
        return EXIT_NO_SCHEDULER

    def _welcomed(self, msg: protocol.WorkerWelcome) -> None:
        a = self.args
        self.models = {
            n: {"family": m.family, "path": m.path, "dtype": m.dtype} for n, m in msg.models.items()
        }
        self.args.heartbeat_s = float(msg.heartbeat_s)
        if self.executor is not None:
            self.executor.close()  # a re-registration: the new one starts empty
        peers = None
        if a.kind in ("cpu", "cuda") and shm_enabled() and peer_weights_enabled():
            peers = PeerWeights(a.node_id, a.index, os.getpid())
        self.executor = make_executor(
            a.kind,
            self.models,
            memory_bytes=a.memory_bytes,
            ordinal=a.ordinal,
            time_scale=a.time_scale,
            speed=a.speed,
            threads=a.threads,
            peers=peers,
        )

    async def _close(self) -> None:
        if self.peers is not None:
            self.peers.close()
        if self.server is not None:
            self.server.close()
        if self.shm is not None:
            self.shm.close()  # a clean exit unlinks our segments, pooled ones too (the node: a dead one's)
        if self.executor is not None:
            self.executor.close()
        self.ctl.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.ctx.term()

    async def _parent_watchdog(self) -> None:
        # A worker must not outlive its node (no orphans after a node crash).
        parent = self.args.parent_pid
        while parent is not None:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                self.log.warning("worker.orphaned", parent_pid=parent)
                self.stopping.set()
                return
        await self.stopping.wait()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat_s)
            if self.rejoining:
                await self.ctl.send_multipart([self._hello()])  # until welcomed
            else:
                await self.ctl.send_multipart(
                    [protocol.encode(protocol.Heartbeat(queued=len(self.queue)))]
                )

    # ------------------------------------------------------------------ control

    async def _send(self, msg: protocol.Message, frames: list[Any] | None = None) -> None:
        await self.ctl.send_multipart([protocol.encode(msg), *(frames or [])], copy=False)

    async def _control_loop(self) -> None:
        while True:
            frames = await self.ctl.recv_multipart(copy=False)
            try:
                msg, _ = protocol.decode(frames, SCHEDULER_TO_WORKER)
            except ProtocolError as exc:
                self.log.warning("protocol.rejected", error=exc.message, channel="control")
                continue
            if isinstance(msg, protocol.RunTask):
                self._enqueue(msg)
            elif isinstance(msg, protocol.RunBatch):
                self._enqueue_batch(msg)
            elif isinstance(msg, protocol.CancelTask):
                await self._cancel(msg.task_id)
            elif isinstance(msg, protocol.YieldTask):
                self._yield(msg.task_id)
            elif isinstance(msg, protocol.Release):
                self.outputs.pop(msg.key, None)
                if self.shm is not None:
                    self.shm.release(msg.key)
            elif isinstance(msg, protocol.LoadStage | protocol.UnloadStage):
                self.queue.append(_Task(msg=msg))
                self.queue_event.set()
            elif isinstance(msg, protocol.Shutdown):
                self.log.info("worker.shutdown")
                self.stopping.set()
                return
            elif isinstance(msg, protocol.Reregister):
                if not self.rejoining:
                    self.log.info("worker.rejoining")
                    self.rejoining = True
                    await self.ctl.send_multipart([self._hello()])
            elif isinstance(msg, protocol.WorkerWelcome):
                if self.rejoining:
                    await self._rejoined(msg)
            elif isinstance(msg, protocol.Reject):
                self.log.error("worker.rejected", reason=msg.reason)
                self.exit_code = EXIT_REJECTED
                self.stopping.set()
                return

    async def _rejoined(self, msg: protocol.WorkerWelcome) -> None:
        """Welcomed again by a scheduler that knows nothing of our past: what we queued,
        kept or loaded for the old one is dropped, and the executor (with its weights)
        is closed and made anew once the running task, if any, has stopped."""
        self.rejoining = False
        self.queue.clear()
        self.outputs.clear()
        if self.shm is not None:
            self.shm.clear()
        if self.running_cancel is not None:
            self.running_cancel.set()
        while self.running is not None:
            await asyncio.sleep(0.05)
        old = self.executor
        if old is not None:
            await asyncio.get_running_loop().run_in_executor(self.pool, old.close)
        self._welcomed(msg)
        self.log.info(
            "worker.joined",
            peer_addr=self.peer_addr,
            kind=self.args.kind,
            pid=os.getpid(),
            rejoined=True,
        )

    def _peer_rejected(self, error: str) -> None:
        self.rejections.note("peer", channel="peer", error=error[:500])

    async def _cancel(self, task_id: str) -> None:
        """Drop a queued task, or stop the running one at its next denoising step."""
        for task in list(self.queue):
            if task.task_id == task_id:
                self.queue.remove(task)
                self._drop_fetch(task)
                if int(task.msg.rank) == 0:
                    await self._report_cancelled(task_id)
                return
            for member in list(task.members):
                if member.task_id == task_id:
                    task.members.remove(member)
                    self._drop_fetch(member)
                    await self._report_cancelled(task_id)
                    if not task.members:
                        self.queue.remove(task)
                    return
        running = self.running
        if running is None:
            return
        if running.task_id == task_id:
            # Degree k too: the ranks agree on the step to stop at (AgreedCancel).
            if self.running_cancel is not None:
                self.running_cancel.set()
            return
        ids = {m.task_id for m in running.members}
        if task_id in ids:
            self.cancelled_members.add(task_id)
            if ids <= self.cancelled_members and self.running_cancel is not None:
                self.running_cancel.set()

    def _yield(self, task_id: str) -> None:
        """Pause the running task's diffuse at its next step boundary. A task that is
        queued (the core only yields started ones: a late order), unknown, or riding in
        a batch (batches never pause) is left alone."""
        running, flag = self.running, self.running_cancel
        if (
            running is None
            or not isinstance(running.msg, protocol.RunTask)
            or running.task_id != task_id
            or not isinstance(flag, ProgressFlag)
        ):
            where = (
                "batch"
                if running is not None and any(m.task_id == task_id for m in running.members)
                else "queued"
                if any(t.task_id == task_id for t in self.queue)
                else "unknown"
            )
            self.log.debug("stage.yield_ignored", task_id=task_id, where=where)
            return
        flag.request_yield()
        self.log.info("stage.yield_requested", task_id=task_id)

    async def _report_cancelled(self, task_id: str) -> None:
        self.log.info("stage.cancelled", task_id=task_id, where="queued")
        await self._send(
            protocol.TaskFailed(
                task_id=task_id,
                error="cancelled",
                message="cancelled by the client",
                retryable=False,
            )
        )

    def _enqueue(self, msg: protocol.RunTask) -> None:
        task = _Task(msg=msg)
        if msg.rank == 0 and msg.inputs:
            task.inputs = asyncio.ensure_future(self._fetch_inputs(task))
        self.queue.append(task)
        self.queue_event.set()

    def _enqueue_batch(self, msg: protocol.RunBatch) -> None:
        # One queue entry: the members run as one call, at the batch's place in order.
        task = _Task(msg=msg, members=[_Task(msg=m) for m in msg.members])
        if msg.rank == 0:
            for member in task.members:
                if member.msg.inputs:
                    # Every member's inputs are fetched concurrently, from wherever each is kept.
                    member.inputs = asyncio.ensure_future(self._fetch_inputs(member))
        self.queue.append(task)
        self.queue_event.set()

    # ------------------------------------------------------------------ data plane

    async def _fetch_inputs(self, task: _Task) -> dict[str, Any]:
        assert self.peers is not None
        merged: dict[str, Any] = {}
        total = 0.0
        for ref in task.msg.inputs:
            if ref.addr == self.peer_addr:
                local = self.outputs.get(ref.key)
                if local is None:
                    raise InputLost(f"input {ref.key} is no longer kept on this device")
                merged.update(local)
                continue
            # A holder on our node (device ids are "<node>/<kind>:<i>") may have put the
            # output in shared memory already (ref.shm, from its task_finished): attach
            # it, no fetch; else it may answer a fetch with shared memory instead of frames.
            holder_node = ref.device_id.split("/", 1)[0]
            same_node = holder_node == self.args.node_id and self.shm is not None
            tensors: dict[str, Any] | None = None
            if same_node and ref.shm is not None:
                t0 = time.perf_counter()
                try:
                    tensors, via = attach_output(ref.shm, holder_node), "shm_ref"
                    secs = time.perf_counter() - t0
                except ShmError as exc:
                    # Recycled (a stale generation), gone or unreadable: fetch it.
                    self.log.info("input.shm_ref_refused", key=ref.key, error=str(exc)[:300])
            if tensors is None:
                try:
                    tensors, secs, via = await self.peers.fetch_via(
                        ref.addr, ref.key, shm=same_node
                    )
                except FetchMissing:
                    raise InputLost(
                        f"input {ref.key} is no longer kept on {ref.device_id}"
                    ) from None
                except TimeoutError:
                    raise InputLost(
                        f"input {ref.key} is unreachable: {ref.device_id} did not answer"
                    ) from None
            merged.update(tensors)
            total += secs
            self.log.info(
                "input.fetched",
                task_id=task.task_id,
                key=ref.key,
                holder=ref.device_id,
                via=via,
                seconds=round(secs, 6),
            )
        task.transfer_seconds = total
        return merged

    def _on_barrier(self, task_id: str, rank: int, ident: bytes) -> None:
        self.barriers.setdefault(task_id, []).append(ident)
        self.barrier_event.set()

    def _on_go(self, task_id: str) -> None:
        fut = self.go.get(task_id)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # ------------------------------------------------------------------ compute

    async def _run_loop(self) -> None:
        while True:
            while not self.queue:
                self.queue_event.clear()
                await self.queue_event.wait()
            task = self.queue.popleft()
            self.running = task
            self.running_cancel = ProgressFlag(self._progress_reporter(task))
            self.cancelled_members = set()
            try:
                if isinstance(task.msg, protocol.RunTask):
                    await self._run_task(task)
                elif isinstance(task.msg, protocol.RunBatch):
                    await self._run_batch(task)
                else:
                    await self._load_unload(task.msg)
            finally:
                self.running = None
                self.running_cancel = None

    # ------------------------------------------------------------------ progress

    def _progress_reporter(self, task: _Task) -> StepThrottle | None:
        """What hears a task's denoising steps: rank 0 of a task (or batch) that runs
        diffuse reports them for its task ids (a batch: every member's), throttled."""
        msg = task.msg
        if not isinstance(msg, protocol.RunTask | protocol.RunBatch):
            return None
        if msg.rank != 0 or "diffuse" not in msg.stages:
            return None
        ids = (
            [msg.task_id]
            if isinstance(msg, protocol.RunTask)
            else [m.msg.task_id for m in task.members]
        )
        loop = asyncio.get_running_loop()

        def soon(step: int, total: int) -> None:
            # From the compute thread, or the loop itself (sim devices); a closing loop
            # takes no more callbacks.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._send_progress, ids, step, total)

        return StepThrottle(soon)

    def _send_progress(self, task_ids: list[str], step: int, total: int) -> None:
        """Send without waiting: a full queue to the scheduler drops the report (the
        next one says more anyway); it never delays a task message."""
        for task_id in task_ids:
            if task_id in self.cancelled_members:
                continue
            header = protocol.encode(
                protocol.TaskProgress(task_id=task_id, step=min(step, total), total=total)
            )
            try:
                fut = self.ctl.send_multipart([header], flags=zmq.NOBLOCK)
                if fut.done():
                    fut.result()
                else:
                    fut.add_done_callback(_quiet)
            except zmq.ZMQError:
                self.progress_dropped += 1
                return

    async def _call(self, method: str, *args: Any) -> Any:
        """Call the executor: on the loop when it runs there (``<method>_async``,
        simulated devices), else in the compute thread; with the task's cancel flag."""
        assert self.executor is not None
        cancel = self.running_cancel
        on_loop = getattr(self.executor, f"{method}_async", None)
        if on_loop is not None:
            return await on_loop(*args, cancel=cancel)
        fn = functools.partial(getattr(self.executor, method), *args, cancel=cancel)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def _load_unload(self, msg: protocol.LoadStage | protocol.UnloadStage) -> None:
        assert self.executor is not None
        loop = asyncio.get_running_loop()
        try:
            if isinstance(msg, protocol.LoadStage):
                secs, source = await loop.run_in_executor(
                    self.pool, self.executor.load, msg.model, msg.stage, msg.source or "disk"
                )
                await self._report_evictions(getattr(self.executor, "evicted", None))
                if source != "resident":
                    self.log.info(
                        "stage.loaded",
                        model=msg.model,
                        stage=msg.stage,
                        seconds=secs,
                        source=source,
                    )
                await self._send(
                    protocol.StageLoaded(
                        model=msg.model, stage=msg.stage, seconds=secs, source=source
                    )
                )
            else:
                await loop.run_in_executor(self.pool, self.executor.unload, msg.model, msg.stage)
                self.log.info("stage.unloaded", model=msg.model, stage=msg.stage)
                await self._send(protocol.StageUnloaded(model=msg.model, stage=msg.stage))
        except Exception as exc:
            self.log.error("stage.load_failed", model=msg.model, stage=msg.stage, error=repr(exc))
            await self._send(
                protocol.StageLoadFailed(model=msg.model, stage=msg.stage, message=repr(exc)[:4000])
            )

    async def _barrier(self, msg: protocol.RunTask) -> None:
        """Degree-k tasks start together on all their devices (as collectives would)."""
        assert self.server is not None and self.peers is not None
        task_id, rank = msg.task_id, msg.rank
        degree = len(msg.devices)
        if rank == 0:
            while len(self.barriers.get(task_id, ())) < degree - 1:
                self.barrier_event.clear()
                await self.barrier_event.wait()
            for ident in self.barriers.pop(task_id, []):
                await self.server.send_go(ident, task_id)
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.go[task_id] = fut
            try:
                await self.peers.barrier(str(msg.leader_addr), task_id, rank)
                await asyncio.wait_for(fut, timeout=GROUP_TIMEOUT_S)
            finally:
                self.go.pop(task_id, None)

    async def _run_task(self, task: _Task) -> None:
        assert self.executor is not None
        msg: protocol.RunTask = task.msg
        task_id = msg.task_id
        rank = msg.rank
        stages = tuple(msg.stages)
        degree = len(msg.devices)
        log = self.log.bind(task_id=task_id, request_id=msg.request_id, stages=list(stages))
        loop = asyncio.get_running_loop()
        parallel = None
        try:
            inputs: dict[str, Any] | None = None
            if task.inputs is not None:
                inputs = await task.inputs
            elif rank == 0:
                inputs = {}
            if degree > 1:
                if self.args.kind == "sim":
                    await self._barrier(msg)
                else:
                    parallel = await loop.run_in_executor(self.pool, self._join_group, msg)
            if rank == 0:
                await self._send(protocol.TaskStarted(task_id=task_id))
                log.debug("stage.started")
            options = dict(msg.options)
            options["degree"] = degree
            options["rank"] = rank
            params, output = _take_output(msg.params)
            try:
                if parallel is None:
                    result = await self._call("run", msg.model, stages, inputs, params, options)
                else:
                    result = await self._call(
                        "run", msg.model, stages, inputs, params, options, parallel
                    )
            finally:
                if parallel is not None:
                    await loop.run_in_executor(self.pool, _leave_group, parallel)
        except Exception as exc:
            error, message, retryable = _failure(exc, degree)
            if isinstance(exc, TaskCancelled):
                log.info("stage.cancelled", where="running")
                log = None
            elif not isinstance(exc, OutOfMemory | StageError):
                log.error("stage.failed", error=repr(exc), traceback=traceback.format_exc(limit=8))
                log = None  # logged with its traceback already
            await self._fail(
                task_id,
                rank,
                error,
                message,
                retryable=retryable,
                log=log,
                stage=getattr(exc, "failed_stage", None),
            )
            return
        await self._report_loads([result], log)
        if rank != 0:
            return
        if await self._finished(task_id, bool(msg.final), result, task.transfer_seconds, output):
            log.debug("stage.finished", seconds=result.stage_seconds)

    async def _finished(
        self,
        task_id: str,
        final: bool,
        result: TaskResult,
        transfer_seconds: float,
        output: tuple[str, int] | None = None,
    ) -> bool:
        """Report a task done: a final output goes to the scheduler (for the client),
        encoded as the request's ``output`` (type, fps) asks, any other is kept here under
        the task id for the next stage to fetch. A paused diffuse (``steps_done``) keeps
        its chunk state here even when the task was final. False when encoding failed
        (reported)."""
        if result.steps_done is not None:
            final = False  # its later stages did not run: the state waits for its resume
        outputs, info = result.outputs, None
        if final and output is not None:
            try:
                outputs, info = await asyncio.to_thread(_encode_output, outputs, *output)
            except Exception as exc:
                await self._fail(
                    task_id,
                    0,
                    "stage_failed",
                    f"could not encode the output as {output[0]}: {exc!r}",
                    retryable=False,
                    log=self.log.bind(task_id=task_id),
                    stage="decode",
                )
                return False
        meta, frames = pack_tensors(outputs)
        nbytes = sum(memoryview(f).nbytes for f in frames)
        report = protocol.TaskFinished(
            task_id=task_id,
            stage_seconds=dict(result.stage_seconds),
            transfer_seconds=transfer_seconds,
            load_seconds=result.load_seconds,
            output_bytes=nbytes,
            tensors=[protocol.TensorDesc(**m) for m in meta] if final else None,
            output=info,
            peak_bytes=result.peak_bytes,
            resident_bytes=result.resident_bytes,
            stage_peak_bytes=dict(result.stage_peak_bytes) or None,
            steps_done=result.steps_done,
        )
        if result.steps_done is not None:
            self.log.info("stage.yielded", task_id=task_id, steps_done=result.steps_done)
        if final:
            await self._send(report, frames)
        else:
            # Kept past the task: a tensor aliasing a producer's shm segment (an input
            # passed through) is copied out, as the producer recycles it at release.
            self.outputs[task_id] = detach(result.outputs)
            if self.eager_shm and self.server is not None:
                # Into a pooled segment now, so a consumer on this node attaches it with
                # no fetch (the scheduler passes the reference on; release recycles it).
                seg = await self.server.export(task_id)
                if seg is not None and task_id in self.outputs:
                    report.kept_shm = shm_output(seg)
            await self._send(report)
        return True

    async def _report_loads(self, results: list[TaskResult], log: Any) -> None:
        """Stage loads and evictions of a call, each once however many results carry it
        (every member of a batch carries the batch's)."""
        evicted: list[tuple[str, str]] = []
        loaded: dict[tuple[str, str], tuple[float, str]] = {}
        for r in results:
            evicted += [e for e in r.evicted if e not in evicted]
            for model, stage, secs, source in r.loaded:
                loaded.setdefault((model, stage), (secs, source))
        await self._report_evictions(evicted)
        for (model, stage), (secs, source) in loaded.items():
            log.info("stage.loaded", model=model, stage=stage, seconds=secs, source=source)
            await self._send(
                protocol.StageLoaded(model=model, stage=stage, seconds=secs, source=source)  # type: ignore[arg-type]
            )

    async def _run_batch(self, task: _Task) -> None:
        """Run a ``run_batch``: the members whose inputs arrived, as one executor call."""
        assert self.executor is not None
        msg: protocol.RunBatch = task.msg
        stages = tuple(msg.stages)
        degree = len(msg.devices)
        blog = self.log.bind(batch_id=msg.batch_id, stages=list(stages))

        def member_log(member: _Task) -> Any:
            return blog.bind(task_id=member.msg.task_id, request_id=member.msg.request_id)

        if degree != 1 or msg.rank != 0:
            # The scheduler never sends these (it fails such batches itself).
            for member in task.members:
                self._drop_fetch(member)
                await self._fail(
                    member.msg.task_id,
                    0,
                    "internal",
                    f"batches run at degree 1, not {degree}",
                    retryable=False,
                    log=member_log(member),
                )
            return
        live: list[tuple[_Task, dict[str, Any]]] = []
        for member in task.members:
            try:
                inputs = await member.inputs if member.inputs is not None else {}
            except Exception as exc:
                await self._fail_with(member.msg.task_id, exc, degree, member_log(member))
                continue
            live.append((member, inputs))
        if not live:
            return
        for member, _ in live:
            await self._send(protocol.TaskStarted(task_id=member.msg.task_id))
        options = dict(msg.options)
        options["degree"] = degree
        inputs_list: list[Any] = [inp for _, inp in live]
        taken = [_take_output(m.msg.params) for m, _ in live]
        params_list: list[Any] = [p for p, _ in taken]
        blog.debug("batch.started", size=len(live))
        try:
            results = await self._call(
                "run_batch", msg.model, stages, inputs_list, params_list, options
            )
            if len(results) != len(live):
                raise RuntimeError(
                    f"executor returned {len(results)} results for {len(live)} members"
                )
        except Exception as exc:
            # The call as a whole failed (e.g. the batch did not fit): every member fails.
            if not isinstance(exc, OutOfMemory | StageError | TaskCancelled):
                blog.error("batch.failed", error=repr(exc), traceback=traceback.format_exc(limit=8))
            for member, _ in live:
                await self._fail_with(member.msg.task_id, exc, degree, member_log(member))
            return
        await self._report_loads([r for r in results if isinstance(r, TaskResult)], blog)
        for (member, _), (_, output), res in zip(live, taken, results, strict=True):
            task_id = member.msg.task_id
            mlog = member_log(member)
            if task_id in self.cancelled_members:
                await self._fail(
                    task_id, 0, "cancelled", "cancelled by the client", retryable=False, log=mlog
                )
                continue
            if isinstance(res, TaskResult):
                final = bool(member.msg.final)
                if await self._finished(task_id, final, res, member.transfer_seconds, output):
                    mlog.debug("stage.finished", seconds=res.stage_seconds)
                continue
            error, message, retryable = _failure(res, degree)
            if not isinstance(res, OutOfMemory | StageError):
                mlog.error(
                    "stage.failed",
                    error=repr(res),
                    traceback="".join(traceback.format_exception(res, limit=8)),
                )
                mlog = None
            await self._fail(task_id, 0, error, message, retryable=retryable, log=mlog)

    @staticmethod
    def _drop_fetch(member: _Task) -> None:
        """Stop a member's input fetch that will not be used (and mark a failed one as
        seen, so asyncio does not warn about an unretrieved exception)."""
        fut = member.inputs
        if fut is None:
            return
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()

    async def _report_evictions(self, evicted: list[tuple[str, str]] | None) -> None:
        """Stages dropped to make room: the scheduler's view of residency must follow."""
        while evicted:
            model, stage = evicted.pop(0)
            self.log.info("stage.unloaded", model=model, stage=stage, reason="evicted for memory")
            await self._send(protocol.StageUnloaded(model=model, stage=stage))  # type: ignore[arg-type]

    def _join_group(self, msg: protocol.RunTask) -> Any:
        from trident.pipelines.parallel import join_group

        group = msg.group
        if group is None or group.rendezvous is None:
            raise StageError(
                f"task {msg.task_id} at degree {len(msg.devices)} carries no process group"
            )
        backend = "nccl" if self.args.kind == "cuda" else "gloo"
        return join_group(
            group.rendezvous,
            group.key,
            msg.rank,
            len(msg.devices),
            backend,
            timeout=GROUP_TIMEOUT_S,
        )

    async def _fail_with(self, task_id: str, exc: BaseException, degree: int, log: Any) -> None:
        """Report a batch member (rank 0) failed by ``exc``, as :func:`_failure` says."""
        error, message, retryable = _failure(exc, degree)
        await self._fail(task_id, 0, error, message, retryable=retryable, log=log)

    async def _fail(
        self,
        task_id: str,
        rank: int,
        error: str,
        message: str,
        *,
        retryable: bool,
        log: Any,
        stage: str | None = None,
    ) -> None:
        if log is not None:
            log.warning("stage.failed", error=error, message=message, stage=stage)
        if rank == 0:
            await self._send(
                protocol.TaskFailed(
                    task_id=task_id,
                    error=error,
                    message=message[:60_000],
                    retryable=retryable,
                    stage=_as_stage(stage),
                )
            )
        if error == "out_of_memory":
            await self._free_memory()

    async def _free_memory(self) -> None:
        """After an out-of-memory failure, before the next task: gc, then the CUDA
        cache back to the driver (the executor's ``free_memory``, in the compute
        thread). Once per queue entry however many batch members failed."""
        done = self._freed_after() if self._freed_after is not None else None
        if self.executor is None or (done is not None and done is self.running):
            return
        self._freed_after = weakref.ref(self.running) if self.running is not None else None
        try:
            freed = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.executor.free_memory
            )
        except Exception as exc:  # the next task may still fit: keep serving
            self.log.warning("device.memory_free_failed", error=repr(exc))
            return
        self.log.info("device.memory_freed", **freed)


_STAGE_NAMES: dict[str, protocol.Stage] = {s: s for s in STAGES}


def _as_stage(stage: str | None) -> protocol.Stage | None:
    return _STAGE_NAMES.get(stage) if stage else None


def _take_output(params: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, int] | None]:
    """A task's params without the request's output type, and that type with its fps
    (None for ``np``): the stages never see them; the final output is encoded with them."""
    params = dict(params)
    kind = params.pop(protocol.OUTPUT_TYPE_PARAM, None)
    fps = params.pop(protocol.OUTPUT_FPS_PARAM, None)
    if kind is None or kind == "np":
        return params, None
    return params, (str(kind), int(fps or DEFAULT_FPS))


def _encode_output(
    outputs: dict[str, Any], kind: str, fps: int
) -> tuple[dict[str, Any], protocol.OutputInfo]:
    """Decode's outputs with ``output`` encoded as ``kind`` (in a thread: an MP4 takes
    seconds); an encoded file travels as a 1-D uint8 tensor of its bytes."""
    if kind not in OUTPUT_TYPES or "output" not in outputs:
        raise ValueError(f"no output to encode as {kind!r} (outputs: {sorted(outputs)})")
    start = time.perf_counter()
    value, shape = encode_output(outputs["output"], kind, fps=fps)
    if isinstance(value, bytes):
        value = np.frombuffer(value, dtype=np.uint8)
    info = protocol.OutputInfo(
        type=kind,  # type: ignore[arg-type]
        shape=list(shape),
        seconds=time.perf_counter() - start,
    )
    return {**outputs, "output": value}, info


def _quiet(fut: Any) -> None:
    """Retrieve a dropped send's exception (nobody waits for a progress report)."""
    if not fut.cancelled():
        fut.exception()


def _warm_torch() -> None:
    # Importing diffusers + transformers costs seconds; pay it before saying hello,
    # not inside the first request.
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import trident.pipelines.families  # noqa: F401


def _cuda_memory(ordinal: int, configured: int) -> dict[str, int]:
    import torch

    from trident.runtime.devices import cuda_memory

    return cuda_memory(torch.cuda, ordinal, configured)


def _host_store(host: str) -> str:
    from trident.pipelines.parallel import host_store

    return host_store(host)


def _leave_group(ctx: Any) -> None:
    from trident.pipelines.parallel import leave_group

    leave_group(ctx)


def _parse(argv: list[str] | None) -> WorkerArgs:
    p = argparse.ArgumentParser(
        prog="trident-worker", description="A Trident stage worker (spawned by trident-node)."
    )
    p.add_argument("--scheduler", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--kind", required=True, choices=["cpu", "sim", "cuda"])
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--ordinal", type=int, default=0)
    p.add_argument("--memory-bytes", type=int, required=True)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-file", default=None)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--curve-dir", default=None)
    ns = p.parse_args(argv)
    return WorkerArgs(
        scheduler=ns.scheduler,
        node_id=ns.node_id,
        kind=ns.kind,
        index=ns.index,
        ordinal=ns.ordinal,
        memory_bytes=ns.memory_bytes,
        speed=ns.speed,
        host=ns.host,
        time_scale=ns.time_scale,
        threads=ns.threads,
        log_file=ns.log_file,
        parent_pid=ns.parent_pid,
        curve_dir=ns.curve_dir,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    configure_logging(args.log_file)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    worker = Worker(args)

    async def _main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopping.set)
        return await worker.run()

    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
