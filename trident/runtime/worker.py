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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from trident.errors import ProtocolError
from trident.log import configure_logging, get_logger
from trident.runtime import protocol
from trident.runtime.dataplane import FetchMissing, PeerClient, PeerServer
from trident.runtime.devices import (
    Executor,
    OutOfMemory,
    SimExecutor,
    StageError,
    TaskResult,
    make_executor,
)
from trident.runtime.serial import pack_tensors
from trident.runtime.transport import make_socket

__all__ = ["Worker", "WorkerArgs", "main"]

EXIT_REJECTED = 3
EXIT_NO_SCHEDULER = 4
# A partner that never joins (it died) must not wedge this worker for long.
GROUP_TIMEOUT_S = 60.0


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


@dataclass
class _Task:
    msg: dict[str, Any]  # the message; for a batch member, its map in "members"
    inputs: asyncio.Future[dict[str, Any]] | None = None
    transfer_seconds: float = 0.0
    members: list[_Task] = field(default_factory=list)  # run_batch only


def _failure(exc: BaseException, degree: int) -> tuple[str, str, bool]:
    """(error code, message, retryable) reported for a task that raised ``exc``."""
    if isinstance(exc, OutOfMemory):
        return "out_of_memory", str(exc), False
    if isinstance(exc, StageError):
        # A lost input is the holder's failure, not the request's: a re-run may succeed.
        return "stage_failed", str(exc), "no longer kept" in str(exc)
    # At degree k a failure is usually a partner's (a collective broke): another
    # instance may well succeed. At degree 1 it is the request's own.
    return "stage_failed", f"{type(exc).__name__}: {exc}", degree > 1


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

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        a = self.args
        keys = None
        if a.curve_dir:
            from trident.runtime.security import daemon_keys, start_authenticator

            keys = daemon_keys(a.curve_dir)
            self.auth = start_authenticator(self.ctx, a.curve_dir)
        self.ctl = make_socket(self.ctx, zmq.DEALER, identity=f"dev:{a.device_id}".encode(), curve=keys)
        self.ctl.connect(a.scheduler)
        self.server = PeerServer(
            self.ctx, a.host, self.outputs, on_barrier=self._on_barrier,
            on_error=lambda e: self.log.warning("protocol.error", channel="peer", error=e),
            curve=keys,
        )
        self.peer_addr = self.server.address
        self.peers = PeerClient(self.ctx, on_go=self._on_go, curve=keys)
        if a.kind in ("cpu", "cuda"):
            # Import torch before saying hello so the first task does not pay for it,
            # and host the rendezvous store degree-k instances led by us will use.
            await asyncio.get_running_loop().run_in_executor(self.pool, _warm_torch)
            self.store_addr = await asyncio.get_running_loop().run_in_executor(self.pool, _host_store, a.host)
        code = await self._handshake()
        if code is not None:
            return code
        self.log.info("worker.joined", peer_addr=self.peer_addr, kind=a.kind, pid=os.getpid())
        loops = [
            asyncio.create_task(self._control_loop(), name="control"),
            asyncio.create_task(self.server.serve(), name="peer"),
            asyncio.create_task(self._run_loop(), name="run"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._parent_watchdog(), name="watchdog"),
        ]
        await self.stopping.wait()
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self._close()
        return 0

    async def _handshake(self) -> int | None:
        a = self.args
        hello = protocol.encode(
            "worker_hello",
            version=protocol.PROTOCOL_VERSION,
            device_id=a.device_id,
            node_id=a.node_id,
            index=a.index,
            kind=a.kind,
            memory_bytes=a.memory_bytes,
            speed=a.speed,
            peer_addr=self.peer_addr,
            store_addr=self.store_addr,
            pid=os.getpid(),
        )
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            await self.ctl.send_multipart([hello])
            if await self.ctl.poll(2000):
                header, _ = protocol.decode(await self.ctl.recv_multipart())
                if header["t"] == "reject":
                    self.log.error("worker.rejected", reason=header["reason"])
                    print(f"trident worker: rejected by scheduler: {header['reason']}", file=sys.stderr)
                    return EXIT_REJECTED
                if header["t"] == "worker_welcome":
                    self.models = dict(header["models"])
                    self.args.heartbeat_s = float(header["heartbeat_s"])
                    self.executor = make_executor(
                        a.kind,
                        self.models,
                        memory_bytes=a.memory_bytes,
                        ordinal=a.ordinal,
                        time_scale=a.time_scale,
                        speed=a.speed,
                        threads=a.threads,
                    )
                    return None
        self.log.error("worker.no_scheduler", scheduler=a.scheduler)
        return EXIT_NO_SCHEDULER

    async def _close(self) -> None:
        if self.peers is not None:
            self.peers.close()
        if self.server is not None:
            self.server.close()
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

    async def _heartbeat_loop(self) -> None:
        msg = protocol.encode("heartbeat", queued=0)
        while True:
            await asyncio.sleep(self.args.heartbeat_s)
            await self.ctl.send_multipart([msg])

    # ------------------------------------------------------------------ control

    async def _send(self, msg_type: str, frames: list[Any] | None = None, /, **fields: Any) -> None:
        header = protocol.encode(msg_type, fields)
        await self.ctl.send_multipart([header, *(frames or [])], copy=False)

    async def _control_loop(self) -> None:
        while True:
            frames = await self.ctl.recv_multipart(copy=False)
            try:
                header, _ = protocol.decode(frames)
            except ProtocolError as exc:
                self.log.warning("protocol.error", error=str(exc), channel="control")
                continue
            t = header["t"]
            if t == "run_task":
                self._enqueue(header)
            elif t == "run_batch":
                self._enqueue_batch(header)
            elif t == "release":
                self.outputs.pop(str(header["key"]), None)
            elif t == "load_stage" or t == "unload_stage":
                self.queue.append(_Task(msg=header))
                self.queue_event.set()
            elif t == "shutdown":
                self.log.info("worker.shutdown")
                self.stopping.set()
                return
            elif t == "reregister":
                await self._handshake()
            elif t == "reject":
                self.log.error("worker.rejected", reason=header.get("reason"))
                self.stopping.set()
                return

    def _enqueue(self, msg: dict[str, Any]) -> None:
        task = _Task(msg=msg)
        if int(msg["rank"]) == 0 and msg["inputs"]:
            task.inputs = asyncio.ensure_future(self._fetch_inputs(task))
        self.queue.append(task)
        self.queue_event.set()

    def _enqueue_batch(self, msg: dict[str, Any]) -> None:
        # One queue entry: the members run as one call, at the batch's place in order.
        task = _Task(msg=msg, members=[_Task(msg=dict(m)) for m in msg["members"]])
        if int(msg["rank"]) == 0:
            for member in task.members:
                if member.msg["inputs"]:
                    # Every member's inputs are fetched concurrently, from wherever each is kept.
                    member.inputs = asyncio.ensure_future(self._fetch_inputs(member))
        self.queue.append(task)
        self.queue_event.set()

    # ------------------------------------------------------------------ data plane

    async def _fetch_inputs(self, task: _Task) -> dict[str, Any]:
        assert self.peers is not None
        merged: dict[str, Any] = {}
        total = 0.0
        for ref in task.msg["inputs"]:
            key, addr = str(ref["key"]), str(ref["addr"])
            if addr == self.peer_addr:
                local = self.outputs.get(key)
                if local is None:
                    raise StageError(f"input {key} is no longer kept on this device")
                merged.update(local)
                continue
            try:
                tensors, secs = await self.peers.fetch(addr, key)
            except FetchMissing:
                raise StageError(f"input {key} is no longer kept on {ref.get('device_id')}") from None
            except TimeoutError:
                raise StageError(f"input {key} is no longer kept: {ref.get('device_id')} did not answer") from None
            merged.update(tensors)
            total += secs
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
            t = task.msg["t"]
            if t == "run_task":
                await self._run_task(task)
            elif t == "run_batch":
                await self._run_batch(task)
            elif t in ("load_stage", "unload_stage"):
                await self._load_unload(task.msg)

    async def _load_unload(self, msg: dict[str, Any]) -> None:
        assert self.executor is not None
        loop = asyncio.get_running_loop()
        model, stage = str(msg["model"]), str(msg["stage"])
        try:
            if msg["t"] == "load_stage":
                secs, source = await loop.run_in_executor(
                    self.pool, self.executor.load, model, stage, str(msg.get("source") or "disk")
                )
                await self._report_evictions(getattr(self.executor, "evicted", None))
                if source != "resident":
                    self.log.info("stage.loaded", model=model, stage=stage, seconds=secs, source=source)
                await self._send("stage_loaded", model=model, stage=stage, seconds=secs, source=source)
            else:
                await loop.run_in_executor(self.pool, self.executor.unload, model, stage)
                self.log.info("stage.unloaded", model=model, stage=stage)
                await self._send("stage_unloaded", model=model, stage=stage)
        except Exception as exc:
            self.log.warning("stage.load_failed", model=model, stage=stage, error=str(exc))

    async def _barrier(self, msg: dict[str, Any]) -> None:
        """Degree-k tasks start together on all their devices (as collectives would)."""
        assert self.server is not None and self.peers is not None
        task_id, rank = str(msg["task_id"]), int(msg["rank"])
        degree = len(msg["devices"])
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
                await self.peers.barrier(str(msg["leader_addr"]), task_id, rank)
                await asyncio.wait_for(fut, timeout=600.0)
            finally:
                self.go.pop(task_id, None)

    async def _run_task(self, task: _Task) -> None:
        assert self.executor is not None
        msg = task.msg
        task_id = str(msg["task_id"])
        rank = int(msg["rank"])
        stages = tuple(str(s) for s in msg["stages"])
        degree = len(msg["devices"])
        log = self.log.bind(task_id=task_id, request_id=msg["request_id"], stages=list(stages))
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
                await self._send("task_started", task_id=task_id)
                log.debug("stage.started")
            options = dict(msg.get("options") or {})
            options["degree"] = degree
            try:
                if isinstance(self.executor, SimExecutor):
                    result = await self.executor.run_async(
                        str(msg["model"]), stages, inputs, dict(msg["params"]), options
                    )
                else:
                    result = await loop.run_in_executor(
                        self.pool,
                        self.executor.run,
                        str(msg["model"]),
                        stages,
                        inputs,
                        dict(msg["params"]),
                        options,
                        parallel,
                    )
            finally:
                if parallel is not None:
                    await loop.run_in_executor(self.pool, _leave_group, parallel)
        except Exception as exc:
            error, message, retryable = _failure(exc, degree)
            if not isinstance(exc, OutOfMemory | StageError):
                log.error("stage.failed", error=repr(exc), traceback=traceback.format_exc(limit=8))
                log = None  # logged with its traceback already
            await self._fail(task_id, rank, error, message, retryable=retryable, log=log)
            return
        await self._report_loads([result], log)
        if rank != 0:
            return
        await self._finished(task_id, bool(msg["final"]), result, task.transfer_seconds)
        log.debug("stage.finished", seconds=result.stage_seconds)

    async def _finished(self, task_id: str, final: bool, result: TaskResult, transfer_seconds: float) -> None:
        """Report a task done: a final output goes to the scheduler (for the client),
        any other is kept here under the task id for the next stage to fetch."""
        meta, frames = pack_tensors(result.outputs)
        nbytes = sum(memoryview(f).nbytes for f in frames)
        fields: dict[str, Any] = {
            "task_id": task_id,
            "stage_seconds": result.stage_seconds,
            "transfer_seconds": transfer_seconds,
            "load_seconds": result.load_seconds,
            "output_bytes": nbytes,
        }
        if final:
            await self._send("task_finished", frames, tensors=meta, **fields)
        else:
            self.outputs[task_id] = result.outputs
            await self._send("task_finished", **fields)

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
            await self._send("stage_loaded", model=model, stage=stage, seconds=secs, source=source)

    async def _run_batch(self, task: _Task) -> None:
        """Run a ``run_batch``: the members whose inputs arrived, as one executor call."""
        assert self.executor is not None
        msg = task.msg
        batch_id = str(msg["batch_id"])
        stages = tuple(str(s) for s in msg["stages"])
        degree = len(msg["devices"])
        blog = self.log.bind(batch_id=batch_id, stages=list(stages))

        def member_log(member: _Task) -> Any:
            return blog.bind(task_id=str(member.msg["task_id"]), request_id=member.msg["request_id"])

        if degree != 1 or int(msg["rank"]) != 0:
            # The scheduler never sends these (it fails such batches itself).
            for member in task.members:
                self._drop_fetch(member)
                await self._fail(
                    str(member.msg["task_id"]), 0, "internal", f"batches run at degree 1, not {degree}",
                    retryable=False, log=member_log(member),
                )
            return
        live: list[tuple[_Task, dict[str, Any]]] = []
        for member in task.members:
            try:
                inputs = await member.inputs if member.inputs is not None else {}
            except Exception as exc:
                error, message, retryable = _failure(exc, degree)
                await self._fail(str(member.msg["task_id"]), 0, error, message, retryable=retryable, log=member_log(member))
                continue
            live.append((member, inputs))
        if not live:
            return
        for member, _ in live:
            await self._send("task_started", task_id=str(member.msg["task_id"]))
        options = dict(msg.get("options") or {})
        options["degree"] = degree
        model = str(msg["model"])
        inputs_list: list[Any] = [inp for _, inp in live]
        params_list: list[Any] = [dict(m.msg["params"]) for m, _ in live]
        blog.debug("batch.started", size=len(live))
        try:
            if isinstance(self.executor, SimExecutor):
                results = await self.executor.run_batch_async(model, stages, inputs_list, params_list, options)
            else:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(
                    self.pool, self.executor.run_batch, model, stages, inputs_list, params_list, options, None
                )
            if len(results) != len(live):
                raise RuntimeError(f"executor returned {len(results)} results for {len(live)} members")
        except Exception as exc:
            # The call as a whole failed (e.g. the batch did not fit): every member fails.
            error, message, retryable = _failure(exc, degree)
            if not isinstance(exc, OutOfMemory | StageError):
                blog.error("batch.failed", error=repr(exc), traceback=traceback.format_exc(limit=8))
            for member, _ in live:
                await self._fail(str(member.msg["task_id"]), 0, error, message, retryable=retryable, log=member_log(member))
            return
        await self._report_loads([r for r in results if isinstance(r, TaskResult)], blog)
        for (member, _), res in zip(live, results, strict=True):
            task_id = str(member.msg["task_id"])
            mlog = member_log(member)
            if isinstance(res, TaskResult):
                await self._finished(task_id, bool(member.msg["final"]), res, member.transfer_seconds)
                mlog.debug("stage.finished", seconds=res.stage_seconds)
                continue
            error, message, retryable = _failure(res, degree)
            if not isinstance(res, OutOfMemory | StageError):
                mlog.error(
                    "stage.failed", error=repr(res),
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
            await self._send("stage_unloaded", model=model, stage=stage)

    def _join_group(self, msg: dict[str, Any]) -> Any:
        from trident.pipelines.parallel import join_group

        group = msg["group"]
        backend = "nccl" if self.args.kind == "cuda" else "gloo"
        return join_group(
            str(group["rendezvous"]), str(group["key"]), int(msg["rank"]), len(msg["devices"]), backend,
            timeout=GROUP_TIMEOUT_S,
        )

    async def _fail(self, task_id: str, rank: int, error: str, message: str, *, retryable: bool, log: Any) -> None:
        if log is not None:
            log.warning("stage.failed", error=error, message=message)
        if rank == 0:
            await self._send("task_failed", task_id=task_id, error=error, message=message, retryable=retryable)


def _warm_torch() -> None:
    # Importing diffusers + transformers costs seconds; pay it before saying hello,
    # not inside the first request.
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import trident.pipelines.families  # noqa: F401


def _host_store(host: str) -> str:
    from trident.pipelines.parallel import host_store

    return host_store(host)


def _leave_group(ctx: Any) -> None:
    from trident.pipelines.parallel import leave_group

    leave_group(ctx)


def _parse(argv: list[str] | None) -> WorkerArgs:
    p = argparse.ArgumentParser(prog="trident-worker", description="A Trident stage worker (spawned by trident-node).")
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

