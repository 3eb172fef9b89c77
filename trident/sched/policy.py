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
from trident.sched.cost import efficient_degrees, model_weight_bytes, supported_degrees
from trident.sched.dispatcher import (
    DeviceView,
    DispatchConfig,
    Dispatcher,
    QueueItem,
    best_group_free,
)
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
    RequestSpec,
    Shape,
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
        self._misfit: dict[tuple[str, Shape], str | None] = {}  # memory check cache

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
            # The cluster is (better) known now: requests that arrived before it and fit
            # no device fail at once instead of waiting forever.
            self._misfit.clear()
            for req in list(self.waiting.values()):
                if req.task_id is None:
                    self._fail_if_misfit(req, out)
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

    # ------------------------------------------------------------------ memory check

    def _on_arrived(self, spec: RequestSpec, now: float, out: list[Command]) -> None:
        super()._on_arrived(spec, now, out)
        req = self.waiting.get(spec.request_id)
        if req is not None and req.spec is spec:
            self._fail_if_misfit(req, out)

    def _fail_if_misfit(self, req: RequestState, out: list[Command]) -> None:
        key = (req.spec.model, req.spec.shape)
        if key not in self._misfit:
            self._misfit[key] = self.memory_misfit(req.spec.model, req.spec.shape)
        msg = self._misfit[key]
        if msg is not None:
            self._fail(req, "out_of_memory", msg, out)

    def memory_misfit(self, model: str, shape: Shape) -> str | None:
        """Why no known device (up or not, holding nothing else) can run some stage of
        ``model`` at ``shape`` — weights + peak activation above every device's memory at
        every supported degree (diffuse: aligned groups of k devices on one node) — or
        ``None`` when every stage fits somewhere (or no device is known yet)."""
        devs = self.graph.devices(up_only=False)
        info = self.models.get(model)
        if not devs or info is None:
            return None
        cost, fam = self.cost, info.family
        top = max(d.memory_bytes for d in devs)
        per_node: dict[str, dict[int, int]] = {}
        for d in devs:
            per_node.setdefault(d.node_id, {})[d.index] = d.memory_bytes
        for s in ("encode", "diffuse", "decode"):
            w = model_weight_bytes(cost, info, s)
            if s != "diffuse":
                need, k_best = w + cost.stage_peak_bytes(fam, s, shape, 1), 1
                if need <= top:
                    continue
            else:
                options: list[tuple[int, int]] = []
                ok = False
                for k in supported_degrees(cost, fam, shape, info.max_degree):
                    need_k = w + cost.stage_peak_bytes(fam, s, shape, k)
                    best = _best_aligned_memory(per_node, k)
                    if best < 0:
                        continue  # no node has an aligned group of k devices
                    if need_k <= best:
                        ok = True
                        break
                    options.append((need_k, k))
                if ok:
                    continue
                need, k_best = min(options, default=(w + cost.stage_peak_bytes(fam, s, shape), 1))
            peak = need - w
            return (
                f"model {model!r} at {shape.height}x{shape.width}x{shape.num_frames} "
                f"({shape.num_inference_steps} steps) does not fit any device: its {s} stage "
                f"needs {need / 1e9:.2f} GB per device (weights {w / 1e9:.2f} GB + peak "
                f"activation {peak / 1e9:.2f} GB at degree {k_best}, the least of every "
                f"allowed degree), but the largest device has {top / 1e9:.2f} GB"
            )
        return None

    # ------------------------------------------------------------------ adjust on dispatch

    def ensure_homes(
        self, items: list[QueueItem], views: list[DeviceView], now: float, out: list[Command]
    ) -> bool:
        """Adjust on dispatch: every stage a waiting request still needs must be held by
        some up device (a degree-k group for diffuse) with room for its peak activation.
        When none is, the stage is added to the plan of the device (group) that can take
        it with the least harm (free memory first; else evicting other models' stages,
        those held elsewhere first). Metadata only: the worker loads the weights when the
        first task needing them lands (evicted stages get ``UnloadStage``). Returns
        whether the plan changed."""
        cost = self.cost
        changed = False
        seen: set[tuple[str, Stage, Shape]] = set()
        ef = self.config.efficiency
        # Per round (reset when the plan changes): best free memory of a degree-k group
        # holding a model's diffuse stage; most free memory of a device holding (m, s).
        gfree: dict[tuple[str, int], int] = {}
        sfree: dict[tuple[str, Stage], int] = {}

        def group_free(m: str, k: int) -> int:
            if (m, k) not in gfree:
                gfree[m, k] = best_group_free(views, m, k)
            return gfree[m, k]

        def stage_free(m: str, s: Stage) -> int:
            if (m, s) not in sfree:
                sfree[m, s] = max(
                    (v.free_memory for v in views if s in v.holds.get(m, frozenset())),
                    default=-1,
                )
            return sfree[m, s]

        for it in items:
            info = self.models.get(it.model)
            if info is None:
                continue
            req = self.requests.get(it.request_id)
            if req is None:
                continue
            for s in req.pending_stages:
                key = (it.model, s, it.shape)
                if key in seen:
                    continue
                seen.add(key)
                fam = info.family
                if s == "diffuse":
                    ks = list(efficient_degrees(cost, fam, it.shape, info.max_degree, ef))
                    ks += [
                        k
                        for k in supported_degrees(cost, fam, it.shape, info.max_degree)
                        if k not in ks
                    ]
                    if any(
                        cost.stage_peak_bytes(fam, s, it.shape, k) <= group_free(it.model, k)
                        for k in ks
                    ):
                        continue
                else:
                    ks = [1]
                    if cost.stage_peak_bytes(fam, s, it.shape, 1) <= stage_free(it.model, s):
                        continue
                if self._home(it.model, s, it.shape, ks, views, out):
                    changed = True
                    views[:] = self.device_views(now)
                    gfree.clear()
                    sfree.clear()
        return changed

    def _home(
        self,
        model: str,
        stage: Stage,
        shape: Shape,
        ks: list[int],
        views: list[DeviceView],
        out: list[Command],
    ) -> bool:
        info = self.models[model]
        w = model_weight_bytes(self.cost, info, stage)
        holders: dict[tuple[str, Stage], int] = {}
        for v in views:
            for m, st in v.holds.items():
                for s in st:
                    holders[m, s] = holders.get((m, s), 0) + 1
        by_node: dict[str, dict[int, DeviceView]] = {}
        for v in views:
            by_node.setdefault(v.node_id, {})[v.index] = v
        for k in ks:
            peak = self.cost.stage_peak_bytes(info.family, stage, shape, k)
            best: tuple[tuple[float, ...], list[DeviceView], list[list[tuple[str, Stage]]]] | None
            best = None
            for node in sorted(by_node):
                idx = by_node[node]
                for j in range(max(idx) // k + 1):
                    grp = [idx.get(i) for i in range(j * k, (j + 1) * k)]
                    if any(g is None for g in grp):
                        continue
                    members = [g for g in grp if g is not None]
                    plan = [self._evictions(g, model, stage, w, peak, holders) for g in members]
                    if any(p is None for p in plan):
                        continue
                    victims = [p for p in plan if p is not None]
                    lost = sum(1 for p in victims for ms in p if holders.get(ms, 0) <= 1)
                    freed = sum(
                        model_weight_bytes(self.cost, self.models[m], s)
                        for p in victims
                        for m, s in p
                        if m in self.models
                    )
                    score = (
                        float(lost),
                        float(freed),
                        max(g.free_at for g in members),
                        -float(min(g.free_memory for g in members)),
                    )
                    if best is None or score < best[0]:
                        best = (score, members, victims)
            if best is None:
                continue
            _, members, victims = best
            evicted: list[str] = []
            for g, vs in zip(members, victims, strict=True):
                dev = g.device_id
                for m, s in vs:
                    old = self.graph.placement(dev).get(m, frozenset())
                    self.graph.set_placement(dev, m, old - {s})
                    out.append(UnloadStage(dev, m, s))
                    evicted.append(f"{dev}:{m}:{s}")
                old = self.graph.placement(dev).get(model, frozenset())
                self.graph.set_placement(dev, model, old | {stage})
            out.append(
                LogEvent(
                    "placement.adjusted",
                    {
                        "policy": self.name,
                        "model": model,
                        "stage": stage,
                        "devices": [g.device_id for g in members],
                        "degree": k,
                        "evicted": evicted,
                    },
                )
            )
            return True
        return False

    def _evictions(
        self,
        v: DeviceView,
        model: str,
        stage: Stage,
        w: int,
        peak: int,
        holders: Mapping[tuple[str, Stage], int],
    ) -> list[tuple[str, Stage]] | None:
        """Stages of other models to drop from ``v`` so that ``stage`` of ``model`` (and
        its peak) fits; None when even dropping all of them is not enough."""
        info = self.graph.info(v.device_id)
        held = stage in v.holds.get(model, frozenset())
        free = v.free_memory - (0 if held else w)
        if free >= peak:
            return []
        others = [
            (m, s) for m, st in v.holds.items() if m != model and m in self.models for s in st
        ]
        size = {ms: model_weight_bytes(self.cost, self.models[ms[0]], ms[1]) for ms in others}
        # Held elsewhere first, then the biggest (fewest evictions).
        others.sort(key=lambda ms: (holders.get(ms, 0) <= 1, -size[ms], ms))
        out: list[tuple[str, Stage]] = []
        for ms in others:
            if free >= peak:
                break
            out.append(ms)
            free += size[ms]
        if free < peak or info.memory_bytes < w + peak:
            return None
        return out

    # ------------------------------------------------------------------ helpers

    def weights_on(self, device_id: str) -> int:
        total = 0
        for m, stages in self.graph.placement(device_id).items():
            info = self.models.get(m)
            if info is None:
                continue
            for s in stages:
                total += model_weight_bytes(self.cost, info, s)
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


def _best_aligned_memory(per_node: Mapping[str, Mapping[int, int]], k: int) -> int:
    """Largest (per member, the least) memory of an aligned degree-k group; -1 if none."""
    best = -1
    for idx in per_node.values():
        if not idx:
            continue
        for j in range(max(idx) // k + 1):
            mems = [idx.get(i) for i in range(j * k, (j + 1) * k)]
            if all(m is not None for m in mems):
                best = max(best, min(m for m in mems if m is not None))
    return best


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
    placement_time_limit_s: float = 0.15
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
        self._base: dict[str, tuple[str, str] | None] = {}

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
        """Each device's (model, type) as the orchestrator sees it: the MIP's choice when
        the device still holds that model, else the model it holds most weights of."""
        cur: dict[str, tuple[str, str] | None] = {}
        for info in self.graph.devices():
            pl = self.graph.placement(info.device_id)
            base = self._base.get(info.device_id)
            if base is not None and base[0] in pl:
                cur[info.device_id] = (base[0], placement_type(pl[base[0]]))
                continue
            best = max(
                pl.items(),
                key=lambda ms: (
                    sum(model_weight_bytes(self.cost, self.models[ms[0]], s) for s in ms[1])
                    if ms[0] in self.models
                    else 0
                ),
                default=None,
            )
            cur[info.device_id] = (best[0], placement_type(best[1])) if best else None
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
        self._base = dict(res.plan)
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
        items = [self.queue_item(r) for r in self.waiting.values()]
        self.ensure_homes(items, views, now, out)
        by_id = {v.device_id: v for v in views}
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
