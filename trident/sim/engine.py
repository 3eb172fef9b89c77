"""Discrete-event simulator: runs a scheduler ``Policy`` against virtual devices.

The simulator plays the runtime's part. It feeds the policy the events the real
daemons would send (nodes joining, requests arriving, tasks starting and finishing,
stage loads, device losses, periodic ticks) on a virtual clock and executes the
commands the policy returns the way the workers do:

- each device is a worker that runs the ``RunTask`` / ``RunBatch`` / ``LoadStage`` /
  ``UnloadStage`` messages it receives first-in-first-out, in the order sent; a batch
  is one job (its members' encode and decode one after another, one batched diffuse:
  ``batch_stage_seconds``) that reports per member, like the workers;
- a degree-k task starts when it is at the head of all its devices' queues (workers
  wait for each other) and its inputs have arrived;
- inputs are pushed by the producer as soon as both the output exists and the
  consumer's task was sent; they take ``CostModel.transfer_seconds(output_bytes,
  same_node)`` (zero when the input is on the leader itself) and overlap with whatever
  the consumer's devices are doing;
- a task whose stages' weights are not resident loads them first (from a peer device
  on the node when one holds them, else the node's CPU copy) and reports
  ``StageLoaded``; then ``TaskStarted``; then ``TaskFinished`` after the stages' cost
  (sum over merged stages, divided by the slowest device's speed, times seeded
  log-normal noise of mean 1);
- memory: weights of resident stages + the running task's peak activation must fit
  the device; resident stages the task does not need are evicted least-recently-used
  first (reported as ``StageUnloaded``); otherwise the task fails with
  ``TaskFailed(error="out_of_memory")``;
- ``DeviceLost`` faults drop the device's queue, running task and kept outputs; tasks
  whose input lived there fail with a retryable ``TaskFailed`` (as a leader whose
  fetch failed would report); an optional restart sends ``DeviceUp`` later.

Same inputs and seed give the same result, event for event. The engine does no O(n)
scan per event: per-device deques, a dict of kept outputs, a heap of timed events.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trident.sched.cost import (
    activation_scale,
    batch_peak_bytes,
    batch_stage_seconds,
    decode_peak_bytes,
    model_weight_bytes,
)
from trident.sched.residency import choose_load_source, victims
from trident.sched.types import (
    Command,
    CompleteRequest,
    CostModel,
    DeviceInfo,
    DeviceLost,
    DeviceUp,
    Event,
    FailRequest,
    LoadStage,
    LogEvent,
    ModelInfo,
    NodeJoined,
    NodeLost,
    Policy,
    ReleaseOutput,
    RequestArrived,
    RequestSpec,
    RunBatch,
    RunTask,
    Shape,
    Stage,
    StageLoaded,
    StageUnloaded,
    TaskFailed,
    TaskFinished,
    TaskStarted,
    Tick,
    UnloadStage,
    YieldTask,
)

__all__ = [
    "GIB",
    "ClusterSpec",
    "DeviceFault",
    "RequestRecord",
    "SimConfig",
    "SimResult",
    "Simulator",
    "simulate",
]

GIB = 1 << 30

_Key = tuple[str, Stage]  # (model, stage) resident on a device


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """A homogeneous cluster: ``nodes`` x ``gpus_per_node`` simulated devices."""

    nodes: int
    gpus_per_node: int
    memory_bytes: int = 48 * GIB  # NVIDIA L20, the paper's device
    speed: float = 1.0
    kind: str = "sim"

    def node_events(self) -> list[NodeJoined]:
        out = []
        for n in range(self.nodes):
            node_id = f"n{n}"
            devs = tuple(
                DeviceInfo(
                    device_id=f"{node_id}/sim:{i}",
                    node_id=node_id,
                    kind="sim",
                    index=i,
                    memory_bytes=self.memory_bytes,
                    speed=self.speed,
                )
                for i in range(self.gpus_per_node)
            )
            out.append(NodeJoined(node_id=node_id, devices=devs))
        return out

    @property
    def num_devices(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, slots=True)
class DeviceFault:
    """Inject a fault at virtual time ``time_s``: lose ``device_id`` (or a whole node when
    ``node_id`` is given); after ``restart_after_s`` the device(s) come back empty."""

    time_s: float
    device_id: str | None = None
    node_id: str | None = None
    restart_after_s: float | None = None
    reason: str = "injected fault"


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    tick_s: float = 0.1  # Tick period; 0 disables ticks
    noise: float = 0.0  # sigma of the log-normal multiplicative noise on stage time
    evict_lru: bool = True  # evict unneeded resident stages to make room
    emit_device_up: bool = False  # NodeJoined announces the devices; DeviceUp only on restart
    faults: tuple[DeviceFault, ...] = ()
    # Stop when virtual time passes this (None: run until every request has ended).
    max_time_s: float | None = None
    # When nothing runs, transfers or arrives any more and requests are still open,
    # keep ticking this long (virtual) for the policy to act, then stop.
    stall_s: float = 120.0
    record_events: bool = False  # keep a log of (time, event) delivered to the policy
    # Seconds a resumed diffuse chunk costs before its first step (the pipeline's setup
    # again: latents, embeddings, scheduler state); the state's transfer is separate,
    # over the links. See docs/planner.md "Preemption" for the CPU figure and the GPU
    # estimate.
    chunk_overhead_s: float = 0.05


@dataclass(slots=True)
class RequestRecord:
    """How one request ended, as the client saw it."""

    request_id: str
    model: str
    shape: Shape
    arrival: float
    deadline: float | None
    status: str = "unfinished"  # completed | failed | unfinished
    finish: float | None = None
    error: str | None = None
    policy_met_slo: bool | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> devices
    oom_tasks: int = 0

    @property
    def latency(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def met_slo(self) -> bool:
        if self.status != "completed" or self.finish is None:
            return False
        return self.deadline is None or self.finish <= self.deadline + 1e-9


@dataclass
class SimResult:
    records: list[RequestRecord]
    end_time: float
    wall_s: float
    events: int  # events delivered to the policy
    tasks: int  # RunTasks executed (started)
    oom_tasks: int
    policy_seconds: float  # wall time spent inside policy.handle
    # CPU time of this process inside policy.handle: what the policy costs, not what the
    # machine's other processes cost it (policy time shares are reported from this).
    policy_cpu_seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    log: list[tuple[float, Event]] = field(default_factory=list)
    log_events: dict[str, int] = field(default_factory=dict)  # LogEvent name -> count


# --------------------------------------------------------------------------- internals

# Timed internal event kinds (heap entries are (time, seq, kind, payload)).
_ARRIVE, _TICK, _INPUT, _LOADED, _DONE, _OPDONE, _FAULT, _RESTART, _DELIVER = range(9)


class _Dev:
    __slots__ = (
        "alive",
        "busy",
        "info",
        "last_use",
        "node",
        "queue",
        "resident",
        "seen",
        "used_weights",
    )

    def __init__(self, info: DeviceInfo) -> None:
        self.info = info
        self.node = info.node_id
        self.alive = True
        self.queue: deque[_Task | _Op] = deque()
        self.busy = False  # head item is executing (loading or computing)
        self.seen: _Task | None = None  # head task already counted in its ``heads``
        # (model, stage) -> weight bytes; insertion order + last_use drive LRU
        self.resident: dict[_Key, int] = {}
        self.last_use: dict[_Key, float] = {}
        self.used_weights = 0


class _Op:
    __slots__ = ("dev", "kind", "model", "source", "stage")

    def __init__(self, kind: str, dev: str, model: str, stage: Stage, source: str = "") -> None:
        self.kind = kind  # "load" | "unload"
        self.dev = dev
        self.model = model
        self.stage = stage
        self.source = source  # the core's choice (trident.sched.residency); "" if none


class _Task:
    __slots__ = (
        "begin",
        "chunk",
        "cmd",
        "family",
        "heads",
        "input_wait",
        "load_s",
        "members",
        "pending_inputs",
        "run_start",
        "shape",
        "stage_secs",
        "state",
        "transfer_s",
    )

    def __init__(
        self, cmd: RunTask, family: str, shape: Shape, members: tuple[RunTask, ...] = ()
    ) -> None:
        self.cmd = cmd  # the (first) member: model, stages and devices of the job
        self.members = members or (cmd,)  # a batch's member tasks, in order
        self.family = family
        self.shape = shape
        self.heads = 0
        self.pending_inputs = 0
        self.transfer_s = 0.0
        self.load_s = 0.0
        self.begin = 0.0
        self.input_wait: list[str] = []  # source device ids of pending inputs
        self.state = "queued"  # queued | loading | running | done | failed
        self.run_start = 0.0  # when computing began (after loads)
        self.stage_secs: dict[str, float] = {}
        # The diffuse steps [start, stop) this task runs (trident.pipelines.chunks).
        total = shape.num_inference_steps
        steps = cmd.options.get("diffuse_steps") if "diffuse" in cmd.stages else None
        if isinstance(steps, list | tuple) and len(steps) == 2:
            start = int(steps[0])
            stop = total if steps[1] is None else min(total, int(steps[1]))
            self.chunk = (start, stop)
        else:
            self.chunk = (0, total)


class _Output:
    __slots__ = ("consumers", "device", "nbytes", "ready")

    def __init__(self, device: str, nbytes: int, ready: bool) -> None:
        self.device = device
        self.nbytes = nbytes
        self.ready = ready
        self.consumers: list[_Task] = []  # tasks waiting for it to be produced


class Simulator:
    """One simulation run. Use :func:`simulate` unless you need the object."""

    def __init__(
        self,
        policy: Policy,
        cost: CostModel,
        models: Mapping[str, ModelInfo],
        cluster: ClusterSpec | Sequence[NodeJoined],
        requests: Sequence[RequestSpec],
        config: SimConfig | None = None,
    ) -> None:
        self.policy = policy
        self.cost = cost
        self.models = dict(models)
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.nodes = cluster.node_events() if isinstance(cluster, ClusterSpec) else list(cluster)
        self.requests = sorted(requests, key=lambda r: r.arrival)
        self.devs: dict[str, _Dev] = {}
        self.node_devs: dict[str, list[str]] = {}
        # (node, model, stage) the node's CPU copy holds (for commands without sources).
        self.node_copies: set[tuple[str, str, str]] = set()
        self.tasks: dict[str, _Task] = {}
        self.outputs: dict[str, _Output] = {}
        self.records: dict[str, RequestRecord] = {}
        self.open_requests = 0
        self.heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.now = 0.0
        self.running = 0  # tasks loading or computing + load ops + transfers in flight
        self.n_events = 0
        self.n_tasks = 0
        self.n_oom = 0
        self.policy_s = 0.0
        self.policy_cpu_s = 0.0
        self.log: list[tuple[float, Event]] = []
        self.log_events: dict[str, int] = {}
        self.stats: dict[str, Any] = {
            "loads": 0,
            "load_seconds": 0.0,
            "evictions": 0,
            "transfers": 0,
            "transfer_seconds": 0.0,
            "unknown_requests": 0,
            "load_ops_skipped_oom": 0,
            "rejected_tasks": 0,
        }
        self._pending_adv: deque[_Dev] = deque()

    # ------------------------------------------------------------------ heap

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, payload))

    def _deliver_later(self, ev: Event) -> None:
        """Deliver ``ev`` to the policy at the current time, after the current call."""
        self._push(self.now, _DELIVER, ev)

    # ------------------------------------------------------------------ policy I/O

    def _deliver(self, ev: Event) -> None:
        self.n_events += 1
        if self.config.record_events:
            self.log.append((self.now, ev))
        t0, c0 = time.perf_counter(), time.process_time()
        cmds = self.policy.handle(ev, self.now)
        self.policy_s += time.perf_counter() - t0
        self.policy_cpu_s += time.process_time() - c0
        for cmd in cmds:
            self._execute(cmd)
        self._advance_pending()

    def _execute(self, cmd: Command) -> None:
        if isinstance(cmd, RunTask):
            self._on_run((cmd,))
        elif isinstance(cmd, RunBatch):
            self._on_run(cmd.tasks)
        elif isinstance(cmd, YieldTask):
            self._on_yield(cmd)
        elif isinstance(cmd, ReleaseOutput):
            out = self.outputs.get(cmd.key)
            if out is not None and out.device == cmd.device_id and not out.consumers:
                del self.outputs[cmd.key]
        elif isinstance(cmd, LoadStage):
            self._enqueue_op(_Op("load", cmd.device_id, cmd.model, cmd.stage, cmd.source))
        elif isinstance(cmd, UnloadStage):
            self._enqueue_op(_Op("unload", cmd.device_id, cmd.model, cmd.stage))
        elif isinstance(cmd, CompleteRequest):
            rec = self.records.get(cmd.request_id)
            if rec is None or rec.status != "unfinished":
                self.stats["unknown_requests"] += 1
                return
            rec.status = "completed"
            rec.finish = self.now
            rec.policy_met_slo = cmd.met_slo
            rec.timings = dict(cmd.timings)
            rec.devices = dict(cmd.devices)
            if rec.deadline is None and cmd.deadline is not None:
                rec.deadline = cmd.deadline
            self.open_requests -= 1
        elif isinstance(cmd, FailRequest):
            rec = self.records.get(cmd.request_id)
            if rec is None or rec.status != "unfinished":
                self.stats["unknown_requests"] += 1
                return
            rec.status = "failed"
            rec.finish = self.now
            rec.error = cmd.error
            self.open_requests -= 1
        elif isinstance(cmd, LogEvent):
            self.log_events[cmd.event] = self.log_events.get(cmd.event, 0) + 1
        else:  # pragma: no cover - programming error in a policy
            raise TypeError(f"unknown command {cmd!r}")

    # ------------------------------------------------------------------ commands

    def _weight(self, model: str, stage: Stage) -> int:
        """Weights of ``model``'s ``stage`` on a device: the planner's figure
        (:func:`trident.sched.cost.model_weight_bytes`: its own, else the family's at
        its dtype)."""
        info = self.models.get(model)
        if info is None:
            return int(self.cost.weight_bytes(self._family(model), stage))
        return model_weight_bytes(self.cost, info, stage)

    def _family(self, model: str) -> str:
        info = self.models.get(model)
        return info.family if info is not None else model

    def _reject(self, task: _Task, message: str, error: str = "stage_failed") -> None:
        task.state = "failed"
        self.stats["rejected_tasks"] += 1
        for m in task.members:
            self._deliver_later(
                TaskFailed(m.task_id, error=error, message=message, retryable=True)  # type: ignore[arg-type]
            )

    def _input_ok(self, cmd: RunTask) -> str | None:
        """None when every input of ``cmd`` exists (or will: pipelined dispatch), else why."""
        for ref in cmd.inputs:
            out = self.outputs.get(ref.key)
            if out is None:
                # Pipelined dispatch: the producer may still be queued or running; its
                # output will be pushed when it finishes.
                producer = self.tasks.get(ref.key)
                if (
                    producer is not None
                    and producer.state in ("queued", "loading", "running")
                    and not producer.cmd.final
                    and producer.cmd.devices[0] == ref.device_id
                ):
                    out = self.outputs[ref.key] = _Output(ref.device_id, 0, False)
            if out is None or out.device != ref.device_id or not self._alive(ref.device_id):
                return f"input {ref.key} not found on {ref.device_id}"
        return None

    def _on_run(self, members: tuple[RunTask, ...]) -> None:
        cmd = members[0]
        rec = self.records.get(cmd.request_id)
        shape = rec.shape if rec is not None else _shape_from_params(cmd.params)
        task = _Task(cmd, self._family(cmd.model), shape, members)
        for m in members:
            self.tasks[m.task_id] = task
        devs = [self.devs.get(d) for d in cmd.devices]
        if not cmd.devices or any(d is None or not d.alive for d in devs):
            self._reject(task, f"device unavailable: {', '.join(cmd.devices)}")
            return
        if len(set(cmd.devices)) != len(cmd.devices):
            self._reject(task, "duplicate devices in one instance", "internal")
            return
        # A member whose input is gone fails alone (as a worker's failed fetch would).
        kept = []
        for m in members:
            why = self._input_ok(m)
            if why is None:
                kept.append(m)
            else:
                self.stats["rejected_tasks"] += 1
                self._deliver_later(
                    TaskFailed(m.task_id, error="stage_failed", message=why, retryable=True)
                )
        if not kept:
            task.state = "failed"
            return
        task.members = tuple(kept)
        task.cmd = kept[0]
        for m in kept:
            for ref in m.inputs:
                out = self.outputs[ref.key]
                task.pending_inputs += 1
                task.input_wait.append(out.device)
                if out.ready:
                    self._start_transfer(task, out)
                else:
                    out.consumers.append(task)
        for d in devs:
            assert d is not None
            d.queue.append(task)
            if len(d.queue) == 1:
                self._pending_adv.append(d)

    def _alive(self, device_id: str) -> bool:
        d = self.devs.get(device_id)
        return d is not None and d.alive

    def _start_transfer(self, task: _Task, out: _Output) -> None:
        leader = task.cmd.devices[0]
        if out.device == leader:
            secs = 0.0
        else:
            same = self.devs[out.device].node == self.devs[leader].node
            secs = float(self.cost.transfer_seconds(out.nbytes, same))
            self.stats["transfers"] += 1
            self.stats["transfer_seconds"] += secs
        task.transfer_s = max(task.transfer_s, secs)
        self.running += 1
        self._push(self.now + secs, _INPUT, (task, out.device))

    def _enqueue_op(self, op: _Op) -> None:
        d = self.devs.get(op.dev)
        if d is None or not d.alive:
            return
        d.queue.append(op)
        if len(d.queue) == 1:
            self._pending_adv.append(d)

    # ------------------------------------------------------------------ workers

    def _advance_pending(self) -> None:
        while self._pending_adv:
            self._advance(self._pending_adv.popleft())

    def _advance(self, d: _Dev) -> None:
        """``d``'s head item changed (or d was idle and got work): act on the new head."""
        while d.alive and d.queue and not d.busy:
            head = d.queue[0]
            if isinstance(head, _Op):
                key = (head.model, head.stage)
                if head.kind == "unload":
                    d.queue.popleft()
                    if key in d.resident:
                        self._evict(d, key)
                    continue
                if key in d.resident:
                    d.last_use[key] = self.now
                    d.queue.popleft()
                    continue
                family = self._family(head.model)
                need = self._weight(head.model, head.stage)
                if not self._make_room(d, need, set()):
                    self.stats["load_ops_skipped_oom"] += 1
                    d.queue.popleft()
                    continue
                src = head.source or self._source(d, key)
                secs = float(self.cost.load_seconds(family, head.stage, src))
                self._add_resident(d, key, need)
                d.busy = True
                self.running += 1
                self.stats["loads"] += 1
                self.stats["load_seconds"] += secs
                self._push(self.now + secs, _OPDONE, (d, head, secs))
                return
            task = head
            if task.state != "queued":  # failed/cancelled while queued: skip it
                d.queue.popleft()
                continue
            if d.seen is task:
                return
            d.seen = task
            task.heads += 1
            if task.heads == len(task.cmd.devices) and task.pending_inputs == 0:
                self._begin(task)
            return

    def _source(self, d: _Dev, key: _Key) -> str:
        src = choose_load_source(
            resident_here=key in d.resident,
            held_by_same_node_peer=any(
                od is not d and od.alive and key in od.resident
                for od in (self.devs[o] for o in self.node_devs.get(d.node, ()))
            ),
            in_node_copy=(d.node, *key) in self.node_copies,
        )
        self.node_copies.add((d.node, *key))
        return src

    def _add_resident(self, d: _Dev, key: _Key, nbytes: int) -> None:
        d.resident[key] = nbytes
        d.last_use[key] = self.now
        d.used_weights += nbytes

    def _evict(self, d: _Dev, key: _Key) -> None:
        nbytes = d.resident.pop(key)
        d.last_use.pop(key, None)
        d.used_weights -= nbytes
        self._deliver_later(StageUnloaded(d.info.device_id, key[0], key[1]))

    def _make_room(self, d: _Dev, need: int, keep: set[_Key]) -> bool:
        """Free memory so that ``need`` more bytes fit, evicting stages not in ``keep``
        in the device model's order (trident.sched.residency.eviction_order)."""
        cap = d.info.memory_bytes
        if d.used_weights + need <= cap:
            return True
        if not self.config.evict_lru:
            return False
        out = victims(d.resident, d.last_use, keep=keep, need=need, capacity=cap)
        if out is None:
            return False
        for k in out:
            self._evict(d, k)
            self.stats["evictions"] += 1
        return True

    def _begin(self, task: _Task) -> None:
        """All devices reached the task and its inputs are here: load, then compute."""
        cmd = task.cmd
        fam = task.family
        deg = len(cmd.devices)
        keys = [(cmd.model, s) for s in cmd.stages]
        b = len(task.members)
        tiled = bool(cmd.options.get("vae_tiling"))
        info = self.models.get(cmd.model)
        act = activation_scale(info) if info is not None else 1.0  # the model's dtype

        def peak_of(stages: Sequence[Stage]) -> int:
            return int(
                act
                * max(
                    # decode's peak depends on tiling (the core's choice for this task)
                    decode_peak_bytes(self.cost, fam, task.shape, tiled)
                    if s == "decode"
                    else int(batch_peak_bytes(self.cost, fam, s, task.shape, deg, b))
                    for s in stages
                )
            )

        peak = peak_of(cmd.stages)
        # Merged stages at degree k: the other ranks run diffuse only (as the workers
        # do), holding neither the other stages' weights nor their peaks.
        follower_keys = [k for k in keys if k[1] == "diffuse"] or keys
        follower_peak = peak_of([k[1] for k in follower_keys])
        load_s = 0.0
        loads: list[tuple[_Dev, _Key, float, str]] = []
        for rank, dev_id in enumerate(cmd.devices):
            d = self.devs[dev_id]
            mine = keys if rank == 0 else follower_keys
            missing = [k for k in mine if k not in d.resident]
            need = sum(self._weight(k[0], k[1]) for k in missing) + (
                peak if rank == 0 else follower_peak
            )
            if not self._make_room(d, need, set(mine)):
                self._oom(task, d, need)
                return
            dev_load = 0.0
            sources = cmd.load_sources.get(dev_id, {})
            for k in missing:
                # The core's choice, as in the daemon (a policy outside SchedulerCore
                # leaves it out: then the same rule on the simulated truth).
                src = sources.get(k[1]) or self._source(d, k)
                secs = float(self.cost.load_seconds(fam, k[1], src))
                dev_load += secs
                loads.append((d, k, secs, src))
            load_s = max(load_s, dev_load)
        for d, k, secs, _src in loads:
            self._add_resident(d, k, self._weight(k[0], k[1]))
            self.stats["loads"] += 1
            self.stats["load_seconds"] += secs
        for rank, dev_id in enumerate(cmd.devices):
            d = self.devs[dev_id]
            d.busy = True
            for k in keys if rank == 0 else follower_keys:
                d.last_use[k] = self.now
        task.state = "loading"
        task.load_s = load_s
        task.begin = self.now
        self.n_tasks += 1
        self.running += 1
        self._push(self.now + load_s, _LOADED, (task, loads))

    def _oom(self, task: _Task, d: _Dev, need: int) -> None:
        task.state = "failed"
        self.n_oom += 1
        for m in task.members:
            rec = self.records.get(m.request_id)
            if rec is not None:
                rec.oom_tasks += 1
        msg = (
            f"{'+'.join(task.cmd.stages)} of {task.cmd.model} {task.shape.height}x"
            f"{task.shape.width}x{task.shape.num_frames} at degree {len(task.cmd.devices)} "
            f"needs {need / GIB:.1f} GiB more on {d.info.device_id} "
            f"({d.used_weights / GIB:.1f} of {d.info.memory_bytes / GIB:.1f} GiB held)"
        )
        self._release_task_devices(task)
        self._producer_failed(task)
        for m in task.members:
            self._deliver_later(TaskFailed(m.task_id, error="out_of_memory", message=msg))

    def _producer_failed(self, task: _Task) -> None:
        """``task`` will not produce its outputs: tasks already waiting for them fail."""
        for m in task.members:
            out = self.outputs.get(m.task_id)
            if out is None or out.ready:
                continue
            del self.outputs[m.task_id]
            for consumer in out.consumers:
                if consumer.state == "queued":
                    self._fail_queued(consumer, f"input {m.task_id} was never produced")

    def _release_task_devices(self, task: _Task) -> None:
        """``task`` left the heads of its (alive) devices; let them move on."""
        for dev_id in task.cmd.devices:
            d = self.devs[dev_id]
            if not d.alive:
                continue
            if d.queue and d.queue[0] is task:
                d.queue.popleft()
                d.busy = False
                self._pending_adv.append(d)

    def _compute_seconds(self, task: _Task) -> dict[str, float]:
        deg = len(task.cmd.devices)
        speed = min(self.devs[d].info.speed for d in task.cmd.devices) or 1.0
        noise = 1.0
        sigma = self.config.noise
        if sigma > 0:
            noise = math.exp(self.rng.gauss(-0.5 * sigma * sigma, sigma))
        b = len(task.members)
        secs: dict[str, float] = {
            s: float(batch_stage_seconds(self.cost, task.family, s, task.shape, deg, b))
            / speed
            * noise
            for s in task.cmd.stages
        }
        start, stop = task.chunk
        total = task.shape.num_inference_steps
        if "diffuse" in secs and (start, stop) != (0, total) and total > 0:
            # A chunk: its share of the steps, plus the resume's setup.
            secs["diffuse"] *= (stop - start) / total
            if start > 0:
                secs["diffuse"] += self.config.chunk_overhead_s
        return secs

    # ------------------------------------------------------------------ timed events

    def _on_loaded(self, task: _Task, loads: list[tuple[_Dev, _Key, float, str]]) -> None:
        if task.state != "loading":
            return
        for d, k, secs, src in loads:
            if d.alive:
                self._deliver_later(
                    StageLoaded(d.info.device_id, k[0], k[1], seconds=secs, source=src)
                )
        task.state = "running"
        stage_secs = self._compute_seconds(task)
        task.run_start = self.now
        task.stage_secs = stage_secs
        for m in task.members:
            self._deliver_later(TaskStarted(m.task_id))
        self._push(self.now + sum(stage_secs.values()), _DONE, (task, stage_secs))

    def _on_yield(self, cmd: YieldTask) -> None:
        """Pause a running diffuse at its next step boundary (as a worker's flag would):
        it finishes then with its state as the output and ``steps_done``."""
        task = self.tasks.get(cmd.task_id)
        if task is None or task.state != "running" or len(task.members) > 1:
            return
        stages = task.cmd.stages
        if "diffuse" not in stages:
            return
        before = stages[: stages.index("diffuse")]
        diffuse_start = task.run_start + sum(task.stage_secs[s] for s in before)
        start, stop = task.chunk
        steps = stop - start
        overhead = self.config.chunk_overhead_s if start > 0 else 0.0
        step_s = max(0.0, task.stage_secs["diffuse"] - overhead) / max(1, steps)
        if self.now < diffuse_start + overhead or step_s <= 0:
            done = 1  # it stops after its first step
        else:
            done = int((self.now - diffuse_start - overhead) / step_s) + 1
        if done >= steps:
            return  # past its last step boundary: it finishes as usual
        secs = {s: task.stage_secs[s] for s in before}
        secs["diffuse"] = overhead + done * step_s
        self.stats["yields"] = self.stats.get("yields", 0) + 1
        # The earlier _DONE still in the heap finds the task done and is ignored.
        self._push(diffuse_start + secs["diffuse"], _DONE, (task, secs, start + done))

    def _on_done(self, task: _Task, secs: dict[str, float], steps_done: int | None = None) -> None:
        if task.state != "running":
            return
        self.running -= 1
        task.state = "done"
        cmd = task.cmd
        fam = task.family
        last = "diffuse" if steps_done is not None else cmd.stages[-1]
        nbytes = int(self.cost.output_bytes(fam, last, task.shape))
        for m in task.members:
            if m.final and steps_done is None:
                continue
            out = self.outputs.get(m.task_id)
            if out is None:
                self.outputs[m.task_id] = _Output(cmd.devices[0], nbytes, True)
            else:  # consumers sent before it finished are waiting
                out.ready = True
                out.nbytes = nbytes
                waiting, out.consumers = out.consumers, []
                for consumer in waiting:
                    if consumer.state == "queued":
                        self._start_transfer(consumer, out)
        self._release_task_devices(task)
        for m in task.members:
            self._deliver_later(
                TaskFinished(
                    m.task_id,
                    stage_seconds=secs,
                    transfer_seconds=task.transfer_s,
                    load_seconds=task.load_s,
                    output_bytes=nbytes,
                    steps_done=steps_done,
                )
            )

    def _on_input(self, task: _Task, src: str) -> None:
        self.running -= 1
        if task.state != "queued":
            return
        if not self._alive(src):
            return  # already failed by the fault handler
        task.pending_inputs -= 1
        if task.pending_inputs == 0 and task.heads == len(task.cmd.devices):
            self._begin(task)

    def _on_opdone(self, d: _Dev, op: _Op, secs: float) -> None:
        self.running -= 1
        if not d.alive or not d.queue or d.queue[0] is not op:
            return
        d.queue.popleft()
        d.busy = False
        self._deliver_later(
            StageLoaded(d.info.device_id, op.model, op.stage, seconds=secs, source="prefetch")
        )
        self._pending_adv.append(d)

    def _lose_device(self, dev_id: str, reason: str, restart_after: float | None) -> bool:
        d = self.devs.get(dev_id)
        if d is None or not d.alive:
            return False
        d.alive = False
        d.busy = False
        for item in d.queue:
            if isinstance(item, _Task) and item.state in ("queued", "loading", "running"):
                if item.state != "queued":
                    self.running -= 1
                item.state = "failed"  # gone: the policy learns it from DeviceLost
                for other in item.cmd.devices:
                    if other != dev_id:
                        od = self.devs[other]
                        if od.alive and od.queue and od.queue[0] is item:
                            od.queue.popleft()
                            od.busy = False
                            self._pending_adv.append(od)
        gone = [item for item in d.queue if isinstance(item, _Task) and item.state == "failed"]
        d.queue.clear()
        d.seen = None
        for item in gone:
            self._producer_failed(item)
        d.resident.clear()
        d.last_use.clear()
        d.used_weights = 0
        # Kept outputs on the device are gone; consumers that have not got them fail.
        lost = [k for k, o in self.outputs.items() if o.device == dev_id]
        for k in lost:
            out = self.outputs.pop(k)
            for consumer in out.consumers:
                if consumer.state == "queued":
                    self._fail_queued(consumer, f"input {k} lost with {dev_id}")
        # Transfers from the device that have not arrived yet fail too.
        for task in list(self.tasks.values()):
            if task.state == "queued" and task.pending_inputs and dev_id in task.input_wait:
                self._fail_queued(task, f"input lost with {dev_id}")
        if restart_after is not None:
            self._push(self.now + restart_after, _RESTART, dev_id)
        return True

    def _fail_queued(self, task: _Task, message: str) -> None:
        task.state = "failed"
        self._release_task_devices(task)
        self._producer_failed(task)
        for m in task.members:
            self._deliver_later(
                TaskFailed(m.task_id, error="stage_failed", message=message, retryable=True)
            )

    def _on_fault(self, fault: DeviceFault) -> None:
        if fault.node_id is not None:
            ids = list(self.node_devs.get(fault.node_id, ()))
            lost = [i for i in ids if self._lose_device(i, fault.reason, fault.restart_after_s)]
            self._advance_pending()
            if lost:
                self._deliver(NodeLost(fault.node_id, reason=fault.reason))
        elif fault.device_id is not None and self._lose_device(
            fault.device_id, fault.reason, fault.restart_after_s
        ):
            self._advance_pending()
            self._deliver(DeviceLost(fault.device_id, reason=fault.reason))

    def _on_restart(self, dev_id: str) -> None:
        d = self.devs[dev_id]
        d.alive = True
        d.busy = False
        d.queue.clear()
        self._deliver(DeviceUp(d.info))

    # ------------------------------------------------------------------ main loop

    def _setup(self) -> None:
        for node in self.nodes:
            ids = []
            for info in node.devices:
                self.devs[info.device_id] = _Dev(info)
                ids.append(info.device_id)
            self.node_devs[node.node_id] = ids
        for req in self.requests:
            if req.request_id in self.records:
                raise ValueError(f"duplicate request id {req.request_id!r} in the trace")
            deadline = None if req.slo_s is None else req.arrival + req.slo_s
            self.records[req.request_id] = RequestRecord(
                req.request_id, req.model, req.shape, req.arrival, deadline
            )
            self._push(req.arrival, _ARRIVE, req)
        self.open_requests = len(self.records)
        for fault in self.config.faults:
            self._push(fault.time_s, _FAULT, fault)
        if self.config.tick_s > 0:
            self._push(self.config.tick_s, _TICK, None)

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        self._setup()
        for node in self.nodes:
            self._deliver(node)
            if self.config.emit_device_up:
                for info in node.devices:
                    self._deliver(DeviceUp(info))
        max_t = self.config.max_time_s
        tick_s = self.config.tick_s
        pending_arrivals = len(self.requests)
        idle_since: float | None = None
        heap = self.heap
        while heap:
            t, _seq, kind, payload = heapq.heappop(heap)
            if max_t is not None and t > max_t:
                self.now = max_t
                break
            self.now = t
            if kind == _DELIVER:
                self._deliver(payload)
            elif kind == _DONE:
                self._on_done(*payload)
                self._advance_pending()
            elif kind == _INPUT:
                self._on_input(*payload)
                self._advance_pending()
            elif kind == _LOADED:
                self._on_loaded(*payload)
                self._advance_pending()
            elif kind == _ARRIVE:
                pending_arrivals -= 1
                self._deliver(RequestArrived(payload))
            elif kind == _TICK:
                if self.open_requests == 0 and pending_arrivals == 0:
                    continue  # everything ended: stop ticking
                busy = self.running > 0 or pending_arrivals > 0 or _has_work(heap)
                if not busy:
                    if idle_since is None:
                        idle_since = t
                    elif t - idle_since > self.config.stall_s:
                        self.stats["stalled"] = True
                        break
                else:
                    idle_since = None
                self._deliver(Tick())
                self._push(t + tick_s, _TICK, None)
            elif kind == _OPDONE:
                self._on_opdone(*payload)
                self._advance_pending()
            elif kind == _FAULT:
                self._on_fault(payload)
            elif kind == _RESTART:
                self._on_restart(payload)
            # Everything ended: drain policy deliveries due at this instant, then stop.
            if (
                self.open_requests == 0
                and pending_arrivals == 0
                and not self.config.faults
                and (not heap or heap[0][0] > self.now)
            ):
                break
        self.stats["stuck_tasks"] = len(
            {id(tk) for tk in self.tasks.values() if tk.state in ("queued", "loading", "running")}
        )
        return SimResult(
            records=list(self.records.values()),
            end_time=self.now,
            wall_s=time.perf_counter() - wall0,
            events=self.n_events,
            tasks=self.n_tasks,
            oom_tasks=self.n_oom,
            policy_seconds=self.policy_s,
            policy_cpu_seconds=self.policy_cpu_s,
            stats=self.stats,
            log=self.log,
            log_events=self.log_events,
        )


def _has_work(heap: list[tuple[float, int, int, Any]]) -> bool:
    """Anything but ticks scheduled? (The heap is small when this is asked: idle.)"""
    return any(kind != _TICK for _t, _s, kind, _p in heap)


def _shape_from_params(params: Mapping[str, object]) -> Shape:
    def _int(key: str, default: int) -> int:
        v = params.get(key, default)
        return int(v) if isinstance(v, int | float | str) else default

    return Shape(
        height=_int("height", 512),
        width=_int("width", 512),
        num_frames=_int("num_frames", 1),
        num_inference_steps=_int("num_inference_steps", 28),
    )


def simulate(
    policy: Policy,
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    cluster: ClusterSpec | Sequence[NodeJoined],
    requests: Sequence[RequestSpec],
    config: SimConfig | None = None,
    *,
    on_progress: Callable[[float], None] | None = None,
) -> SimResult:
    """Run ``policy`` on ``cluster`` against ``requests`` (their ``slo_s`` sets deadlines).

    ``cost`` is the ground truth for stage time, memory, transfers and loads;
    ``models`` maps served model names to their family. Deterministic for a seed.
    """
    del on_progress
    return Simulator(policy, cost, models, cluster, requests, config).run()
