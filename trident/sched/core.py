# CORE-READY
"""The request lifecycle of the scheduler core, and the simple stage-level FIFO policy.

``SchedulerCore`` owns the bookkeeping every policy needs and no policy should redo:
admission control, the request -> task state machine, kept stage outputs and when to
release them, re-runs after a device is lost, completion and failure replies, timings.
Subclasses decide only *where and when* stages run by overriding :meth:`plan`, using
:meth:`start_task` to issue a task.

Output keeping: a stage's output stays on its leader device until the stage after it
has *finished* (not merely fetched it), so a worker that dies mid-stage costs one re-run
of that stage. If the device holding a request's latest output is lost, the request
restarts from the first stage whose input still exists (encode needs none).

Pure: no sockets, no asyncio, no wall clock — ``now`` comes with each event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from trident.sched.cost import (
    activation_scale,
    best_degree,
    decode_peak_bytes,
    model_weight_bytes,
)
from trident.sched.residency import LoadSource, choose_load_source
from trident.sched.solver import Clock, no_clock
from trident.sched.types import (
    STAGES,
    CancelTask,
    Command,
    CompleteRequest,
    CostModel,
    DeviceInfo,
    DeviceLost,
    DeviceUp,
    ErrorCode,
    Event,
    FailRequest,
    InputRef,
    LoadStage,
    LogEvent,
    ModelInfo,
    NodeBooting,
    NodeJoined,
    NodeLost,
    Policy,
    ReleaseOutput,
    RequestArrived,
    RequestCancelled,
    RequestSpec,
    RunBatch,
    RunTask,
    Stage,
    StageLoaded,
    StageUnloaded,
    TaskFailed,
    TaskFinished,
    TaskStarted,
    Tick,
    YieldTask,
)

__all__ = [
    "CoreConfig",
    "DeviceState",
    "FifoPolicy",
    "RequestState",
    "SchedulerCore",
    "TaskState",
    "handle_events",
    "standalone_latency",
]


@dataclass
class CoreConfig:
    max_queue: int = 1024  # admitted-but-unfinished requests; past it: "overloaded"
    max_attempts: int = 3  # per request, re-runs after device loss / retryable failures
    max_inflight_per_device: int = 2  # tasks sent to one worker and not finished
    slo_scale: float = 2.5
    efficiency: float = 0.8  # (t1/tk)/k threshold for an "efficient" degree
    preload: bool = True  # FIFO: load every served stage on a device as soon as it joins
    diffuse_degree: int = 1  # FIFO: fixed degree of every diffuse stage (aligned groups)
    # Decode with VAE tiling when its untiled activation peak would take more than this
    # share of the decoding device's memory (big images, long videos).
    vae_tiling_fraction: float = 0.5
    # A model that no live device can hold (none up, or none with the memory for its
    # largest stage) fails its requests "unavailable" (queued, in flight and new) once
    # it has been so for this long; before any device that could hold it ever joined,
    # the longer boot grace applies (workers import torch and load weights first).
    unavailable_after_s: float = 10.0
    # A booting node's devices are taken together (one NodeJoined) once all it
    # announced are up, or this long after its hello; later ones join alone.
    join_grace_s: float = 10.0
    boot_grace_s: float = 60.0
    # Shedding (off by default): refuse at arrival, as "overloaded", a request whose
    # predicted completion (the earliest a device frees up, plus its standalone latency)
    # misses its deadline by more than this many seconds. It would fail its SLO anyway,
    # and would only delay the requests that can still make theirs.
    shed_late_margin_s: float | None = None


@dataclass
class DeviceState:
    info: DeviceInfo
    up: bool = True
    holds: set[tuple[str, Stage]] = field(default_factory=set)  # (model, stage) resident
    # Units sent and not finished, in send order: a task id, or a batch id for a batch
    # (one call on the device however many requests ride in it).
    inflight: list[str] = field(default_factory=list)
    busy_until: float = 0.0  # policy's estimate of when the queue drains

    @property
    def device_id(self) -> str:
        return self.info.device_id


@dataclass
class RequestState:
    spec: RequestSpec
    family: str
    deadline: float | None
    next_stage: int = 0  # index into STAGES of the first stage not yet finished
    output: InputRef | None = None  # latest kept stage output
    older_output: InputRef | None = None  # kept until the stage consuming `output` ends
    task_id: str | None = None  # in-flight task
    attempts: int = 1
    cancelled: bool = False
    first_start: float | None = None
    timings: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("encode", "diffuse", "decode", "transfer", "load"), 0.0
        )
    )
    stage_devices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    est_s: float = 0.0  # standalone seconds, counted in the backlog while admitted
    # A paused diffuse (docs/planner.md "Preemption"): denoising steps done so far
    # (the kept ``output`` is then the chunk state), and how often it was paused.
    steps_done: int = 0
    preemptions: int = 0
    # (next_stage, steps_done) the ``older_output`` stands for: what a lost ``output``
    # rolls back to.
    older_progress: tuple[int, int] = (0, 0)

    @property
    def total_steps(self) -> int:
        return self.spec.shape.num_inference_steps

    @property
    def remaining_diffuse_fraction(self) -> float:
        """Share of the diffuse still to run (1.0 unless a paused diffuse resumes)."""
        n = self.total_steps
        return 1.0 if n <= 0 else max(0.0, (n - self.steps_done) / n)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def pending_stages(self) -> tuple[Stage, ...]:
        return STAGES[self.next_stage :]


@dataclass
class TaskState:
    cmd: RunTask
    sent_at: float
    started_at: float | None = None
    unit: str = ""  # the batch id when the task rides in a batch, else its own id
    yielding: bool = False  # a YieldTask was sent: it ends at its next step boundary


def standalone_latency(
    cost: CostModel, family: str, spec: RequestSpec, max_degree: int = 8, efficiency: float = 0.8
) -> tuple[float, int]:
    """(seconds, degree): all three stages alone on an idle cluster at the best efficient
    diffuse degree — the base of the request's deadline."""
    shape = spec.shape
    # One definition of "efficient degree" for deadlines and for the dispatcher.
    k = best_degree(cost, family, shape, max_degree, efficiency)
    total = (
        cost.stage_seconds(family, "encode", shape, 1)
        + cost.stage_seconds(family, "diffuse", shape, k)
        + cost.stage_seconds(family, "decode", shape, 1)
    )
    return total, k


def handle_events(policy: Policy, events: Sequence[Event], now: float) -> list[Command]:
    """Feed ``events`` to any policy: as one round (``handle_many``) where the policy
    is a :class:`SchedulerCore` that keeps its ``handle``, else one event at a time
    (a policy, or a wrapper, that overrides ``handle`` sees every event there)."""
    if isinstance(policy, SchedulerCore) and type(policy).handle is SchedulerCore.handle:
        return policy.handle_many(events, now)
    out: list[Command] = []
    for ev in events:
        out.extend(policy.handle(ev, now))
    return out


class SchedulerCore:
    """Request lifecycle; subclasses override :meth:`plan` to dispatch."""

    name = "core"

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        cost: CostModel | None = None,
        config: CoreConfig | None = None,
    ) -> None:
        self.models = dict(models)
        self.cost = cost
        self.config = config or CoreConfig()
        self.devices: dict[str, DeviceState] = {}
        self.requests: dict[str, RequestState] = {}  # admitted, not yet ended
        self.tasks: dict[str, TaskState] = {}
        # Requests whose next stage waits for dispatch, in arrival order.
        self.waiting: dict[str, RequestState] = {}
        # Batch id -> its members' task ids that have not ended yet.
        self.batches: dict[str, list[str]] = {}
        self._task_seq = 0
        # Per model: since when no live device can hold it (absent: some can), whether
        # one ever could, and the models whose requests are refused for it now.
        self._unservable_since: dict[str, float] = {}
        self._ever_servable: set[str] = set()
        self.unavailable: set[str] = set()
        self._backlog_s = 0.0  # sum of admitted requests' est_s (shedding)
        # Times solves for the logs only, never for a decision (trident.sched.solver);
        # the daemon and the benchmarks set ``time.perf_counter``.
        self.clock: Clock = no_clock
        # (node, model, stage) whose weights the node's CPU copy holds (a load there
        # read them once): the device model's memory of each node (load_source).
        self.node_copies: set[tuple[str, str, Stage]] = set()
        # Booting nodes: node id -> (hello time, devices announced, devices up so far).
        self._joining: dict[str, tuple[float, int, dict[str, DeviceInfo]]] = {}

    # ------------------------------------------------------------------ entry point

    def handle(self, event: Event, now: float) -> list[Command]:
        return self.handle_many((event,), now)

    def handle_many(self, events: Iterable[Event], now: float) -> list[Command]:
        """Apply ``events`` in order, then plan once. The daemon hands over everything
        that arrived during one loop turn this way, so a burst of arrivals costs one
        dispatch round, not one per arrival; the simulator feeds events one by one."""
        out: list[Command] = []
        for event in events:
            if not self._held_back(event, now):
                self.apply(event, now, out)
        self._join_booted(now, out)
        self._check_available(now, out)
        out.extend(self.plan(now))
        return self._with_load_sources(out)

    # ------------------------------------------------------------------ booting nodes

    def _held_back(self, event: Event, now: float) -> bool:
        """Booting nodes' bookkeeping; True when ``event`` waits for its node."""
        if isinstance(event, NodeBooting):
            if event.expected > 0:
                self._joining[event.node_id] = (now, event.expected, {})
            return True
        if isinstance(event, DeviceUp) and event.device.node_id in self._joining:
            self._joining[event.device.node_id][2][event.device.device_id] = event.device
            return True
        if isinstance(event, DeviceLost):
            for _, _, infos in self._joining.values():
                if infos.pop(event.device_id, None) is not None:
                    return True  # it never joined
        if isinstance(event, NodeLost | NodeJoined):
            self._joining.pop(event.node_id, None)
        return False

    def _join_booted(self, now: float, out: list[Command]) -> None:
        for node_id, (since, expected, infos) in list(self._joining.items()):
            if len(infos) >= expected or (infos and now - since >= self.config.join_grace_s):
                del self._joining[node_id]
                devices = tuple(sorted(infos.values(), key=lambda d: d.index))
                self.apply(NodeJoined(node_id, devices), now, out)
            elif now - since >= self.config.join_grace_s:
                del self._joining[node_id]  # none came up in the grace: each joins alone

    # ------------------------------------------------------------------ device model

    def load_source(self, device_id: str, model: str, stage: Stage) -> LoadSource:
        """Where ``device_id`` gets ``stage``'s weights (trident.sched.residency)."""
        return self.load_sources()(device_id, model, stage)

    def load_sources(self) -> Callable[[str, str, Stage], LoadSource]:
        """Where a device gets a stage's weights (trident.sched.residency), for many
        lookups against one snapshot of the devices (a dispatch round): each node's
        resident stages are indexed once instead of scanned per lookup."""
        on_node: dict[tuple[str, str, Stage], int] = {}
        for o in self.devices.values():
            if o.up:
                for m, s in o.holds:
                    key = (o.info.node_id, m, s)
                    on_node[key] = on_node.get(key, 0) + 1

        def source(device_id: str, model: str, stage: Stage) -> LoadSource:
            st = self.devices.get(device_id)
            if st is None:
                return "disk"
            node = st.info.node_id
            here = (model, stage) in st.holds
            peers = on_node.get((node, model, stage), 0) - (1 if here and st.up else 0)
            return choose_load_source(
                resident_here=here,
                held_by_same_node_peer=peers > 0,
                in_node_copy=(node, model, stage) in self.node_copies,
            )

        return source

    def _take_source(self, device_id: str, model: str, stage: Stage) -> str:
        source = self.load_source(device_id, model, stage)
        st = self.devices.get(device_id)
        if source == "disk" and st is not None:
            # The first load on a node reads disk and fills the node's copy; loads
            # commanded after it share that copy.
            self.node_copies.add((st.info.node_id, model, stage))
        return source

    def _run_sources(self, cmd: RunTask) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for rank, dev in enumerate(cmd.devices):
            # The leader runs every stage of the task; the others join for diffuse only.
            stages = cmd.stages if rank == 0 else tuple(s for s in cmd.stages if s == "diffuse")
            out[dev] = {s: self._take_source(dev, cmd.model, s) for s in stages}
        return out

    def _with_load_sources(self, cmds: list[Command]) -> list[Command]:
        """Commands as they leave the core: every load says where it loads from."""
        if not any(isinstance(c, RunTask | RunBatch | LoadStage) for c in cmds):
            return cmds
        out: list[Command] = []
        for c in cmds:
            if isinstance(c, RunTask) and not c.load_sources:
                c = replace(c, load_sources=self._run_sources(c))
            elif isinstance(c, RunBatch) and not c.tasks[0].load_sources:
                sources = self._run_sources(c.tasks[0])
                c = replace(c, tasks=tuple(replace(t, load_sources=sources) for t in c.tasks))
            elif isinstance(c, LoadStage) and not c.source:
                c = replace(c, source=self._take_source(c.device_id, c.model, c.stage))
            out.append(c)
        return out

    def servable(self, model: ModelInfo) -> bool:
        """Whether some live device has the memory for ``model``'s largest stage."""
        need = max(model.stage_weight_bytes.values(), default=0)
        return any(d.up and d.info.memory_bytes >= need for d in self.devices.values())

    def _check_available(self, now: float, out: list[Command]) -> None:
        """Fail a model's requests at once when no live device can hold it (after a
        grace), rather than letting them wait for devices that are gone."""
        for name, model in self.models.items():
            if self.servable(model):
                self._ever_servable.add(name)
                self._unservable_since.pop(name, None)
                if name in self.unavailable:
                    self.unavailable.discard(name)
                    out.append(LogEvent("model.available", {"model": name}))
                continue
            since = self._unservable_since.setdefault(name, now)
            grace = (
                self.config.unavailable_after_s
                if name in self._ever_servable
                else self.config.boot_grace_s
            )
            if now - since < grace:
                continue
            if name not in self.unavailable:
                self.unavailable.add(name)
                out.append(LogEvent("model.unavailable", {"model": name, "since": since}))
            for req in [r for r in self.requests.values() if r.spec.model == name]:
                task = self.tasks.get(req.task_id) if req.task_id is not None else None
                if task is not None:  # on a live device too small for the rest: free it
                    out.append(CancelTask(task.cmd.task_id, task.cmd.devices))
                self._fail(req, "unavailable", f"no live device can serve model {name!r}", out)

    def apply(self, event: Event, now: float, out: list[Command]) -> None:
        """Update the state for one event (no dispatch: that is :meth:`plan`'s)."""
        if isinstance(event, RequestArrived):
            self._on_arrived(event.request, now, out)
        elif isinstance(event, TaskStarted):
            self._on_started(event, now)
        elif isinstance(event, TaskFinished):
            self._on_finished(event, now, out)
        elif isinstance(event, TaskFailed):
            self._on_failed(event, now, out)
        elif isinstance(event, NodeJoined):
            for dev in event.devices:
                self._on_device_up(dev, now, out)
        elif isinstance(event, DeviceUp):
            self._on_device_up(event.device, now, out)
        elif isinstance(event, DeviceLost):
            self._on_device_lost(event.device_id, event.reason, now, out)
        elif isinstance(event, NodeLost):
            for dev_id in [d for d, s in self.devices.items() if s.info.node_id == event.node_id]:
                self._on_device_lost(dev_id, event.reason or "node lost", now, out)
        elif isinstance(event, RequestCancelled):
            self._on_cancelled(event.request_id, now, out)
        elif isinstance(event, StageLoaded):
            loaded = self.devices.get(event.device_id)
            if loaded is not None:
                loaded.holds.add((event.model, event.stage))
                self.node_copies.add((loaded.info.node_id, event.model, event.stage))
        elif isinstance(event, StageUnloaded):
            unloaded = self.devices.get(event.device_id)
            if unloaded is not None:
                unloaded.holds.discard((event.model, event.stage))
        elif isinstance(event, Tick):
            pass
        else:  # pragma: no cover - a programming error, not input
            raise TypeError(f"unknown event {event!r}")

    # ------------------------------------------------------------------ policy hook

    def plan(self, now: float) -> list[Command]:
        """Dispatch waiting stages. Override in policies."""
        return []

    # ------------------------------------------------------------------ helpers for policies

    def up_devices(self) -> list[DeviceState]:
        return [d for d in self.devices.values() if d.up]

    def start_task(
        self,
        req: RequestState,
        stages: tuple[Stage, ...],
        devices: tuple[str, ...],
        now: float,
        options: Mapping[str, object] | None = None,
        est_seconds: float = 0.0,
    ) -> RunTask:
        """Issue ``stages`` (the request's next ones, consecutive) on ``devices``."""
        cmd = self._make_task(req, stages, devices, options)
        self._register(cmd, cmd.task_id, now)
        self._occupy(devices, cmd.task_id, now, est_seconds)
        return cmd

    def start_batch(
        self,
        reqs: list[RequestState],
        stages: tuple[Stage, ...],
        devices: tuple[str, ...],
        now: float,
        options: Mapping[str, object] | None = None,
        est_seconds: float = 0.0,
    ) -> RunBatch | RunTask:
        """Issue the same ``stages`` of several same-shape requests as one batched call
        on ``devices`` (degree 1). A single request gives a plain task."""
        if len(reqs) == 1:
            return self.start_task(reqs[0], stages, devices, now, options, est_seconds)
        if len(devices) != 1:
            raise ValueError(f"batches run at degree 1, not {len(devices)}")
        if len({(r.spec.model, r.spec.shape, r.next_stage) for r in reqs}) != 1:
            raise ValueError("batch members must share model, shape and next stage")
        if any(r.steps_done > 0 for r in reqs):
            raise ValueError("a paused diffuse resumes alone, never in a batch")
        # Same shape and device: _make_task gives every member the same options.
        tasks = tuple(self._make_task(r, stages, devices, options) for r in reqs)
        self._task_seq += 1
        batch_id = f"batch-{self._task_seq}"
        for t in tasks:
            self._register(t, batch_id, now)
        self.batches[batch_id] = [t.task_id for t in tasks]
        self._occupy(devices, batch_id, now, est_seconds)
        return RunBatch(batch_id, tasks)

    def yield_task(self, task_id: str) -> YieldTask | None:
        """Ask a running diffuse to pause at its next step boundary (None when the task
        is not a single running diffuse task, or already pausing)."""
        task = self.tasks.get(task_id)
        if (
            task is None
            or task.yielding
            or task.started_at is None
            or "diffuse" not in task.cmd.stages
            or task.unit != task_id  # a batch member: batches never pause
        ):
            return None
        task.yielding = True
        req = self.requests.get(task.cmd.request_id)
        if req is not None:
            req.preemptions += 1
        return YieldTask(task_id, task.cmd.devices)

    def _make_task(
        self,
        req: RequestState,
        stages: tuple[Stage, ...],
        devices: tuple[str, ...],
        options: Mapping[str, object] | None,
    ) -> RunTask:
        expected = req.pending_stages[: len(stages)]
        if tuple(stages) != expected or not stages:
            raise ValueError(f"{req.request_id}: stages {stages} are not the next ones {expected}")
        if req.task_id is not None:
            raise ValueError(f"{req.request_id} already has task {req.task_id} in flight")
        self._task_seq += 1
        task_id = f"{req.request_id}.{'+'.join(s[:3] for s in stages)}.{self._task_seq}"
        final = req.next_stage + len(stages) == len(STAGES)
        spec = req.spec
        options = dict(options or {})
        if (
            "decode" in stages
            and "vae_tiling" not in options
            and self._decode_needs_tiling(req, devices[0], stages)
        ):
            options["vae_tiling"] = True
        if req.steps_done > 0:
            if stages[0] != "diffuse":  # pragma: no cover - next_stage says diffuse
                raise ValueError(f"{req.request_id}: a paused diffuse resumes with diffuse")
            options["diffuse_steps"] = [req.steps_done, None]
        params = dict(spec.params)
        params.update(
            height=spec.shape.height,
            width=spec.shape.width,
            num_frames=spec.shape.num_frames,
            num_inference_steps=spec.shape.num_inference_steps,
        )
        return RunTask(
            task_id=task_id,
            request_id=req.request_id,
            model=spec.model,
            stages=tuple(stages),
            devices=tuple(devices),
            inputs=(req.output,) if req.output is not None else (),
            final=final,
            params=params,
            options=options,
        )

    def _register(self, cmd: RunTask, unit: str, now: float) -> None:
        self.tasks[cmd.task_id] = TaskState(cmd=cmd, sent_at=now, unit=unit)
        req = self.requests[cmd.request_id]
        req.task_id = cmd.task_id
        self.waiting.pop(req.request_id, None)

    def _occupy(self, devices: tuple[str, ...], unit: str, now: float, est_seconds: float) -> None:
        for d in devices:
            st = self.devices[d]
            st.inflight.append(unit)
            st.busy_until = max(st.busy_until, now) + est_seconds

    def _decode_needs_tiling(
        self, req: RequestState, device_id: str, stages: Sequence[Stage] = ()
    ) -> bool:
        """Tile the VAE when the *untiled* decode (a video family's reference decode
        figures are tiled ones: :func:`trident.sched.cost.decode_peak_bytes`) would take
        more than ``vae_tiling_fraction`` of what the weights leave: those the device
        holds and those the task's ``stages`` load there."""
        dev = self.devices.get(device_id)
        if self.cost is None or dev is None:
            return False
        peak = decode_peak_bytes(self.cost, req.family, req.spec.shape, tiled=False)
        model_info = self.models.get(req.spec.model)
        if model_info is not None:
            peak = int(activation_scale(model_info) * peak)
        weights = 0
        for model, stage in dev.holds | {(req.spec.model, s) for s in stages}:
            info = self.models.get(model)
            if info is not None:
                weights += model_weight_bytes(self.cost, info, stage)
        free = max(0, dev.info.memory_bytes - weights)
        return peak > self.config.vae_tiling_fraction * free

    # ------------------------------------------------------------------ event handlers

    def _on_arrived(self, spec: RequestSpec, now: float, out: list[Command]) -> None:
        model = self.models.get(spec.model)
        if model is None:
            out.append(
                FailRequest(
                    spec.request_id, "unknown_model", f"no model named {spec.model!r} is served"
                )
            )
            return
        if spec.request_id in self.requests:
            out.append(FailRequest(spec.request_id, "invalid_request", "duplicate request id"))
            return
        if spec.model in self.unavailable:
            out.append(
                FailRequest(
                    spec.request_id, "unavailable", f"no live device can serve model {spec.model!r}"
                )
            )
            return
        if len(self.requests) >= self.config.max_queue:
            out.append(
                FailRequest(
                    spec.request_id,
                    "overloaded",
                    f"{len(self.requests)} requests in flight (limit {self.config.max_queue})",
                )
            )
            return
        deadline = self.deadline_for(spec, model)
        late = self._predicted_lateness(spec, model, deadline, now)
        if late is not None:
            out.append(
                FailRequest(
                    spec.request_id,
                    "overloaded",
                    f"predicted to miss its deadline by {late:.1f}s (shedding margin "
                    f"{self.config.shed_late_margin_s}s): retry later",
                )
            )
            return
        req = RequestState(spec=spec, family=model.family, deadline=deadline)
        if self.config.shed_late_margin_s is not None and self.cost is not None:
            req.est_s = standalone_latency(
                self.cost, model.family, spec, model.max_degree, self.config.efficiency
            )[0]
            self._backlog_s += req.est_s
        self.requests[spec.request_id] = req
        self.waiting[spec.request_id] = req

    def _predicted_lateness(
        self, spec: RequestSpec, model: ModelInfo, deadline: float | None, now: float
    ) -> float | None:
        """Seconds past its deadline the request is predicted to finish, when that is
        more than the shedding margin (else None)."""
        margin = self.config.shed_late_margin_s
        if margin is None or deadline is None or self.cost is None:
            return None
        up = self.up_devices()
        if not up:
            return None  # availability is _check_available's business
        base, _ = standalone_latency(
            self.cost, model.family, spec, model.max_degree, self.config.efficiency
        )
        # A fluid estimate: the admitted work (each request's standalone seconds, kept
        # until it ends) spread over the live devices, then this request alone.
        start = now + self._backlog_s / len(up)
        late = start + base - deadline
        return late if late > margin else None

    def deadline_for(self, spec: RequestSpec, model: ModelInfo) -> float | None:
        if spec.slo_s is not None:
            return spec.arrival + spec.slo_s
        if self.cost is None:
            return None
        base, _ = standalone_latency(
            self.cost, model.family, spec, model.max_degree, self.config.efficiency
        )
        return spec.arrival + self.config.slo_scale * base

    def _on_started(self, ev: TaskStarted, now: float) -> None:
        task = self.tasks.get(ev.task_id)
        if task is None or task.started_at is not None:
            return
        task.started_at = now
        req = self.requests.get(task.cmd.request_id)
        if req is not None and req.first_start is None:
            req.first_start = now

    def _finish_task_bookkeeping(self, task_id: str) -> TaskState | None:
        task = self.tasks.pop(task_id, None)
        if task is None:
            return None
        unit = task.unit or task_id
        members = self.batches.get(unit)
        if members is not None:
            if task_id in members:
                members.remove(task_id)
            if members:
                return task  # the batch's call still occupies its devices
            del self.batches[unit]
        for d in task.cmd.devices:
            st = self.devices.get(d)
            if st is not None and unit in st.inflight:
                st.inflight.remove(unit)
        return task

    def _on_finished(self, ev: TaskFinished, now: float, out: list[Command]) -> None:
        task = self._finish_task_bookkeeping(ev.task_id)
        if task is None:
            return  # a late report for a task we already gave up on
        cmd = task.cmd
        req = self.requests.get(cmd.request_id)
        if req is None or req.task_id != cmd.task_id:
            if not cmd.final:
                out.append(ReleaseOutput(cmd.devices[0], cmd.task_id))
            return
        req.task_id = None
        for stage, secs in ev.stage_seconds.items():
            if stage in req.timings:
                req.timings[stage] += float(secs)
        req.timings["transfer"] += ev.transfer_seconds
        req.timings["load"] += ev.load_seconds
        paused = (
            ev.steps_done is not None
            and "diffuse" in cmd.stages
            and 0 < ev.steps_done < req.total_steps
        )
        ran = cmd.stages[: cmd.stages.index("diffuse") + 1] if paused else cmd.stages
        for s in ran:
            req.stage_devices[s] = cmd.devices
            leader = self.devices.get(cmd.devices[0])
            if leader is not None:
                leader.holds.add((cmd.model, s))
        # The output that fed this task can go once this task is done; the one before
        # it certainly can.
        if req.older_output is not None:
            out.append(ReleaseOutput(req.older_output.device_id, req.older_output.key))
        req.older_output = req.output
        req.older_progress = (req.next_stage, req.steps_done)
        if paused:
            assert ev.steps_done is not None
            # Stages before the diffuse ran; the diffuse stopped at a step boundary and
            # its state is the kept output (the stages after it did not run).
            req.next_stage = STAGES.index("diffuse")
            req.steps_done = ev.steps_done
            req.output = InputRef(cmd.task_id, cmd.devices[0])
            out.append(
                LogEvent(
                    "stage.paused",
                    {
                        "request_id": req.request_id,
                        "task_id": cmd.task_id,
                        "steps_done": ev.steps_done,
                        "preemptions": req.preemptions,
                    },
                )
            )
            if req.cancelled:
                self._fail(req, "cancelled", "cancelled by the client", out)
                return
            self.waiting[req.request_id] = req
            return
        req.next_stage += len(cmd.stages)
        if "diffuse" in cmd.stages:
            req.steps_done = 0
        if cmd.final:
            if req.older_output is not None:
                out.append(ReleaseOutput(req.older_output.device_id, req.older_output.key))
            req.older_output = None
            req.output = None
            self._complete(req, now, out)
            return
        req.output = InputRef(cmd.task_id, cmd.devices[0])
        if req.cancelled:
            self._fail(req, "cancelled", "cancelled by the client", out)
            return
        self.waiting[req.request_id] = req

    def _complete(self, req: RequestState, now: float, out: list[Command]) -> None:
        total = now - req.spec.arrival
        t = dict(req.timings)
        busy = sum(t.values())
        t["queue"] = max(0.0, total - busy)
        t["total"] = total
        met = None if req.deadline is None else now <= req.deadline + 1e-9
        out.append(
            CompleteRequest(
                request_id=req.request_id,
                timings=t,
                devices=dict(req.stage_devices),
                deadline=req.deadline,
                met_slo=met,
            )
        )
        self._forget(req)

    def _forget(self, req: RequestState) -> None:
        if self.requests.pop(req.request_id, None) is not None:
            self._backlog_s = max(0.0, self._backlog_s - req.est_s)
        self.waiting.pop(req.request_id, None)

    def _fail(self, req: RequestState, error: ErrorCode, message: str, out: list[Command]) -> None:
        for ref in (req.output, req.older_output):
            if ref is not None and ref.device_id in self.devices and self.devices[ref.device_id].up:
                out.append(ReleaseOutput(ref.device_id, ref.key))
        req.output = req.older_output = None
        out.append(FailRequest(req.request_id, error, message))
        self._forget(req)

    def _on_failed(self, ev: TaskFailed, now: float, out: list[Command]) -> None:
        task = self._finish_task_bookkeeping(ev.task_id)
        if task is None:
            return
        req = self.requests.get(task.cmd.request_id)
        if req is None or req.task_id != task.cmd.task_id:
            return
        req.task_id = None
        if req.cancelled:
            self._fail(req, "cancelled", "cancelled by the client", out)
            return
        if ev.retryable and req.attempts < self.config.max_attempts:
            req.attempts += 1
            out.append(
                LogEvent(
                    "stage.retry",
                    {"request_id": req.request_id, "task_id": ev.task_id, "reason": ev.message},
                )
            )
            self.waiting[req.request_id] = req
            return
        stage = ev.stage if ev.stage in task.cmd.stages else task.cmd.stages[0]
        self._fail(req, ev.error, f"{stage} failed on {task.cmd.devices[0]}: {ev.message}", out)

    def _on_device_up(self, info: DeviceInfo, now: float, out: list[Command]) -> None:
        old = self.devices.get(info.device_id)
        if old is not None and old.up:
            # A restart we did not see die: everything it held is gone.
            self._on_device_lost(info.device_id, "restarted", now, out)
        self.devices[info.device_id] = DeviceState(info=info, up=True, busy_until=now)
        out.extend(self.device_ready(self.devices[info.device_id], now))

    def device_ready(self, dev: DeviceState, now: float) -> list[Command]:
        """A device (re)joined holding nothing: what should it load? Override in policies."""
        return []

    def _on_device_lost(self, device_id: str, reason: str, now: float, out: list[Command]) -> None:
        st = self.devices.get(device_id)
        if st is None or not st.up:
            return
        st.up = False
        st.holds.clear()
        lost_tasks = [t for unit in st.inflight for t in list(self.batches.get(unit, [unit]))]
        st.inflight.clear()
        for task_id in lost_tasks:
            task = self._finish_task_bookkeeping(task_id)
            if task is None:
                continue
            req = self.requests.get(task.cmd.request_id)
            if req is not None and req.task_id == task_id:
                req.task_id = None
                self._requeue_after_loss(
                    req, f"task {task_id} lost with {device_id}: {reason}", out
                )
        # Requests whose kept output lived on the lost device must redo the stage(s).
        for req in list(self.requests.values()):
            if req.task_id is not None:
                task = self.tasks.get(req.task_id)
                feeds = task is not None and any(i.device_id == device_id for i in task.cmd.inputs)
                if not feeds:
                    continue
                # Its in-flight task cannot get its input: abandon it (the workers will
                # report it failed; the late report is ignored).
                self._finish_task_bookkeeping(req.task_id)
                req.task_id = None
            if req.output is not None and req.output.device_id == device_id:
                self._rollback(req)
                self._requeue_after_loss(req, f"output lost with {device_id}: {reason}", out)
            elif req.older_output is not None and req.older_output.device_id == device_id:
                req.older_output = None

    def _rollback(self, req: RequestState) -> None:
        """The latest output is gone: resume from the newest stage whose input exists."""
        if (
            req.older_output is not None
            and req.older_output.device_id in self.devices
            and self.devices[req.older_output.device_id].up
        ):
            # (A paused diffuse's chunk state, or the stage output before it.)
            req.output = req.older_output
            req.older_output = None
            req.next_stage, req.steps_done = req.older_progress
        else:
            req.output = req.older_output = None
            req.next_stage = 0
            req.steps_done = 0
            for k in ("encode", "diffuse", "decode", "transfer", "load"):
                req.timings[k] = 0.0

    def _requeue_after_loss(self, req: RequestState, why: str, out: list[Command]) -> None:
        if req.cancelled:
            self._fail(req, "cancelled", "cancelled by the client", out)
            return
        if req.attempts >= self.config.max_attempts:
            self._fail(req, "stage_failed", f"gave up after {req.attempts} attempts: {why}", out)
            return
        req.attempts += 1
        out.append(LogEvent("stage.rerun", {"request_id": req.request_id, "reason": why}))
        self.waiting[req.request_id] = req

    def _on_cancelled(self, request_id: str, now: float, out: list[Command]) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.task_id is None:
            self._fail(req, "cancelled", "cancelled by the client", out)
        elif not req.cancelled:
            # Ends when its task reports (stopped at the next step, or dropped unrun).
            req.cancelled = True
            task = self.tasks.get(req.task_id)
            if task is not None:
                out.append(CancelTask(req.task_id, task.cmd.devices))


class FifoPolicy(SchedulerCore):
    """Stage-level FIFO: each waiting stage, in arrival order, goes to the least-loaded
    up device (preferring the one holding its input, then one holding the stage's
    weights), at degree 1. Every device may hold every stage."""

    name = "fifo"

    def device_ready(self, dev: DeviceState, now: float) -> list[Command]:
        if not self.config.preload:
            return []
        return [LoadStage(dev.device_id, m, s) for m in self.models for s in STAGES]

    def plan(self, now: float) -> list[Command]:
        out: list[Command] = []
        if not self.waiting:
            return out
        limit = self.config.max_inflight_per_device
        free = {d.device_id: d for d in self.devices.values() if d.up and len(d.inflight) < limit}
        if not free:
            return out
        for req in list(self.waiting.values()):
            if not free:
                break
            stage = req.pending_stages[0]
            model = req.spec.model
            k = self.config.diffuse_degree
            if stage == "diffuse" and k > 1:
                group = self._free_group(free, k)
                if group is None:
                    continue
                est = (
                    self.cost.stage_seconds(req.family, stage, req.spec.shape, k)
                    if self.cost
                    else 0.0
                )
                out.append(self.start_task(req, (stage,), group, now, est_seconds=est))
                for d in group:
                    if len(self.devices[d].inflight) >= limit:
                        free.pop(d, None)
                continue

            def rank(
                d: DeviceState, req: RequestState = req, stage: Stage = stage, model: str = model
            ) -> tuple[int, int, int, str]:
                has_input = req.output is not None and req.output.device_id == d.device_id
                held = (model, stage) in d.holds
                return (len(d.inflight), 0 if has_input else 1, 0 if held else 1, d.device_id)

            best = min(free.values(), key=rank)
            est = (
                self.cost.stage_seconds(req.family, stage, req.spec.shape, 1) if self.cost else 0.0
            )
            out.append(self.start_task(req, (stage,), (best.device_id,), now, est_seconds=est))
            if len(best.inflight) >= limit:
                free.pop(best.device_id)
        return out

    def _free_group(self, free: dict[str, DeviceState], k: int) -> tuple[str, ...] | None:
        """The least-loaded aligned group of ``k`` free devices on one node."""
        groups: dict[tuple[str, int], list[DeviceState]] = {}
        for d in free.values():
            groups.setdefault((d.info.node_id, d.info.index // k), []).append(d)
        full = [sorted(g, key=lambda d: d.info.index) for g in groups.values() if len(g) == k]
        if not full:
            return None
        best = min(full, key=lambda g: (sum(len(d.inflight) for d in g), g[0].device_id))
        return tuple(d.device_id for d in best)
