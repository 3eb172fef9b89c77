"""``trident-scheduler``: the cluster's one scheduler daemon.

It owns two ROUTER sockets — clients on ``--client-addr``; nodes and their workers on
``--node-addr`` — turns what arrives into events for the sans-IO scheduler core
(:mod:`trident.sched`), and carries out the commands the core returns. It decides
nothing itself: every choice of where and when a stage runs is the core's.

Isolation: the event loop only does I/O. The core runs on its own thread, one round
at a time, over every event that arrived since the last round (``handle_many``), so a
slow dispatch round never delays a heartbeat, a ping or an "overloaded" answer. The
cluster socket is read before the client socket each turn and client intake is
bounded per turn; liveness is judged only once the cluster socket has been read dry.

Supervision: every loop runs under :meth:`SchedulerDaemon._supervised`; a handler
that raises on one message logs the traceback and answers that sender with an error;
a loop that dies takes the process down with exit status 1 (systemd / Kubernetes
restart it) — never a live process that stopped serving.

Liveness: a worker or node silent for longer than ``worker_ttl_s`` is lost (and its
node is told to kill and restart a silent worker); a node also reports a worker's
exit at once (two channels, as vLLM does). A client that heartbeats (the SDK does)
and goes silent for ``client_ttl_s`` has its requests cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
import traceback
import typing
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from trident.cliformat import DefaultsHelpFormatter
from trident.config import (
    DTYPES,
    SchedulerConfig,
    apply_dtype_flags,
    load_scheduler_config,
    parse_model_flag,
)
from trident.errors import ConfigError, InvalidRequestError, ModelError, ProtocolError, TridentError
from trident.log import configure_logging, flush_logs, get_logger
from trident.runtime import protocol
from trident.runtime.journal import AcceptedRecord, RequestJournal
from trident.runtime.memtruth import task_memory_fields
from trident.runtime.metrics import (
    MetricsServer,
    SchedulerMetrics,
    parse_metrics_addr,
    serve_metrics,
)
from trident.runtime.protocol import (
    CLIENT_TO_SCHEDULER,
    CLUSTER_TO_SCHEDULER,
    Cancel,
    Heartbeat,
    ModelRef,
    NodeBye,
    NodeHeartbeat,
    NodeHello,
    Ping,
    Submit,
    WorkerExited,
    WorkerHello,
)
from trident.runtime.ratelimit import RejectionLog
from trident.runtime.registry import ServedModel, build_request_shape, register_models
from trident.runtime.shm import node_prefix, segment_prefix
from trident.runtime.supervise import supervised
from trident.runtime.transport import make_socket
from trident.sched.core import SchedulerCore, handle_events
from trident.sched.cost import model_weight_bytes
from trident.sched.types import (
    STAGES,
    CancelTask,
    Command,
    CompleteRequest,
    DeviceInfo,
    DeviceLost,
    DeviceUp,
    ErrorCode,
    Event,
    FailRequest,
    LoadStage,
    LogEvent,
    NodeBooting,
    NodeLost,
    Policy,
    ReleaseOutput,
    RequestArrived,
    RequestCancelled,
    RequestSpec,
    RunBatch,
    RunTask,
    StageLoaded,
    StageUnloaded,
    TaskFailed,
    TaskFinished,
    TaskStarted,
    Tick,
    UnloadStage,
    YieldTask,
    new_stimulus_id,
)

__all__ = ["SchedulerDaemon", "main", "make_core"]

# Messages read from a socket per loop turn: the cluster socket drains more, and a
# burst of client traffic cannot hold the loop for long.
CLUSTER_DRAIN_MAX = 2048
CLIENT_DRAIN_MAX = 256
CLIENT_HWM = 1000
# A core round quicker than this lets the next one run on the event loop; a slower one
# sends the next rounds to the core thread until they are quick again.
INLINE_ROUND_S = 0.002
# Per peer: far more than a worker ever has in flight (tasks, reports), and a bound on
# what a misbehaving peer can make us buffer.
CLUSTER_HWM = 2000
# A status snapshot (``trident status``, the metric gauges) is rebuilt at most this often.
STATUS_MAX_AGE_S = 0.25
DRAIN_MAX_BYTES = 4 << 20
# A booting node's workers say hello one by one; the core sees them together (one
# placement for the node, not one per worker and the weight loads of each) once all the
# devices the node announced are up, or this long after its hello at the latest.


@dataclass
class _WorkerConn:
    ident: bytes
    info: DeviceInfo
    peer_addr: str
    pid: int | None
    last_seen: float
    up: bool = True
    store_addr: str | None = None  # torch rendezvous store (cpu/cuda workers)
    resident: set[tuple[str, str]] = field(default_factory=set)  # (model, stage) it reported
    # Its kept outputs already in its shared-memory segments (task_finished.kept_shm), by
    # key, until released: passed on in a consumer's InputAddr.shm. Dies with the conn.
    shm_refs: dict[str, protocol.ShmOutput] = field(default_factory=dict)

    def own_segment(self, name: str) -> bool:
        """Whether ``name`` is one of this worker's segments (its node, index, pid)."""
        if self.pid is not None:
            prefix = segment_prefix(self.info.node_id, self.info.index, self.pid)
        else:
            prefix = f"{node_prefix(self.info.node_id)}{int(self.info.index)}-"
        return name.startswith(prefix)


# Bound on one worker's remembered shm references (only an optimisation: past it the
# oldest are forgotten and their consumers fetch).
MAX_SHM_REFS = 4096


@dataclass
class _NodeConn:
    ident: bytes
    node_id: str
    last_seen: float
    devices: list[dict[str, Any]] = field(default_factory=list)
    up: bool = True


@dataclass
class _Pending:
    client: bytes
    client_rid: str
    arrival: float
    heartbeat: bool = False  # its client heartbeats: silence means it went away
    model: str = ""
    dispatched: bool = False  # a stage of it was sent to a device (else: refused at admission)


@dataclass
class _ClientConn:
    last_seen: float
    heartbeats: bool = False


def output_params(served: ServedModel, output_type: str, fps: int | None) -> dict[str, Any]:
    """The params that carry a request's ``output_type`` to its decode worker (none for
    ``np``: such a request is exactly as before). Raises InvalidRequestError when the
    model cannot give that type (png is for images, mp4 for videos)."""
    from trident.families import FAMILIES
    from trident.runtime.encode import DEFAULT_FPS, check_output_type

    try:
        check_output_type(output_type, is_video=served.info.is_video, model=served.info.name)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    if fps is not None and output_type != "mp4":
        raise InvalidRequestError(f"fps={fps} applies to output_type='mp4' only")
    if output_type == "np":
        return {}
    out: dict[str, Any] = {protocol.OUTPUT_TYPE_PARAM: output_type}
    if output_type == "mp4":
        spec = FAMILIES.get(served.info.family)
        default = spec.default_fps if spec is not None else None
        out[protocol.OUTPUT_FPS_PARAM] = fps or default or DEFAULT_FPS
    return out


def make_core(cfg: SchedulerConfig, served: dict[str, ServedModel]) -> Policy:
    """The scheduling policy named by the configuration."""
    models = {name: m.info for name, m in served.items()}
    from trident.sched.cost import ScaledCostModel, load_cost_model
    from trident.sched.registry import make_policy

    cost: Any = load_cost_model(cfg.profiles or None)
    if cfg.time_scale != 1.0:
        cost = ScaledCostModel(cost, cfg.time_scale)
    # [scheduler] slo_scale / max_queue, then the policy's own options (one parser:
    # trident.sched.registry.parse_policy_options; unknown or bad ones: ConfigError).
    options = {"slo_scale": cfg.slo_scale, "max_queue": cfg.max_queue, **cfg.policy_options}
    policy = make_policy(cfg.policy, models, cost, **options)
    if isinstance(policy, SchedulerCore):
        policy.clock = time.perf_counter  # solve times in the logs; decisions never read it
    return policy


class SchedulerDaemon:
    def __init__(
        self,
        cfg: SchedulerConfig,
        served: dict[str, ServedModel],
        core: Policy | None = None,
        *,
        metrics_addr: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.served = served
        self.core = core if core is not None else make_core(cfg, served)
        self.log = get_logger("scheduler")
        self.ctx = zmq.asyncio.Context()
        self.clients: Any = None
        self.nodes_sock: Any = None
        self.workers: dict[str, _WorkerConn] = {}  # device id -> connection
        self.worker_by_ident: dict[bytes, str] = {}
        self.nodes: dict[str, _NodeConn] = {}
        self.pending: dict[str, _Pending] = {}  # request id -> who asked
        self.client_conns: dict[bytes, _ClientConn] = {}
        # request id -> (meta, frames, how the output is encoded: None for np)
        self.results: dict[str, tuple[list[Any], list[Any], protocol.OutputInfo | None]] = {}
        self.task_info: dict[str, RunTask] = {}
        # Events for the core's next round (filled by the I/O loop, taken by the core loop).
        self.events: list[Event] = []
        self._core_in_thread = False  # rounds run on the core thread now
        self._last_round_s = 0.0  # wall seconds of the last core round
        self._background: set[asyncio.Task[None]] = set()
        self.out: list[tuple[Any, list[Any]]] = []  # (socket, frames) to send
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self.counters = {
            "dispatched": 0,
            "finished": 0,
            "failed": 0,
            "batches": 0,
            "overloaded": 0,
            "protocol_rejected": 0,
        }
        self.auth: Any = None
        # The core runs here, one round at a time, off the event loop.
        self.core_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="core")
        self.fatal: BaseException | None = None
        self.exit_code = 0
        self._tick_queued = False
        self.rejections = RejectionLog(self.log, clock=self.now)
        # Accepted requests survive a crash here (``--state-dir``); None: no journal.
        self.journal: RequestJournal | None = None
        # Always counted (a few adds per event); served over HTTP with --metrics-addr.
        self.metrics = SchedulerMetrics(served)
        self.metrics_addr = metrics_addr
        self.metrics_server: MetricsServer | None = None
        self._started_tasks: set[str] = set()  # task ids whose worker said task_started
        self._batch_size: dict[str, int] = {}  # batch member task id -> members sent
        self._status: protocol.ClusterStatus | None = None  # the last snapshot, and when
        self._status_at = -1.0
        # Weight bytes per (model, stage), as the planner sizes them (resident weights).
        cost = getattr(self.core, "cost", None)
        self._weight_bytes: dict[tuple[str, str], int] = {
            (name, stage): (
                model_weight_bytes(cost, m.info, stage)
                if cost is not None
                else int(m.info.stage_weight_bytes.get(stage, 0))
            )
            for name, m in served.items()
            for stage in STAGES
        }

    def now(self) -> float:
        return time.monotonic() - self.started

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        keys = None
        if self.cfg.curve_dir:
            from trident.runtime.security import daemon_keys, start_authenticator

            keys = daemon_keys(self.cfg.curve_dir)
            self.auth = start_authenticator(self.ctx, self.cfg.curve_dir)
        self.clients = make_socket(
            # A short receive queue: past it, libzmq stops reading the senders' TCP (back
            # pressure) instead of holding their messages in our memory.
            self.ctx,
            zmq.ROUTER,
            heartbeat_ms=0,
            curve=keys,
            curve_server=True,
            hwm=CLIENT_HWM,
            zap_domain="client" if keys is not None else None,
            max_message_bytes=self.cfg.client_max_message_bytes,
        )
        self.clients.bind(self.cfg.client_addr)
        self.nodes_sock = make_socket(
            self.ctx,
            zmq.ROUTER,
            curve=keys,
            curve_server=True,
            zap_domain="cluster" if keys is not None else None,
            hwm=CLUSTER_HWM,
        )
        self.nodes_sock.bind(self.cfg.node_addr)
        if self.metrics_addr:
            self.metrics_server = serve_metrics(self.metrics_addr, self.metrics.registry)
        if self.cfg.state_dir:
            self.journal = RequestJournal(self.cfg.state_dir)
            self._recover(self.journal.replay())
        self.log.info(
            "scheduler.started",
            client_addr=self.cfg.client_addr,
            node_addr=self.cfg.node_addr,
            policy=getattr(self.core, "name", type(self.core).__name__),
            models={n: m.describe() for n, m in self.served.items()},
            metrics_addr=(
                f"{self.metrics_server.host}:{self.metrics_server.port}"
                if self.metrics_server is not None
                else None
            ),
        )
        loops = [
            asyncio.create_task(self._supervised("cluster", self._cluster_loop), name="cluster"),
            asyncio.create_task(self._supervised("clients", self._client_loop), name="clients"),
            asyncio.create_task(self._supervised("tick", self._tick_loop), name="tick"),
        ]
        await self.stopping.wait()
        await self._shutdown_cluster()
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        self.core_thread.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)
        self.clients.close(0)
        self.nodes_sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.log.info("scheduler.stopped", exit_code=self.exit_code, **self.counters)
        flush_logs()
        return self.exit_code

    def _supervised(
        self, name: str, loop_fn: Callable[[], Coroutine[Any, Any, None]]
    ) -> Coroutine[Any, Any, None]:
        return supervised(
            name, loop_fn, log=self.log, stopping=self.stopping, on_crash=self._crashed
        )

    def _crashed(self, exc: BaseException) -> None:
        """A loop or core round died: the process exits 1 (its supervisor restarts it)."""
        self.fatal = exc
        self.exit_code = 1
        self.stopping.set()

    @property
    def healthy(self) -> bool:
        return self.fatal is None and not self.stopping.is_set()

    async def _shutdown_cluster(self) -> None:
        # Fail what is still in flight: nothing is silently lost.
        for rid in list(self.pending):
            self._reply_error(rid, "unavailable", "scheduler is shutting down")
        for node in self.nodes.values():
            self.out.append((self.nodes_sock, [node.ident, protocol.encode(protocol.Shutdown())]))
        await self._flush()

    def _recover(self, records: list[AcceptedRecord]) -> None:
        """Re-admit the requests a previous process accepted and never ended: each runs
        again from the start (its stage outputs died with the old plan) and its result
        goes to the same client, which reconnects on its own (same identity)."""
        now = self.now()
        wall = time.time()
        for rec in records:
            served = self.served.get(rec.model)
            params = dict(rec.params)
            try:
                if served is None:
                    raise InvalidRequestError(f"model {rec.model!r} is no longer served")
                shape = build_request_shape(served, params)
            except InvalidRequestError as exc:
                self.log.warning(
                    "request.unrecoverable", request_id=rec.request_id, message=exc.message
                )
                self.journal.end(rec.request_id, "invalid_request")  # type: ignore[union-attr]
                continue
            arrival = now - max(0.0, wall - rec.arrival_wall)
            self.pending[rec.request_id] = _Pending(
                client=rec.client,
                client_rid=rec.client_rid,
                arrival=arrival,
                heartbeat=True,
                model=rec.model,
            )
            # A client that never comes back has its recovered requests cancelled.
            self.client_conns.setdefault(rec.client, _ClientConn(last_seen=now, heartbeats=True))
            self.log.info(
                "request.recovered",
                request_id=rec.request_id,
                model=rec.model,
                age_s=round(now - arrival, 3),
            )
            self.feed(
                RequestArrived(
                    RequestSpec(
                        request_id=rec.request_id,
                        model=rec.model,
                        shape=shape,
                        arrival=arrival,
                        slo_s=rec.slo_s,
                        params=params,
                        batchable=rec.batchable,
                    ),
                    new_stimulus_id("recovered"),
                )
            )
        if self.journal is not None:
            self.journal.commit()

    def _commit_journal(self) -> None:
        if self.journal is not None and self.journal.buffered:
            self.journal.commit()

    # ------------------------------------------------------------------ event pump

    def feed(self, event: Event) -> None:
        self.events.append(event)

    def _pump(self) -> None:
        """Run what was fed through the core. Quick rounds run right here, on the loop
        (a thread hand-off would cost more than the round); once a round is slow (over
        INLINE_ROUND_S), rounds move to the core thread, in a task of their own, until
        they are quick again. The loop is thus held at most by one unexpectedly slow
        round, and the I/O loops never wait for the core."""
        while self.events and not self._core_in_thread:
            if self._last_round_s >= INLINE_ROUND_S:
                self._core_in_thread = True
                task = asyncio.get_running_loop().create_task(self._thread_rounds())
                self._background.add(task)
                task.add_done_callback(self._round_task_done)
                return
            batch, self.events = self.events, []
            self._tick_queued = False
            t0 = time.perf_counter()
            cmds = handle_events(self.core, batch, self.now())
            self._last_round_s = time.perf_counter() - t0
            for cmd in cmds:
                self._execute(cmd)

    async def _turn(self) -> None:
        """The end of an I/O loop's turn: a core round for what it fed, the replies
        out, and then (after the replies) the journal's end records."""
        self._pump()
        await self._flush()
        self._commit_journal()

    async def _thread_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.events and self._last_round_s >= INLINE_ROUND_S:
                batch, self.events = self.events, []
                self._tick_queued = False
                now = self.now()
                t0 = time.perf_counter()
                cmds = await loop.run_in_executor(
                    self.core_thread, handle_events, self.core, batch, now
                )
                self._last_round_s = time.perf_counter() - t0
                for cmd in cmds:
                    self._execute(cmd)
                await self._flush()
                self._commit_journal()
        finally:
            self._core_in_thread = False
        await self._turn()

    def _round_task_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self.log.critical("task.crashed", task="core", error=repr(exc))
            self._crashed(exc)

    async def _flush(self) -> None:
        out, self.out = self.out, []
        for sock, frames in out:
            try:
                # Never wait on a peer: one that does not read its replies (its queue
                # is full) loses them rather than stalling the loop for everyone.
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False).result()
            except zmq.Again:
                self.counters["send_dropped"] = self.counters.get("send_dropped", 0) + 1
                self.log.warning(
                    "send.dropped",
                    peer=frames[0].decode(errors="replace")[:80],
                    reason="peer queue full",
                )
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self._unreachable(frames[0])
                else:
                    self.log.warning("send.failed", error=str(exc))

    def _unreachable(self, ident: bytes) -> None:
        dev = self.worker_by_ident.get(ident)
        if dev is not None and self.workers[dev].up:
            self._worker_lost(dev, "unreachable")
        elif ident.startswith(b"cli:"):
            self.log.info("client.gone", client=ident.decode(errors="replace"))

    # ------------------------------------------------------------------ commands

    def _execute(self, cmd: Command) -> None:
        if isinstance(cmd, RunTask):
            self._run_task(cmd)
        elif isinstance(cmd, RunBatch):
            self._run_batch(cmd)
        elif isinstance(cmd, CancelTask):
            for dev in cmd.devices:
                self._to_worker(dev, protocol.encode(protocol.CancelTask(task_id=cmd.task_id)))
            self.log.info("stage.cancelling", task_id=cmd.task_id, devices=list(cmd.devices))
        elif isinstance(cmd, YieldTask):
            # Every rank's worker hears it (degree k: the ranks agree on the step, as for
            # a cancel); the leader reports task_finished with steps_done.
            for dev in cmd.devices:
                self._to_worker(dev, protocol.encode(protocol.YieldTask(task_id=cmd.task_id)))
            self.log.info("stage.yielding", task_id=cmd.task_id, devices=list(cmd.devices))
        elif isinstance(cmd, ReleaseOutput):
            holder = self.workers.get(cmd.device_id)
            if holder is not None:
                holder.shm_refs.pop(cmd.key, None)
            self._to_worker(cmd.device_id, protocol.encode(protocol.Release(key=cmd.key)))
        elif isinstance(cmd, CompleteRequest):
            self._complete(cmd)
        elif isinstance(cmd, FailRequest):
            self._reply_error(cmd.request_id, cmd.error, cmd.message)
        elif isinstance(cmd, LoadStage):
            self._to_worker(
                cmd.device_id,
                protocol.encode(
                    protocol.LoadStage(
                        model=cmd.model, stage=cmd.stage, source=cmd.source or "disk"
                    )
                ),
            )
        elif isinstance(cmd, UnloadStage):
            self._to_worker(
                cmd.device_id,
                protocol.encode(protocol.UnloadStage(model=cmd.model, stage=cmd.stage)),
            )
        elif isinstance(cmd, LogEvent):
            self.log.info(cmd.event, **dict(cmd.fields))
            rid = cmd.fields.get("request_id")
            pend = self.pending.get(rid) if isinstance(rid, str) else None
            self.metrics.core_event(cmd.event, cmd.fields, pend.model if pend else None)

    def _to_worker(self, device_id: str, header: bytes, frames: list[Any] | None = None) -> bool:
        conn = self.workers.get(device_id)
        if conn is None or not conn.up:
            return False
        self.out.append((self.nodes_sock, [conn.ident, header, *(frames or [])]))
        return True

    def _input_refs(self, cmd: RunTask) -> list[protocol.InputAddr] | None:
        """The task's inputs as the leader will fetch them (holder's peer address), or
        None when a holder is gone (the task cannot run: the core re-plans it)."""
        inputs = []
        for ref in cmd.inputs:
            holder = self.workers.get(ref.device_id)
            if holder is None or not holder.up:
                return None
            inputs.append(
                protocol.InputAddr(
                    key=ref.key,
                    device_id=ref.device_id,
                    addr=holder.peer_addr,
                    shm=holder.shm_refs.get(ref.key),
                )
            )
        return inputs

    def _run_task(self, cmd: RunTask) -> None:
        conns = [self.workers.get(d) for d in cmd.devices]
        if any(c is None or not c.up for c in conns):
            self.feed(
                TaskFailed(cmd.task_id, "stage_failed", "device not available", retryable=True)
            )
            return
        inputs = self._input_refs(cmd)
        if inputs is None:
            self.feed(TaskFailed(cmd.task_id, "stage_failed", "input holder lost", retryable=True))
            return
        leader = conns[0]
        assert leader is not None
        self.task_info[cmd.task_id] = cmd
        self._mark_dispatched(cmd.request_id)
        self.counters["dispatched"] += 1
        group = None
        if cmd.degree > 1:
            # A fresh key per formation: a restarted partner never meets a stale group.
            group = protocol.GroupSpec(
                key=cmd.task_id.replace("/", "_"),
                rendezvous=leader.store_addr,
                devices=list(cmd.devices),
            )
        for rank, conn in enumerate(conns):
            assert conn is not None
            # The leader runs every stage of the task; the others join for diffuse only.
            its_stages = cmd.stages if rank == 0 else tuple(s for s in cmd.stages if s == "diffuse")
            options = dict(cmd.options)
            # The core said where each device loads each stage from (its device model).
            options["load_sources"] = {
                s: cmd.load_sources.get(conn.info.device_id, {}).get(s, "disk") for s in its_stages
            }
            header = protocol.encode(
                protocol.RunTask(
                    task_id=cmd.task_id,
                    request_id=cmd.request_id,
                    model=cmd.model,
                    stages=list(cmd.stages),
                    devices=list(cmd.devices),
                    rank=rank,
                    inputs=inputs if rank == 0 else [],
                    final=cmd.final,
                    params=dict(cmd.params),
                    options=options,
                    leader_addr=leader.peer_addr,
                    group=group,
                )
            )
            self.out.append((self.nodes_sock, [conn.ident, header]))
        self.log.info(
            "stage.dispatched",
            request_id=cmd.request_id,
            task_id=cmd.task_id,
            stages=list(cmd.stages),
            devices=list(cmd.devices),
            degree=cmd.degree,
            inputs=[i.device_id for i in inputs],
        )

    def _run_batch(self, cmd: RunBatch) -> None:
        """Send a batch to its device as one ``run_batch``; every member is tracked as
        its own task (started/finished/failed per member, finals kept per request)."""
        if cmd.degree != 1:
            # Batched calls at degree k would need every rank to agree on the members
            # after each one's input fetch; the planner never makes them, so the runtime
            # does not carry them: a policy bug, reported per member, not a hang.
            for t in cmd.tasks:
                self.feed(
                    TaskFailed(
                        t.task_id,
                        "internal",
                        f"batch {cmd.batch_id}: batches at degree {cmd.degree} are not supported",
                        retryable=False,
                    )
                )
            self.log.warning("batch.refused", batch_id=cmd.batch_id, degree=cmd.degree)
            return
        resumed = {t.task_id for t in cmd.tasks if t.options.get("diffuse_steps") is not None}
        if resumed:
            # Members share one options map and a batched diffuse runs every step from
            # noise: a paused diffuse cannot resume in a batch. A policy bug: the resumed
            # members fail, the others are re-planned.
            for t in cmd.tasks:
                self.feed(
                    TaskFailed(
                        t.task_id,
                        "internal" if t.task_id in resumed else "stage_failed",
                        f"batch {cmd.batch_id}: a paused diffuse cannot resume in a batch",
                        retryable=t.task_id not in resumed,
                    )
                )
            self.log.warning("batch.refused", batch_id=cmd.batch_id, resumed=sorted(resumed))
            return
        conn = self.workers.get(cmd.devices[0])
        if conn is None or not conn.up:
            for t in cmd.tasks:
                self.feed(
                    TaskFailed(t.task_id, "stage_failed", "device not available", retryable=True)
                )
            return
        live: list[tuple[RunTask, list[protocol.InputAddr]]] = []
        for t in cmd.tasks:
            inputs = self._input_refs(t)
            if inputs is None:
                # This member cannot run; the others can.
                self.feed(
                    TaskFailed(t.task_id, "stage_failed", "input holder lost", retryable=True)
                )
                continue
            live.append((t, inputs))
        if not live:
            return
        for t, _ in live:
            self.task_info[t.task_id] = t
            self._mark_dispatched(t.request_id)
            self._batch_size[t.task_id] = len(live)  # for task.memory's planned peak
        if len(self._batch_size) > 2 * len(self.task_info) + 1024:  # ended ones
            self._batch_size = {t: n for t, n in self._batch_size.items() if t in self.task_info}
        self.counters["dispatched"] += len(live)
        self.counters["batches"] += 1
        # Members share their options (same shape, same device: same decisions).
        options = dict(cmd.tasks[0].options)
        sources = cmd.tasks[0].load_sources.get(conn.info.device_id, {})
        options["load_sources"] = {s: sources.get(s, "disk") for s in cmd.stages}
        header = protocol.encode(
            protocol.RunBatch(
                batch_id=cmd.batch_id,
                model=cmd.model,
                stages=list(cmd.stages),
                devices=list(cmd.devices),
                rank=0,
                members=[
                    protocol.BatchMember(
                        task_id=t.task_id,
                        request_id=t.request_id,
                        inputs=inputs,
                        final=t.final,
                        params=dict(t.params),
                    )
                    for t, inputs in live
                ],
                options=options,
                leader_addr=conn.peer_addr,
                group=None,
            )
        )
        self.out.append((self.nodes_sock, [conn.ident, header]))
        self.log.info(
            "batch.dispatched",
            batch_id=cmd.batch_id,
            request_ids=[t.request_id for t, _ in live],
            size=len(live),
            stages=list(cmd.stages),
            devices=list(cmd.devices),
        )
        for t, inputs in live:
            self.log.info(
                "stage.dispatched",
                request_id=t.request_id,
                task_id=t.task_id,
                batch_id=cmd.batch_id,
                stages=list(t.stages),
                devices=list(t.devices),
                degree=t.degree,
                inputs=[i.device_id for i in inputs],
            )

    def _complete(self, cmd: CompleteRequest) -> None:
        pend = self.pending.pop(cmd.request_id, None)
        if self.journal is not None:
            self.journal.end(cmd.request_id, "completed")
        meta, frames, output = self.results.pop(cmd.request_id, ([], [], None))
        self.counters["finished"] += 1
        if pend is not None:
            self.metrics.request_finished(pend.model, cmd.timings, cmd.met_slo, self.now())
        self.log.info(
            "request.finished",
            request_id=cmd.request_id,
            timings=dict(cmd.timings),
            devices={k: list(v) for k, v in cmd.devices.items()},
            deadline=cmd.deadline,
            met_slo=cmd.met_slo,
        )
        if pend is None:
            return
        timings = dict(cmd.timings)
        if output is not None:
            timings["output_encode"] = output.seconds  # on the decode worker, within decode's
        header = protocol.encode(
            protocol.Result(
                id=pend.client_rid,
                timings=timings,
                devices={k: list(v) for k, v in cmd.devices.items()},
                tensors=meta,
                met_slo=cmd.met_slo,
                slo_s=None if cmd.deadline is None else cmd.deadline - pend.arrival,
                output=output,
            )
        )
        self.out.append((self.clients, [pend.client, header, *frames]))

    def _reply_error(self, request_id: str, code: str, message: str) -> None:
        pend = self.pending.pop(request_id, None)
        if self.journal is not None:
            self.journal.end(request_id, code)
        self.results.pop(request_id, None)
        self.counters["failed"] += 1
        self.log.info("request.failed", request_id=request_id, error=code, message=message)
        if pend is None:
            return
        self.metrics.request_failed(
            pend.model,
            code,
            admission=not pend.dispatched and code in ("overloaded", "unavailable"),
        )
        self.out.append(
            (self.clients, [pend.client, protocol.error_message(code, message, id=pend.client_rid)])
        )

    # ------------------------------------------------------------------ sockets

    def _drain_now(self, sock: Any, limit: int) -> list[list[Any]]:
        """Whatever is queued on ``sock`` now, up to ``limit`` messages and
        DRAIN_MAX_BYTES of headers, without waiting (a turn's memory stays bounded even
        when every message is large). Tensor frames do not count: they are results."""
        batch: list[list[Any]] = []
        nbytes = 0
        while len(batch) < limit and nbytes < DRAIN_MAX_BYTES:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False).result()
            except zmq.Again:
                break
            batch.append(frames)
            nbytes += len(frames[1]) if len(frames) > 1 else 0
        return batch

    async def _drain(self, sock: Any, limit: int) -> list[list[Any]]:
        """One awaited message plus whatever else is already queued (bounded), so a
        burst costs one pass and one flush instead of one each."""
        first = await sock.recv_multipart(copy=False)
        return [first, *self._drain_now(sock, limit - 1)]

    def _cluster_pending(self) -> bool:
        return bool(self.nodes_sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    async def _cluster_loop(self) -> None:
        while True:
            for frames in await self._drain(self.nodes_sock, CLUSTER_DRAIN_MAX):
                self._on_cluster_frames(frames)
            await self._turn()

    def _on_cluster_frames(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        try:
            msg, rest = protocol.decode(frames[1:], CLUSTER_TO_SCHEDULER)
            if isinstance(msg, NodeHello | NodeHeartbeat | WorkerExited | NodeBye):
                self._on_node(ident, msg)
            else:
                self._on_worker(ident, msg, rest)
        except ProtocolError as exc:
            self._rejected(self.nodes_sock, "cluster", ident, exc)
        except Exception as exc:  # a handler bug: loud, and only this message is lost
            self._handler_failed("cluster", ident, exc)

    async def _client_loop(self) -> None:
        while True:
            for frames in await self._drain(self.clients, CLIENT_DRAIN_MAX):
                ident = frames[0].bytes
                try:
                    msg, _ = protocol.decode(frames[1:], CLIENT_TO_SCHEDULER)
                    self._on_client(ident, msg)
                except ProtocolError as exc:
                    self._rejected(self.clients, "client", ident, exc)
                except Exception as exc:
                    self._handler_failed("client", ident, exc)
            # Durable before any of this turn's new requests reaches the core.
            self._commit_journal()
            await self._turn()
            # The cluster channel goes first: serve what it has before more client intake.
            if self._cluster_pending():
                await asyncio.sleep(0)

    def _rejected(self, sock: Any, channel: str, ident: bytes, exc: ProtocolError) -> None:
        self.counters["protocol_rejected"] += 1
        self.rejections.note(
            ident, channel=channel, error=exc.message[:500], request_id=exc.request_id
        )
        self.out.append(
            (sock, [ident, protocol.error_message("protocol", exc.message, id=exc.request_id)])
        )

    def _handler_failed(self, channel: str, ident: bytes, exc: Exception) -> None:
        self.log.error(
            "handler.failed",
            channel=channel,
            peer=ident.decode(errors="replace")[:80],
            error=repr(exc),
            traceback=traceback.format_exc(limit=12),
        )
        sock = self.clients if channel == "client" else self.nodes_sock
        self.out.append(
            (
                sock,
                [
                    ident,
                    protocol.error_message("internal", f"scheduler could not handle it: {exc!r}"),
                ],
            )
        )

    # ------------------------------------------------------------------ clients

    def _on_client(self, ident: bytes, msg: Any) -> None:
        conn = self.client_conns.get(ident)
        if conn is None:
            conn = self.client_conns[ident] = _ClientConn(last_seen=self.now())
        conn.last_seen = self.now()
        if isinstance(msg, Ping):
            if msg.nonce is not None:
                conn.heartbeats = True
            self.out.append((self.clients, [ident, protocol.encode(self._pong(msg.nonce))]))
            unknown = [r for r in msg.inflight if self._request_id(ident, r) not in self.pending]
            for client_rid in unknown[:256]:  # bounded work per ping; the rest next time
                # Replies go out in order: a result sent before this ping arrived
                # reaches the client first, so this only ends requests we lost.
                self.out.append(
                    (
                        self.clients,
                        [
                            ident,
                            protocol.error_message(
                                "unknown_request",
                                "the scheduler holds no such request (it never arrived, or the "
                                "scheduler restarted without it)",
                                id=client_rid,
                                nonce=msg.nonce,
                            ),
                        ],
                    )
                )
        elif isinstance(msg, Submit):
            self._on_submit(ident, msg)
        elif isinstance(msg, protocol.StatusQuery):
            status = msgspec.structs.replace(self._cluster_status(), nonce=msg.nonce)
            self.out.append((self.clients, [ident, protocol.encode(status)]))
        elif isinstance(msg, Cancel):
            rid = self._request_id(ident, msg.id)
            if rid in self.pending:
                self.log.info("request.cancel", request_id=rid, reason="client")
                self.feed(RequestCancelled(rid, new_stimulus_id("cancel")))

    def _pong(self, nonce: int | None) -> protocol.Pong:
        devices = sorted(d for d, w in self.workers.items() if w.up)
        # No device at all, or the models the core found no live device can hold (its
        # ``unavailable`` set; the core thread may be editing it: frozenset copies it in
        # one C call).
        held = frozenset(getattr(self.core, "unavailable", ()) or ())
        unavailable = sorted(self.served) if not devices else sorted(held & set(self.served))
        return protocol.Pong(
            models={n: m.describe() for n, m in self.served.items()},
            devices=devices,
            nodes=sorted(n for n, c in self.nodes.items() if c.up),
            nonce=nonce,
            ready=self.healthy and bool(devices),
            heartbeat_s=self.cfg.heartbeat_s,
            unavailable=unavailable,
        )

    def _mark_dispatched(self, request_id: str) -> None:
        pend = self.pending.get(request_id)
        if pend is not None:
            pend.dispatched = True

    def _cluster_status(self) -> protocol.ClusterStatus:
        """What ``trident status`` and the metric gauges show, from the daemon's own
        records (never the core's state, which the core thread may be editing). Built
        at most every STATUS_MAX_AGE_S: a flood of status queries costs one build."""
        now = self.now()
        if self._status is not None and now - self._status_at < STATUS_MAX_AGE_S:
            return self._status
        self._started_tasks &= self.task_info.keys()
        running: dict[str, list[protocol.RunningTask]] = {}
        busy_requests: dict[str, set[str]] = {}  # model -> requests with a stage out
        for task_id, cmd in self.task_info.items():
            task = protocol.RunningTask(
                task_id=task_id,
                request_id=cmd.request_id,
                model=cmd.model,
                stages=list(cmd.stages),
                started=task_id in self._started_tasks,
            )
            for dev in cmd.devices:
                running.setdefault(dev, []).append(task)
            busy_requests.setdefault(cmd.model, set()).add(cmd.request_id)
        devices = []
        for dev, conn in sorted(self.workers.items()):
            devices.append(
                protocol.DeviceStatus(
                    device_id=dev,
                    node_id=conn.info.node_id,
                    kind=conn.info.kind,
                    up=conn.up,
                    memory_bytes=conn.info.memory_bytes,
                    resident=[
                        protocol.ResidentStage(model=m, stage=st)  # type: ignore[arg-type]
                        for m, st in sorted(conn.resident)
                    ],
                    resident_bytes=sum(self._weight_bytes.get(ms, 0) for ms in conn.resident),
                    running=running.get(dev, [])[:4096] if conn.up else [],
                    busy_s=self.metrics.busy_seconds.get(dev, 0.0),
                )
            )
        pending_by_model: dict[str, int] = {}
        for pend in self.pending.values():
            pending_by_model[pend.model] = pending_by_model.get(pend.model, 0) + 1
        pong = self._pong(None)
        models = []
        for name in sorted(self.served):
            active = len(busy_requests.get(name, ()))
            finished, on_time = self.metrics.recent.counts(name, now)
            models.append(
                protocol.ModelStatus(
                    name=name,
                    queued=max(0, pending_by_model.get(name, 0) - active),
                    running=active,
                    available=name not in pong.unavailable,
                    recent_finished=finished,
                    recent_on_time=on_time,
                )
            )
        self._status = protocol.ClusterStatus(
            nodes=[
                protocol.NodeStatus(
                    node_id=node_id,
                    up=node.up,
                    devices=sorted(d for d, w in self.workers.items() if w.info.node_id == node_id),
                )
                for node_id, node in sorted(self.nodes.items())
            ],
            devices=devices,
            models=models,
            policy=str(getattr(self.core, "name", type(self.core).__name__))[:256],
            uptime_s=now,
            ready=pong.ready,
            slo_window_s=self.metrics.recent.window_s,
        )
        self._status_at = now
        return self._status

    def _request_id(self, ident: bytes, client_rid: str) -> str:
        # Scoped by client identity so two clients cannot collide or cancel each other.
        return f"{ident.hex()[:12]}-{client_rid}"

    def _on_submit(self, ident: bytes, msg: Submit) -> None:
        client_rid = msg.id
        rid = self._request_id(ident, client_rid)

        def refuse(code: str, message: str) -> None:
            self.counters["failed"] += 1
            self.metrics.request_failed(msg.model, code, admission=True)
            self.log.info(
                "request.failed", request_id=rid, error=code, message=message, admission=True
            )
            self.out.append(
                (self.clients, [ident, protocol.error_message(code, message, id=client_rid)])
            )

        if rid in self.pending:
            refuse("invalid_request", f"request id {client_rid!r} is already in flight")
            return
        if self.journal is not None and self.journal.ended_outcome(rid) is not None:
            refuse("invalid_request", f"request id {client_rid!r} has already ended")  # a duplicate
            return
        if len(self.pending) >= self.cfg.max_queue:
            # The intake bound: answered here, at once, without a core round.
            self.counters["overloaded"] += 1
            refuse(
                "overloaded", f"{len(self.pending)} requests in flight (limit {self.cfg.max_queue})"
            )
            return
        served = self.served.get(msg.model)
        if served is None:
            refuse("unknown_model", f"no model named {msg.model!r}; served: {sorted(self.served)}")
            return
        params = msg.params.to_dict()
        try:
            shape = build_request_shape(served, params)
            params.update(output_params(served, msg.output_type, msg.fps))
        except InvalidRequestError as exc:
            refuse("invalid_request", exc.message)
            return
        now = self.now()
        self.pending[rid] = _Pending(
            client=ident,
            client_rid=client_rid,
            arrival=now,
            heartbeat=self.client_conns[ident].heartbeats,
            model=msg.model,
        )
        if self.journal is not None:
            self.journal.accept(
                AcceptedRecord(
                    request_id=rid,
                    client=ident,
                    client_rid=client_rid,
                    model=msg.model,
                    params=params,
                    slo_s=msg.slo_s,
                    batchable=msg.batch,
                    arrival_wall=time.time(),
                )
            )
        self.log.info(
            "request.arrived",
            request_id=rid,
            model=msg.model,
            height=shape.height,
            width=shape.width,
            num_frames=shape.num_frames,
            steps=shape.num_inference_steps,
            batchable=msg.batch,
            output_type=msg.output_type,
        )
        spec = RequestSpec(
            request_id=rid,
            model=msg.model,
            shape=shape,
            arrival=now,
            slo_s=msg.slo_s,
            params=params,
            batchable=msg.batch,
        )
        self.feed(RequestArrived(spec, new_stimulus_id("submit")))

    # ------------------------------------------------------------------ nodes and workers

    def _models_for_workers(self) -> dict[str, ModelRef]:
        return {
            n: ModelRef(family=m.info.family, path=m.info.path, dtype=m.dtype)
            for n, m in self.served.items()
        }

    def _welcome_node(self) -> bytes:
        return protocol.encode(
            protocol.NodeWelcome(
                models=self._models_for_workers(), heartbeat_s=self.cfg.heartbeat_s
            )
        )

    def _welcome_worker(self) -> bytes:
        return protocol.encode(
            protocol.WorkerWelcome(
                models=self._models_for_workers(), heartbeat_s=self.cfg.heartbeat_s
            )
        )

    def _reject(self, ident: bytes, reason: str) -> None:
        self.out.append((self.nodes_sock, [ident, protocol.encode(protocol.Reject(reason=reason))]))

    def _on_node(
        self, ident: bytes, msg: NodeHello | NodeHeartbeat | WorkerExited | NodeBye
    ) -> None:
        now = self.now()
        if isinstance(msg, NodeHello):
            if msg.version != protocol.PROTOCOL_VERSION:
                reason = (
                    f"protocol version {msg.version} != scheduler's {protocol.PROTOCOL_VERSION}"
                )
                self.log.warning(
                    "node.rejected", node=ident.decode(errors="replace"), reason=reason
                )
                self._reject(ident, reason)
                return
            if ident != f"node:{msg.node_id}".encode():
                self._reject(ident, "node identity does not match its node id")
                return
            node_id = msg.node_id
            old = self.nodes.get(node_id)
            booting = (
                old is None
                or not old.up
                or not any(w.up for w in self.workers.values() if w.info.node_id == node_id)
            )
            self.nodes[node_id] = _NodeConn(
                ident=ident,
                node_id=node_id,
                last_seen=now,
                devices=[
                    {
                        "index": d.index,
                        "kind": d.kind,
                        "memory_bytes": d.memory_bytes,
                        "speed": d.speed,
                    }
                    for d in msg.devices
                ],
            )
            self.out.append((self.nodes_sock, [ident, self._welcome_node()]))
            self.log.info("node.joined", node_id=node_id, devices=len(msg.devices))
            if booting:  # the core takes its workers' hellos together (CoreConfig)
                self.feed(NodeBooting(node_id, len(msg.devices), new_stimulus_id("booting")))
            return
        node_id = msg.node_id
        node = self.nodes.get(node_id)
        if node is None or not node.up or node.ident != ident:
            self.out.append((self.nodes_sock, [ident, protocol.encode(protocol.Reregister())]))
            return
        node.last_seen = now
        if isinstance(msg, NodeHeartbeat):
            return
        if isinstance(msg, WorkerExited):
            dev = msg.device_id or f"{node_id}/{self._node_kind(node)}:{msg.index}"
            self.log.warning(
                "worker.died", device_id=dev, exitcode=msg.exitcode, restarts=msg.restarts
            )
            if dev in self.workers:  # a device id the cluster announced (bounded labels)
                self.metrics.worker_restarted(dev)
            conn = self.workers.get(dev)
            if conn is not None and conn.up and conn.info.node_id == node_id:
                self._worker_lost(dev, f"process exited with {msg.exitcode}")
        elif isinstance(msg, NodeBye):
            self._node_lost(node_id, "node shut down")

    @staticmethod
    def _node_kind(node: _NodeConn) -> str:
        return str(node.devices[0]["kind"]) if node.devices else "sim"

    def _on_worker(self, ident: bytes, msg: Any, frames: list[Any]) -> None:
        now = self.now()
        if isinstance(msg, WorkerHello):
            self._worker_hello(ident, msg)
            return
        dev = self.worker_by_ident.get(ident)
        conn = self.workers.get(dev) if dev else None
        if conn is None or not conn.up:
            self.out.append((self.nodes_sock, [ident, protocol.encode(protocol.Reregister())]))
            return
        conn.last_seen = now
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, protocol.TaskStarted):
            started = self.task_info.get(msg.task_id)
            if started is None or dev not in started.devices:
                return  # not a task of this worker's: ignore rather than confuse the core
            self.log.info(
                "stage.started", task_id=msg.task_id, device_id=dev, request_id=started.request_id
            )
            self._started_tasks.add(msg.task_id)
            if len(self._started_tasks) > 2 * len(self.task_info) + 1024:  # ended ones
                self._started_tasks &= self.task_info.keys()
            self.feed(TaskStarted(msg.task_id))
        elif isinstance(msg, protocol.TaskProgress):
            self._forward_progress(dev, msg)
        elif isinstance(msg, protocol.TaskFinished):
            cmd = self.task_info.get(msg.task_id)
            if cmd is None or cmd.devices[0] != dev:
                return  # a late or foreign report (the task was given up on)
            del self.task_info[msg.task_id]
            paused = msg.steps_done is not None
            if cmd.final and not paused and cmd.request_id in self.pending:
                # Held only until the core completes the request (a request already
                # failed or cancelled would never claim it: don't keep it). A paused
                # diffuse's state stays on its worker, like any kept output.
                self.results[cmd.request_id] = (list(msg.tensors or []), frames, msg.output)
            elif msg.kept_shm is not None and (paused or not cmd.final):
                self._keep_shm_ref(conn, msg.task_id, msg.kept_shm)
            self.feed(
                TaskFinished(
                    msg.task_id,
                    stage_seconds=dict(msg.stage_seconds),
                    transfer_seconds=msg.transfer_seconds,
                    load_seconds=msg.load_seconds,
                    output_bytes=msg.output_bytes,
                    steps_done=msg.steps_done,
                )
            )
            if paused:
                self.log.info(
                    "stage.yielded",
                    task_id=msg.task_id,
                    request_id=cmd.request_id,
                    device_id=dev,
                    steps_done=msg.steps_done,
                )
            self.log.info(
                "stage.finished",
                task_id=msg.task_id,
                request_id=cmd.request_id,
                device_id=dev,
                seconds=dict(msg.stage_seconds),
                transfer_s=msg.transfer_seconds,
                load_s=msg.load_seconds,
            )
            # The leader ran every stage; a degree-k group's other members the diffuse.
            work = sum(msg.stage_seconds.values())
            diffuse = msg.stage_seconds.get("diffuse", 0.0)
            self.metrics.stage_finished(
                {d: work if i == 0 else diffuse for i, d in enumerate(cmd.devices)}
            )
            batch = self._batch_size.pop(msg.task_id, 1)
            if msg.peak_bytes is not None or msg.resident_bytes is not None:
                self._log_task_memory(conn, cmd, msg, batch)
        elif isinstance(msg, protocol.TaskFailed):
            cmd = self.task_info.get(msg.task_id)
            if cmd is None or cmd.devices[0] != dev:
                return
            del self.task_info[msg.task_id]
            self._batch_size.pop(msg.task_id, None)
            self.log.warning(
                "stage.failed",
                task_id=msg.task_id,
                request_id=cmd.request_id,
                device_id=dev,
                error=msg.error,
                message=msg.message,
                stage=msg.stage,
            )
            error: Any = msg.error if msg.error in _ERROR_CODES else "stage_failed"
            self.feed(TaskFailed(msg.task_id, error, msg.message, msg.retryable, stage=msg.stage))
        elif isinstance(msg, protocol.StageLoaded):
            if msg.source != "resident":
                self.log.info(
                    "stage.loaded",
                    device_id=conn.info.device_id,
                    model=msg.model,
                    stage=msg.stage,
                    seconds=msg.seconds,
                    source=msg.source,
                )
            conn.resident.add((msg.model, msg.stage))
            self.feed(
                StageLoaded(conn.info.device_id, msg.model, msg.stage, msg.seconds, msg.source)
            )
        elif isinstance(msg, protocol.StageUnloaded):
            self.log.info(
                "stage.unloaded", device_id=conn.info.device_id, model=msg.model, stage=msg.stage
            )
            conn.resident.discard((msg.model, msg.stage))
            self.feed(StageUnloaded(conn.info.device_id, msg.model, msg.stage))
        elif isinstance(msg, protocol.StageLoadFailed):
            self.log.error(
                "stage.load_failed",
                device_id=conn.info.device_id,
                model=msg.model,
                stage=msg.stage,
                message=msg.message,
            )

    def _keep_shm_ref(self, conn: _WorkerConn, key: str, ref: protocol.ShmOutput) -> None:
        """Remember a kept output's segment for its consumers (validated at decode; here
        also that it names one of the reporting worker's own segments)."""
        if not conn.own_segment(ref.name):
            self.rejections.note(
                conn.info.device_id,
                channel="shm_ref",
                error=f"task_finished names segment {ref.name[:80]!r}, not one of its own",
            )
            return
        conn.shm_refs[key] = ref
        while len(conn.shm_refs) > MAX_SHM_REFS:
            del conn.shm_refs[next(iter(conn.shm_refs))]

    def _log_task_memory(
        self, conn: _WorkerConn, cmd: RunTask, msg: protocol.TaskFinished, batch: int
    ) -> None:
        """``task.memory``: the planner's memory figures for this task beside the ones
        its device measured (docs/runtime.md "Memory truth")."""
        served = self.served.get(cmd.model)
        self.log.info(
            "task.memory",
            task_id=msg.task_id,
            request_id=cmd.request_id,
            device_id=conn.info.device_id,
            **task_memory_fields(
                cost=getattr(self.core, "cost", None),
                family=served.info.family if served is not None else "",
                model=cmd.model,
                stages=cmd.stages,
                params=cmd.params,
                degree=cmd.degree,
                batch=batch,
                weight_bytes=self._weight_bytes,
                resident=conn.resident,
                device_kind=conn.info.kind,
                device_memory_bytes=conn.info.memory_bytes,
                peak_bytes=msg.peak_bytes,
                resident_bytes=msg.resident_bytes,
                stage_peak_bytes=msg.stage_peak_bytes,
            ),
        )

    def _forward_progress(self, dev: str | None, msg: protocol.TaskProgress) -> None:
        """A running task's denoising step, to its request's client: mechanism only
        (the core never sees it). Sent at once without waiting; a client whose queue
        is full, or that is gone, loses it (``progress_dropped``), nothing else."""
        cmd = self.task_info.get(msg.task_id)
        if cmd is None or cmd.devices[0] != dev:
            return  # rank 0 reports; a late one (the task ended) concerns nobody
        pend = self.pending.get(cmd.request_id)
        if pend is None:
            return
        header = protocol.encode(
            protocol.Progress(id=pend.client_rid, stage="diffuse", step=msg.step, total=msg.total)
        )
        try:
            self.clients.send_multipart([pend.client, header], flags=zmq.NOBLOCK).result()
        except zmq.ZMQError:
            self.counters["progress_dropped"] = self.counters.get("progress_dropped", 0) + 1

    def _worker_hello(self, ident: bytes, msg: WorkerHello) -> None:
        if msg.version != protocol.PROTOCOL_VERSION:
            reason = f"protocol version {msg.version} != scheduler's {protocol.PROTOCOL_VERSION}"
            self._reject(ident, reason)
            self.log.warning(
                "worker.rejected", worker=ident.decode(errors="replace"), reason=reason
            )
            return
        info = DeviceInfo(
            device_id=msg.device_id,
            node_id=msg.node_id,
            kind=msg.kind,
            index=msg.index,
            memory_bytes=msg.memory_bytes,
            speed=msg.speed,
        )
        if (
            ident != f"dev:{info.device_id}".encode()
            or info.device_id != f"{msg.node_id}/{msg.kind}:{msg.index}"
        ):
            self._reject(ident, "worker identity does not match its device id")
            self.log.warning(
                "worker.rejected", worker=ident.decode(errors="replace"), reason="identity mismatch"
            )
            return
        node = self.nodes.get(info.node_id)
        if node is None or not node.up:
            # Workers join through their node: an unknown node's worker waits for it.
            self.out.append((self.nodes_sock, [ident, protocol.encode(protocol.Reregister())]))
            return
        old = self.workers.get(info.device_id)
        if old is not None and old.up and old.pid == msg.pid:
            # A repeated hello (the welcome was lost): welcome again, nothing changes.
            self.out.append((self.nodes_sock, [ident, self._welcome_worker()]))
            return
        if old is not None and old.up:
            self._worker_lost(info.device_id, "replaced by a new process")
        self.workers[info.device_id] = _WorkerConn(
            ident=ident,
            info=info,
            peer_addr=msg.peer_addr,
            pid=msg.pid,
            last_seen=self.now(),
            store_addr=msg.store_addr,
        )
        self.worker_by_ident[ident] = info.device_id
        self.out.append((self.nodes_sock, [ident, self._welcome_worker()]))
        self.log.info(
            "worker.joined",
            device_id=info.device_id,
            kind=info.kind,
            pid=msg.pid,
            peer_addr=msg.peer_addr,
        )
        self.feed(DeviceUp(info, new_stimulus_id("hello")))

    def _worker_lost(self, device_id: str, reason: str, *, kill: bool = False) -> None:
        conn = self.workers.get(device_id)
        if conn is None or not conn.up:
            return
        conn.up = False
        conn.shm_refs.clear()
        node = self.nodes.get(conn.info.node_id)
        for task_id in [t for t, c in self.task_info.items() if device_id in c.devices]:
            del self.task_info[task_id]  # it will never report
        self.log.warning("worker.lost", device_id=device_id, reason=reason)
        if kill and node is not None and node.up:
            # A hung worker would otherwise live on, holding its device: its node kills
            # and restarts it.
            self.out.append(
                (
                    self.nodes_sock,
                    [
                        node.ident,
                        protocol.encode(protocol.KillWorker(index=conn.info.index, reason=reason)),
                    ],
                )
            )
        self.feed(DeviceLost(device_id, reason, new_stimulus_id("lost")))

    def _node_lost(self, node_id: str, reason: str) -> None:
        node = self.nodes.get(node_id)
        if node is None or not node.up:
            return
        node.up = False
        self.log.warning("node.lost", node_id=node_id, reason=reason)
        for conn in self.workers.values():
            if conn.info.node_id == node_id and conn.up:
                conn.up = False
                conn.shm_refs.clear()
        for task_id in [
            t
            for t, c in self.task_info.items()
            if any(d.startswith(f"{node_id}/") for d in c.devices)
        ]:
            del self.task_info[task_id]
        self.feed(NodeLost(node_id, reason, new_stimulus_id("node-lost")))

    # ------------------------------------------------------------------ ticks

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick_s)
            self._check_liveness()
            self._commit_journal()
            if not self._tick_queued:
                self._tick_queued = True
                self.feed(Tick())
            await self._turn()
            if self.metrics_server is not None:
                self.metrics.set_cluster(self._cluster_status())
            flush_logs()

    def _check_liveness(self) -> None:
        now = self.now()
        if self._cluster_pending():
            # Unread cluster messages may hold the very heartbeats we would miss: judge
            # liveness only on a socket read dry.
            return
        ttl = self.cfg.worker_ttl_s
        for dev, conn in list(self.workers.items()):
            if conn.up and now - conn.last_seen > ttl:
                self._worker_lost(dev, f"silent for {now - conn.last_seen:.1f}s", kill=True)
        for node_id, node in list(self.nodes.items()):
            if node.up and now - node.last_seen > ttl:
                self._node_lost(node_id, f"silent for {now - node.last_seen:.1f}s")
        cttl = self.cfg.client_ttl_s
        gone = {
            ident
            for ident, c in self.client_conns.items()
            if c.heartbeats and now - c.last_seen > cttl
        }
        for rid, pend in list(self.pending.items()):
            if pend.heartbeat and pend.client in gone:
                self.log.info("request.cancel", request_id=rid, reason="client gone")
                self.feed(RequestCancelled(rid, new_stimulus_id("client-gone")))
                pend.heartbeat = False  # cancel once
        for ident in gone:
            self.log.info("client.gone", client=ident.decode(errors="replace")[:80])
            del self.client_conns[ident]
        if len(self.client_conns) > 100_000:  # clients that never heartbeat: forget the oldest
            for ident in sorted(self.client_conns, key=lambda i: self.client_conns[i].last_seen)[
                :50_000
            ]:
                del self.client_conns[ident]


# The codes the core knows (a worker's other codes count as stage failures).
_ERROR_CODES = frozenset(typing.get_args(ErrorCode))


def build_parser() -> argparse.ArgumentParser:
    """The scheduler's command line (``trident scheduler --help``)."""
    d = SchedulerConfig()  # the defaults; a --config file's values replace them
    p = argparse.ArgumentParser(
        prog="trident-scheduler",
        description="Trident's central scheduler daemon. An option not given takes the "
        "--config file's value, else the default shown.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--config", help="TOML configuration file (default: none, built-in settings)")
    p.add_argument("--client-addr", help=f"address clients connect to (default: {d.client_addr})")
    p.add_argument(
        "--node-addr", help=f"address nodes and workers connect to (default: {d.node_addr})"
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the diffusers pipeline in DIR as NAME (repeatable); NAME=sim:FAMILY for a "
        "simulated model (default: the --config file's [[models]]; one is required)",
    )
    p.add_argument(
        "--dtype",
        action="append",
        default=[],
        metavar="NAME=DTYPE",
        help=f"serve model NAME in DTYPE ({', '.join(DTYPES)}; repeatable); default: "
        "bfloat16 on cuda devices, float32 on cpu devices",
    )
    p.add_argument(
        "--policy",
        help="scheduling policy: trident, trident-static, b1, b4, b6, authors, fifo "
        f"(default: {d.policy})",
    )
    p.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy setting (repeatable), e.g. max_batch=1 or dispatch.max_nodes=100 "
        "(docs/planner.md); an unknown one is an error listing the valid ones "
        "(default: none, the policy's defaults)",
    )
    p.add_argument(
        "--slo-scale",
        type=float,
        help="a request's deadline without slo_s: this times its standalone latency "
        f"(default: {d.slo_scale})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        help=f"requests in flight before new ones are refused as overloaded (default: {d.max_queue})",
    )
    p.add_argument(
        "--heartbeat-s",
        type=float,
        help="seconds between the heartbeats nodes, workers and clients are told to send "
        f"(default: {d.heartbeat_s})",
    )
    p.add_argument(
        "--worker-ttl-s",
        type=float,
        help=f"a worker silent this long is lost (default: {d.worker_ttl_s})",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        help=f"sim clusters: the nodes' --time-scale (default: {d.time_scale})",
    )
    p.add_argument(
        "--tick-s", type=float, help=f"seconds between the core's ticks (default: {d.tick_s})"
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="FILE",
        help="a `trident profile` file for the cost model (repeatable; default: none, the "
        "reference cost model)",
    )
    p.add_argument(
        "--curve-dir",
        help="CurveZMQ key directory (`trident keys DIR`): encrypt and authenticate "
        "(default: none, plain TCP)",
    )
    p.add_argument(
        "--client-ttl-s",
        type=float,
        help="cancel the requests of a heartbeating client silent this long "
        f"(default: {d.client_ttl_s})",
    )
    p.add_argument(
        "--state-dir",
        help="directory of the request journal (restart without silent loss; default: none, "
        "no journal)",
    )
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; docs/metrics.md)",
    )
    p.add_argument("--log-file", help="append the JSON-lines log to this file (default: stderr)")
    return p


def _parse(argv: list[str] | None) -> tuple[SchedulerConfig, argparse.Namespace]:
    ns = build_parser().parse_args(argv)
    cfg = load_scheduler_config(ns.config) if ns.config else SchedulerConfig()
    cfg.profiles.extend(ns.profile)
    for key in (
        "client_addr",
        "node_addr",
        "policy",
        "slo_scale",
        "max_queue",
        "heartbeat_s",
        "worker_ttl_s",
        "log_file",
        "time_scale",
        "curve_dir",
        "tick_s",
        "client_ttl_s",
        "state_dir",
    ):
        value = getattr(ns, key)
        if value is not None:
            setattr(cfg, key, value)
    cfg.models.extend(parse_model_flag(m) for m in ns.model)
    cfg.models = apply_dtype_flags(cfg.models, ns.dtype)
    for opt in ns.policy_option:
        key, sep, value = opt.partition("=")
        if not sep:
            raise ConfigError(f"--policy-option {opt!r}: expected KEY=VALUE")
        # A string: the policy's option parser converts it by the field's type.
        cfg.policy_options[key.strip()] = value.strip()
    if not cfg.models:
        raise ConfigError(
            "no model to serve: pass --model NAME=DIR or a config file with [[models]]"
        )
    if cfg.max_queue < 1:
        raise ConfigError("--max-queue must be at least 1")
    if not 0.001 <= cfg.tick_s <= 10:
        raise ConfigError("--tick-s must be in [0.001, 10]")
    return cfg, ns


def main(
    argv: list[str] | None = None,
    core_factory: Callable[[SchedulerConfig, dict[str, ServedModel]], Policy] | None = None,
) -> int:
    """Run the daemon. ``core_factory`` replaces :func:`make_core` (tests run the real
    daemon around a policy of their own this way)."""
    try:
        cfg, ns = _parse(argv)
        if ns.metrics_addr:
            parse_metrics_addr(ns.metrics_addr)  # a bad address is a usage error (exit 2)
        configure_logging(cfg.log_file, buffered=True)
        served = register_models(cfg.models)
        daemon = SchedulerDaemon(
            cfg,
            served,
            core=core_factory(cfg, served) if core_factory else None,
            metrics_addr=ns.metrics_addr,
        )
    except (ConfigError, ModelError, ValueError) as exc:
        print(f"trident-scheduler: {exc}", file=sys.stderr)
        return 2
    except TridentError as exc:  # pragma: no cover
        print(f"trident-scheduler: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def _main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stopping.set)
        return await daemon.run()

    try:
        return asyncio.run(_main())
    except (zmq.ZMQError, OSError) as exc:  # OSError: --metrics-addr could not be bound
        print(f"trident-scheduler: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
