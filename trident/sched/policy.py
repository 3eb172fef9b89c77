"""Policies: Trident's own, the shared placement plumbing, and :func:`make_policy`.

Every policy is a :class:`~trident.sched.core.SchedulerCore` (request lifecycle, kept
outputs, retries, admission) that also *holds a placement* — which stages each device
holds — in a :class:`~trident.sched.graph.ClusterGraph`, and emits ``LoadStage`` for its
initial placement when devices join (so the simulator accounts memory and load time)
and ``LoadStage``/``UnloadStage`` when the placement changes.

``make_policy(name, models, cost, **config)``: names ``trident`` (default), ``b1``,
``b4``, ``b6``, ``authors``, ``fifo`` (the core's stage-level FIFO). Config keys:
:func:`config_keys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from trident.sched.core import CoreConfig, FifoPolicy, RequestState, SchedulerCore
from trident.sched.dispatcher import DeviceView, DispatchConfig, Dispatcher, QueueItem
from trident.sched.graph import ClusterGraph, placement_type
from trident.sched.monitor import Monitor
from trident.sched.orchestrator import (
    OrchestratorConfig,
    orchestrate,
    plan_capacity_ratio,
)
from trident.sched.types import (
    STAGES,
    Command,
    CostModel,
    DeviceInfo,
    DeviceLost,
    DeviceUp,
    Event,
    LoadStage,
    LogEvent,
    ModelInfo,
    NodeJoined,
    NodeLost,
    Policy,
    RequestArrived,
    Stage,
    TaskFinished,
    Tick,
    UnloadStage,
)

__all__ = [
    "PlacedPolicy",
    "TridentConfig",
    "TridentPolicy",
    "config_keys",
    "make_policy",
]

Placement = dict[str, dict[str, frozenset[Stage]]]  # device -> model -> stages


class PlacedPolicy(SchedulerCore):
    """A core with a placement plan. Subclasses implement :meth:`compute_placement`
    (called when devices join) and :meth:`plan` (dispatch)."""

    name = "placed"

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        cost: CostModel,
        config: CoreConfig | None = None,
    ) -> None:
        super().__init__(models, cost, config)
        self.cost: CostModel = cost
        self.graph = ClusterGraph()

    # ------------------------------------------------------------------ events

    def handle(self, event: Event, now: float) -> list[Command]:
        pre: list[Command] = []
        if isinstance(event, NodeJoined):
            self._join(list(event.devices), now, pre)
        elif isinstance(event, DeviceUp):
            self._join([event.device], now, pre)
        elif isinstance(event, DeviceLost):
            if event.device_id in self.graph:
                self.graph.set_up(event.device_id, False)
        elif isinstance(event, NodeLost):
            for d in self.graph.node_devices(event.node_id):
                self.graph.set_up(d.device_id, False)
        self.observe(event, now, pre)
        out = super().handle(event, now)
        return pre + out

    def observe(self, event: Event, now: float, out: list[Command]) -> None:
        """Hook for subclasses (monitor, re-placement) before dispatch."""

    def _join(self, infos: list[DeviceInfo], now: float, out: list[Command]) -> None:
        new = [d for d in infos if d.device_id not in self.graph]
        for d in infos:
            self.graph.add_device(d)
        if new:
            self.apply_placement(self.compute_placement(now), now, out, reason="devices joined")
        else:  # restarts: same plan, weights must come back
            for d in infos:
                for m, stages in self.graph.placement(d.device_id).items():
                    for s in STAGES:
                        if s in stages:
                            out.append(LoadStage(d.device_id, m, s))

    def compute_placement(self, now: float) -> Placement:
        raise NotImplementedError

    def apply_placement(
        self, placement: Placement, now: float, out: list[Command], reason: str = ""
    ) -> None:
        """Set the plan (metadata first); emit unload/load for changed stages."""
        changed = 0
        for info in self.graph.devices(up_only=False):
            dev = info.device_id
            old = dict(self.graph.placement(dev))
            new = placement.get(dev, {})
            for m, stages in old.items():
                for s in STAGES:
                    if s in stages and s not in new.get(m, frozenset()):
                        out.append(UnloadStage(dev, m, s))
            for m, stages in new.items():
                for s in STAGES:
                    if s in stages and s not in old.get(m, frozenset()):
                        out.append(LoadStage(dev, m, s))
            if old != new:
                changed += 1
            self.graph.clear_placement(dev)
            for m, stages in new.items():
                self.graph.set_placement(dev, m, stages)
        if changed:
            types: dict[str, int] = {}
            for info in self.graph.devices(up_only=False):
                for m, st in self.graph.placement(info.device_id).items():
                    key = f"{m}:{placement_type(st)}"
                    types[key] = types.get(key, 0) + 1
            out.append(
                LogEvent(
                    "placement.changed",
                    {
                        "policy": self.name,
                        "reason": reason,
                        "devices_changed": changed,
                        "types": types,
                    },
                )
            )

    # ------------------------------------------------------------------ helpers

    def weights_on(self, device_id: str) -> int:
        total = 0
        for m, stages in self.graph.placement(device_id).items():
            info = self.models.get(m)
            if info is None:
                continue
            for s in stages:
                total += int(info.stage_weight_bytes.get(s, 0)) or self.cost.weight_bytes(
                    info.family, s
                )
        return total

    def device_views(self, now: float) -> list[DeviceView]:
        limit = self.config.max_inflight_per_device
        out = []
        for st in self.devices.values():
            if not st.up or st.device_id not in self.graph:
                continue
            info = st.info
            out.append(
                DeviceView(
                    device_id=info.device_id,
                    node_id=info.node_id,
                    index=info.index,
                    speed=info.speed,
                    # An idle device is free now, whatever the estimate said: tasks
                    # often finish before their predicted end.
                    free_at=max(now, st.busy_until) if st.inflight else now,
                    free_memory=info.memory_bytes - self.weights_on(info.device_id),
                    holds=dict(self.graph.placement(info.device_id)),
                    available=len(st.inflight) < limit,
                )
            )
        return out

    def queue_item(self, req: RequestState) -> QueueItem:
        info = self.models[req.spec.model]
        return QueueItem(
            request_id=req.request_id,
            model=req.spec.model,
            family=req.family,
            shape=req.spec.shape,
            arrival=req.spec.arrival,
            deadline=req.deadline if req.deadline is not None else float("inf"),
            next_stage=req.pending_stages[0],
            input_device=req.output.device_id if req.output is not None else None,
            max_degree=info.max_degree,
        )

    def issue(
        self,
        req: RequestState,
        stages: tuple[Stage, ...],
        devices: tuple[str, ...],
        now: float,
        end: float,
    ) -> Command:
        cmd = self.start_task(req, stages, devices, now)
        for d in devices:
            st = self.devices[d]
            st.busy_until = max(st.busy_until, end)
        return cmd


# --------------------------------------------------------------------------- trident


@dataclass
class TridentConfig:
    # core
    max_queue: int = 1024
    max_attempts: int = 3
    max_inflight_per_device: int = 2
    slo_scale: float = 2.5
    efficiency: float = 0.8
    # dispatcher
    solver: str = "cbc"
    dispatch_time_limit_s: float = 0.04
    dispatch_max_requests: int = 24
    groups_per_degree: int = 3
    lookahead_s: float = 2.0
    use_mip: bool = True
    # orchestrator / monitor
    placement_solver: str = "highs"
    placement_time_limit_s: float = 0.5
    move_penalty: float = 0.05
    window_s: float = 60.0
    imbalance: float = 1.5
    replan_interval_s: float = 10.0
    min_gain: float = 0.1
    dynamic_placement: bool = True
    log_empty_rounds: bool = False

    def core(self) -> CoreConfig:
        return CoreConfig(
            max_queue=self.max_queue,
            max_attempts=self.max_attempts,
            max_inflight_per_device=self.max_inflight_per_device,
            slo_scale=self.slo_scale,
            efficiency=self.efficiency,
        )


class TridentPolicy(PlacedPolicy):
    """MIP placement (re-planned on imbalance) + MIP dispatch with greedy fallback."""

    name = "trident"

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        cost: CostModel,
        config: TridentConfig | None = None,
    ) -> None:
        self.tconfig = config or TridentConfig()
        super().__init__(models, cost, self.tconfig.core())
        c = self.tconfig
        self.dispatcher = Dispatcher(
            cost,
            DispatchConfig(
                solver="highs" if c.solver == "highs" else "cbc",
                time_limit_s=c.dispatch_time_limit_s,
                max_requests=c.dispatch_max_requests,
                groups_per_degree=c.groups_per_degree,
                lookahead_s=c.lookahead_s,
                efficiency=c.efficiency,
                use_mip=c.use_mip,
            ),
        )
        self.monitor = Monitor(window_s=c.window_s, imbalance=c.imbalance)
        self._last_check = -float("inf")

    # ------------------------------------------------------------------ placement

    def _orch_config(self) -> OrchestratorConfig:
        c = self.tconfig
        return OrchestratorConfig(
            solver=c.placement_solver,
            time_limit_s=c.placement_time_limit_s,
            move_penalty=c.move_penalty,
            efficiency=c.efficiency,
        )

    def _current(self) -> dict[str, tuple[str, str] | None]:
        cur: dict[str, tuple[str, str] | None] = {}
        for info in self.graph.devices():
            pl = self.graph.placement(info.device_id)
            cur[info.device_id] = next(((m, placement_type(s)) for m, s in pl.items()), None)
        return cur

    def compute_placement(self, now: float) -> Placement:
        devices = self.graph.devices()
        demand = self.monitor.demand(self.cost, self.models, now, self.tconfig.efficiency)
        res = orchestrate(
            self.cost,
            self.models,
            devices,
            demand,
            self.monitor.shapes(now),
            self._current(),
            self._orch_config(),
        )
        self._last_placement = res
        return res.stages()

    def _model_ratios(self, now: float) -> dict[str, float]:
        demand = self.monitor.demand(self.cost, self.models, now, self.tconfig.efficiency)
        counts: dict[str, dict[tuple[str, str], float]] = {}
        for info in self.graph.devices():
            for m, st in self.graph.placement(info.device_id).items():
                key = (m, placement_type(st))
                counts.setdefault(m, {})
                counts[m][key] = counts[m].get(key, 0.0) + info.speed
        out: dict[str, float] = {}
        for m, dem in demand.items():
            if sum(dem.values()) <= 0:
                continue
            out[m] = plan_capacity_ratio(counts.get(m, {}), {m: dem})
        return out

    def observe(self, event: Event, now: float, out: list[Command]) -> None:
        if isinstance(event, RequestArrived):
            self.monitor.record_arrival(now, event.request.model, event.request.shape)
        elif isinstance(event, TaskFinished):
            task = self.tasks.get(event.task_id)
            if task is not None:
                for s, secs in event.stage_seconds.items():
                    self.monitor.record_stage(task.cmd.model, s, float(secs))
        c = self.tconfig
        if not c.dynamic_placement or not isinstance(event, (Tick, RequestArrived)):
            return
        if now - self._last_check < c.replan_interval_s or not self.graph.devices():
            return
        self._last_check = now
        ratios = self._model_ratios(now)
        if not ratios or not self.monitor.imbalanced(ratios):
            return
        before = min(ratios.values())
        placement = self.compute_placement(now)
        after = self._last_placement.ratio
        if after > before * (1.0 + c.min_gain):
            self.apply_placement(
                placement, now, out, reason=f"imbalance: ratio {before:.3f} -> {after:.3f}"
            )

    # ------------------------------------------------------------------ dispatch

    def plan(self, now: float) -> list[Command]:
        out: list[Command] = []
        if not self.waiting:
            return out
        views = self.device_views(now)
        if not views:
            return out
        by_id = {v.device_id: v for v in views}
        items = [self.queue_item(r) for r in self.waiting.values()]
        # Decode follows diffuse.
        for it in sorted((i for i in items if i.next_stage == "decode"), key=lambda i: i.deadline):
            a = self.dispatcher.follow_decode(it, views, now)
            if a is None:
                continue
            out.append(
                self.issue(self.requests[it.request_id], a.stages, a.devices, now, a.task_end)
            )
            v = by_id[a.devices[0]]
            v.free_at = a.task_end
            v.available = (
                len(self.devices[v.device_id].inflight) < self.config.max_inflight_per_device
            )
        res = self.dispatcher.solve(items, views, now)
        for a in res.assignments:
            req = self.requests.get(a.request_id)
            if req is None or req.task_id is not None:
                continue
            out.append(self.issue(req, a.stages, a.devices, now, a.task_end))
        if res.variables or self.tconfig.log_empty_rounds:
            out.append(
                LogEvent(
                    "dispatch.solved",
                    {
                        "solver": res.solver,
                        "ms": round(res.ms, 3),
                        "reason": res.reason,
                        "variables": res.variables,
                        "assigned": len(res.assignments),
                        "queued": len(items),
                    },
                )
            )
        return out


# --------------------------------------------------------------------------- factory


def config_keys(name: str) -> tuple[str, ...]:
    """The config keys ``make_policy(name, ..., **config)`` accepts."""
    from trident.sched import baselines

    cls: dict[str, type[Any]] = {
        "trident": TridentConfig,
        "fifo": CoreConfig,
        "b1": baselines.StaticFifoConfig,
        "b4": baselines.BaselineConfig,
        "b6": baselines.StageSplitConfig,
        "authors": baselines.AuthorsConfig,
    }
    return tuple(f.name for f in fields(cls[name]))


def make_policy(
    name: str,
    models: Mapping[str, ModelInfo],
    cost: CostModel,
    **config: Any,
) -> Policy:
    """A policy by name: ``trident`` (default), ``b1``, ``b4``, ``b6``, ``authors``,
    ``fifo``. Unknown config keys raise ``TypeError`` (see :func:`config_keys`)."""
    from trident.sched import baselines

    name = (name or "trident").lower()
    if name == "trident":
        return TridentPolicy(models, cost, TridentConfig(**config))
    if name == "fifo":
        return FifoPolicy(models, cost, CoreConfig(**config))
    classes: dict[str, tuple[type[Any], type[Any]]] = {
        "b1": (baselines.StaticFifoPolicy, baselines.StaticFifoConfig),
        "b4": (baselines.PipelineSrtfPolicy, baselines.BaselineConfig),
        "b6": (baselines.StageSrtfPolicy, baselines.StageSplitConfig),
        "authors": (baselines.AuthorsPolicy, baselines.AuthorsConfig),
    }
    if name not in classes:
        raise ValueError(f"unknown policy {name!r}; known: trident, b1, b4, b6, authors, fifo")
    pcls, ccls = classes[name]
    policy: Policy = pcls(models, cost, ccls(**config))
    return policy
