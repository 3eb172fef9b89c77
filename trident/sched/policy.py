"""Policies: Trident's own, the shared placement plumbing, and :func:`make_policy`.

Every policy is a :class:`~trident.sched.core.SchedulerCore` (request lifecycle, kept
outputs, retries, admission) that also *holds a placement* — which stages each device
holds — in a :class:`~trident.sched.graph.ClusterGraph`, and emits ``LoadStage`` for its
initial placement when devices join (so the simulator accounts memory and load time)
and ``LoadStage``/``UnloadStage`` when the placement changes.

``make_policy(name, models, cost, **config)``: names ``trident`` (default),
``trident-static`` (same, placement frozen after the first window), ``b1``,
``b4``, ``b6``, ``authors``, ``fifo`` (the core's stage-level FIFO). Config keys:
:func:`config_keys`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from trident.sched.batching import BatchConfig, batch_key, form_batches
from trident.sched.core import CoreConfig, FifoPolicy, RequestState, SchedulerCore
from trident.sched.cost import efficient_degrees, model_weight_bytes, supported_degrees
from trident.sched.dispatcher import (
    DeviceView,
    DispatchConfig,
    Dispatcher,
    QueueItem,
    _aligned,
    best_group_free,
)
from trident.sched.graph import ClusterGraph, placement_type
from trident.sched.monitor import Monitor, MonitorSnapshot, mix_of
from trident.sched.orchestrator import (
    OrchestratorConfig,
    PlacementResult,
    model_capacity_ratio,
    orchestrate,
    requirement_factors,
    served_weights,
    type_load_seconds,
)
from trident.sched.trigger import ReplanTrigger, TriggerConfig
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
    "TridentStaticPolicy",
    "config_keys",
    "make_policy",
]

Placement = dict[str, dict[str, frozenset[Stage]]]  # device -> model -> stages


class PlacedPolicy(SchedulerCore):
    """A core with a placement plan. Subclasses implement :meth:`compute_placement`
    (called when devices join) and :meth:`plan` (dispatch)."""

    name = "placed"
    # Adjust on dispatch may give a backlogged shape that few groups fit further groups,
    # up to this share of the devices (per degree).
    extra_home_share = 0.125

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

    def apply(self, event: Event, now: float, out: list[Command]) -> None:
        pre = out
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
        super().apply(event, now, out)

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
        self,
        placement: Placement,
        now: float,
        out: list[Command],
        reason: str = "",
        why: Mapping[str, object] | None = None,
    ) -> int:
        """Set the plan (metadata first); emit unload/load for changed stages; log
        ``placement.changed`` with the old and new plan (device -> model -> placement
        type), the reason and ``why`` (trigger rule, numbers, monitor snapshot). Returns
        the number of devices whose placement changed."""
        changed = 0
        old_plan: dict[str, dict[str, str]] = {}
        new_plan: dict[str, dict[str, str]] = {}
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
            old_plan[dev] = {m: placement_type(st) for m, st in old.items() if st}
            new_plan[dev] = {m: placement_type(st) for m, st in new.items() if st}
            self.graph.clear_placement(dev)
            for m, stages in new.items():
                self.graph.set_placement(dev, m, stages)
        if changed:
            types: dict[str, int] = {}
            for info in self.graph.devices(up_only=False):
                for m, st in self.graph.placement(info.device_id).items():
                    key = f"{m}:{placement_type(st)}"
                    types[key] = types.get(key, 0) + 1
            fields_: dict[str, object] = {
                "policy": self.name,
                "reason": reason,
                "devices_changed": changed,
                "types": types,
                "old": old_plan,
                "new": new_plan,
            }
            if why:
                fields_.update(why)
            out.append(LogEvent("placement.changed", fields_))
        return changed

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
        those held elsewhere first, then this model's other stages where enough other
        devices keep them — ⟨EDC⟩ becomes ⟨D⟩ when the diffuse activation does not fit
        next to the whole pipeline). Metadata only: the worker loads the weights when the
        first task needing them lands (evicted stages get ``UnloadStage``). A waiting
        request whose stage no group of the (fully up) cluster can take even so fails
        with ``out_of_memory``. Returns whether the plan changed."""
        cost = self.cost
        changed = False
        seen: set[tuple[str, Stage, Shape]] = set()
        impossible: set[tuple[str, Stage, Shape]] = set()
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

        cfit: dict[tuple[str, int, int], int] = {}

        def count_fit(m: str, k: int, peak: int) -> int:
            """Aligned degree-k groups holding m's diffuse with room for ``peak``."""
            if (m, k, peak) not in cfit:
                by_node: dict[str, dict[int, DeviceView]] = {}
                for v in views:
                    if "diffuse" in v.holds.get(m, frozenset()):
                        by_node.setdefault(v.node_id, {})[v.index] = v
                cfit[m, k, peak] = sum(
                    1
                    for idx in by_node.values()
                    for grp in _aligned(idx, k)
                    if min(g.free_memory for g in grp) >= peak
                )
            return cfit[m, k, peak]

        backlog: dict[tuple[str, Stage, Shape], int] = {}
        for it in items:
            r = self.requests.get(it.request_id)
            if r is not None and r.task_id is None and "diffuse" in r.pending_stages:
                bk: tuple[str, Stage, Shape] = (it.model, "diffuse", it.shape)
                backlog[bk] = backlog.get(bk, 0) + 1

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
                    peaks = {k: cost.stage_peak_bytes(fam, s, it.shape, k) for k in ks}
                    extra = False
                    if any(peaks[k] <= group_free(it.model, k) for k in ks):
                        # Homed already. A shape that only few groups fit (e.g. one
                        # homed ⟨D⟩ group) with a backlog gets more groups, up to
                        # ``extra_home_share`` of the devices per degree.
                        need = backlog.get(key, 0)
                        share = self.extra_home_share * len(views)
                        if not any(
                            (have := count_fit(it.model, k, peaks[k])) < min(need, share // k)
                            and have > 0
                            for k in ks
                        ):
                            continue
                        extra = True
                else:
                    ks = [1]
                    extra = False
                    if cost.stage_peak_bytes(fam, s, it.shape, 1) <= stage_free(it.model, s):
                        continue
                if self._home(it.model, s, it.shape, ks, views, out, new_only=extra):
                    changed = True
                    views[:] = self.device_views(now)
                    gfree.clear()
                    sfree.clear()
                    cfit.clear()
                elif not extra and all(
                    self.graph.is_up(d.device_id) for d in self.graph.devices(up_only=False)
                ):
                    # No group of the whole (healthy) cluster can take it, whatever is
                    # evicted: fail those requests instead of letting them wait forever.
                    # (With devices down, a restart may bring the room back: wait.)
                    impossible.add(key)
        if impossible:
            for it in items:
                req = self.requests.get(it.request_id)
                if req is None or req.task_id is not None or it.request_id not in self.waiting:
                    continue
                bad = [s for s in req.pending_stages if (it.model, s, it.shape) in impossible]
                if bad:
                    shp = it.shape
                    self._fail(
                        req,
                        "out_of_memory",
                        f"model {it.model!r} at {shp.height}x{shp.width}x{shp.num_frames}: "
                        f"no device group can hold its {bad[0]} stage with room for the peak "
                        "activation, even after evicting other stages",
                        out,
                    )
            items[:] = [i for i in items if i.request_id in self.waiting]
        return changed

    def _home(
        self,
        model: str,
        stage: Stage,
        shape: Shape,
        ks: list[int],
        views: list[DeviceView],
        out: list[Command],
        new_only: bool = False,
    ) -> bool:
        """Add ``stage`` to the best group (see :meth:`ensure_homes`); ``new_only``:
        skip groups that already hold it with room (a further home, not the first)."""
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
                    if new_only and all(
                        stage in g.holds.get(model, frozenset()) and g.free_memory >= peak
                        for g in members
                    ):
                        continue
                    plan = [
                        self._evictions(g, model, stage, w, peak, holders, keep=k) for g in members
                    ]
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
        keep: int = 1,
    ) -> list[tuple[str, Stage]] | None:
        """Stages of other models to drop from ``v`` so that ``stage`` of ``model`` (and
        its peak) fits; None when even dropping all of them is not enough."""
        info = self.graph.info(v.device_id)
        held = stage in v.holds.get(model, frozenset())
        free = v.free_memory - (0 if held else w)
        if free >= peak:
            return []
        # Other models' stages; and this model's other stages where more than
        # ``keep`` devices hold them (so some device keeps each after a group's
        # evictions: e.g. ⟨EDC⟩ -> ⟨D⟩ for a diffuse activation that does not fit next to
        # the whole pipeline, encode/decode then run elsewhere).
        others = [
            (m, s)
            for m, st in sorted(v.holds.items())
            if m in self.models
            for s in sorted(st)
            if m != model or (s != stage and holders.get((m, s), 0) > keep)
        ]
        size = {ms: model_weight_bytes(self.cost, self.models[ms[0]], ms[1]) for ms in others}
        # Held elsewhere first, other models before this one's, then the biggest (fewest
        # evictions).
        others.sort(key=lambda ms: (holders.get(ms, 0) <= 1, ms[0] == model, -size[ms], ms))
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
        return self.issue_batch([req], stages, devices, now, end)

    def issue_batch(
        self,
        reqs: list[RequestState],
        stages: tuple[Stage, ...],
        devices: tuple[str, ...],
        now: float,
        end: float,
    ) -> Command:
        """Issue ``stages`` of ``reqs`` as one call (a plain task for one request) and
        mark ``devices`` busy until ``end``."""
        cmd = self.start_batch(reqs, stages, devices, now)
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
    dispatch_max_nodes: int = 200  # branch-and-bound nodes per dispatch solve
    dispatch_max_requests: int = 24
    groups_per_degree: int = 3
    lookahead_s: float = 2.0
    use_mip: bool = True
    relax_when_idle: bool = True  # idle cluster: fastest efficient degree, not thriftiest
    wait_for_on_time: bool = True  # wait for an on-time group rather than miss now
    # batching of small same-shape image requests (trident.sched.batching); 1: off
    max_batch: int = 4
    batch_min_gain: float = 1.2  # requests per device-second vs separate calls
    load_cost: bool = True  # predicted completion pays load_seconds(source) for missing weights
    # orchestrator / monitor / trigger
    placement_solver: str = "highs"
    placement_max_nodes: int = 500  # branch-and-bound nodes per placement solve
    move_penalty: float = 0.05
    move_horizon_s: float = 300.0  # a plan is expected to hold this long (load penalty)
    load_weight: float = 1.0  # weight of the load-time part of the move penalty
    window_s: float = 60.0
    # a model with fewer arrivals than this in window_s: rate over its last this-many
    # arrivals, looking back at most max_window_s (0: one window for all models)
    min_model_arrivals: int = 8
    max_window_s: float = 300.0
    imbalance: float = 1.5  # fastest / slowest stage (or model) supply ratio
    drift: float = 0.25  # total-variation distance of the work mix vs the plan's
    replan_interval_s: float = 5.0  # trigger check period
    confirm_checks: int = 3  # consecutive checks a condition must hold
    min_replan_interval_s: float = 30.0  # between re-plan attempts
    min_gain: float = 0.1  # predicted least-ratio improvement needed to apply a plan
    # current least ratio at or above it: keep the plan (capacity/demand with "maxmin";
    # capacity/requirement on a served tie with "served")
    satisfied_ratio: float = 1.25
    # Placement objective (OrchestratorConfig): "served" (share of requests whose model
    # gets its latency requirement, least ratio secondary) or "maxmin" (the old one).
    objective: str = "served"
    rho_max: float = 0.7  # requirement = work / rho_max (+ largest degree, degree_headroom)
    degree_headroom: bool = True
    secondary_weight: float = 0.01
    bind_aux: bool = True  # a primary's encode/decode serve only its own requests
    # served objective: apply a plan only if it serves this much more of the requests
    min_served_gain: float = 0.05
    min_arrivals: int = 10  # trigger ignores windows with fewer arrivals
    dynamic_placement: bool = True
    # trident-static: plan once, this long after the first arrival (None: window_s)
    static_plan_after_s: float | None = None
    log_empty_rounds: bool = False
    # refuse at arrival what is predicted to miss its deadline by more (None: never)
    shed_late_margin_s: float | None = None

    def core(self) -> CoreConfig:
        return CoreConfig(
            max_queue=self.max_queue,
            max_attempts=self.max_attempts,
            max_inflight_per_device=self.max_inflight_per_device,
            slo_scale=self.slo_scale,
            efficiency=self.efficiency,
            shed_late_margin_s=self.shed_late_margin_s,
        )

    def trigger(self) -> TriggerConfig:
        return TriggerConfig(
            imbalance=self.imbalance,
            drift=self.drift,
            confirm_checks=self.confirm_checks,
            min_interval_s=self.min_replan_interval_s,
            min_gain=self.min_gain,
            satisfied_ratio=self.satisfied_ratio,
            min_served_gain=self.min_served_gain,
            min_arrivals=self.min_arrivals,
        )


class TridentPolicy(PlacedPolicy):
    """MIP placement re-planned by the trigger (monitor snapshot: stage/model imbalance,
    mix drift; hysteresis) + MIP dispatch with greedy fallback, load-aware."""

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
                max_nodes=c.dispatch_max_nodes,
                max_requests=c.dispatch_max_requests,
                groups_per_degree=c.groups_per_degree,
                lookahead_s=c.lookahead_s,
                efficiency=c.efficiency,
                use_mip=c.use_mip,
                relax_when_idle=c.relax_when_idle,
                wait_for_on_time=c.wait_for_on_time,
            ),
        )
        self.monitor = Monitor(
            window_s=c.window_s,
            imbalance=c.imbalance,
            min_model_arrivals=c.min_model_arrivals,
            max_window_s=c.max_window_s,
        )
        self.trigger = ReplanTrigger(c.trigger())
        self._last_check = -float("inf")
        self._base: dict[str, tuple[str, str] | None] = {}
        self._load_s: dict[tuple[str, Stage, str], float] = {}
        self.last_snapshot: MonitorSnapshot | None = None
        self.batching = BatchConfig(max_batch=c.max_batch, min_gain=c.batch_min_gain)
        self._batch_keys: dict[str, Hashable | None] = {}  # request id -> batch_key

    # ------------------------------------------------------------------ load cost

    def _load_seconds(self, model: str, stage: Stage, source: str) -> float:
        key = (model, stage, source)
        got = self._load_s.get(key)
        if got is None:
            info = self.models[model]
            got = float(self.cost.load_seconds(info.family, stage, source))
            # The cost model's figure is for its family's weights; a served model with
            # its own, smaller weights (a tiny model) loads in proportion.
            fam_w = float(self.cost.weight_bytes(info.family, stage))
            own_w = float(model_weight_bytes(self.cost, info, stage))
            if 0 < own_w < fam_w:
                got *= own_w / fam_w
            self._load_s[key] = got
        return got

    def device_views(self, now: float) -> list[DeviceView]:
        views = super().device_views(now)
        if not self.tconfig.load_cost:
            return views
        for v in views:
            st = self.devices[v.device_id]
            loads: dict[tuple[str, Stage], float] = {}
            for m, stages in v.holds.items():
                if m not in self.models:
                    continue
                for s in stages:
                    if (m, s) in st.holds:
                        continue
                    loads[m, s] = self._load_seconds(m, s, self.load_source(v.device_id, m, s))
            v.load_s = loads
        return views

    def _move_seconds(self) -> dict[tuple[str, str], float]:
        """Per (model, type): seconds to load its weights on a device that lacks them —
        "node-cache" when some node has loaded the stage before, else "disk"."""
        seen = {(m, s) for _, m, s in self.node_copies}
        src: dict[tuple[str, Stage], str] = {
            (m, s): "node-cache" if (m, s) in seen else "disk" for m in self.models for s in STAGES
        }
        return type_load_seconds(self.cost, self.models, src)

    # ------------------------------------------------------------------ placement

    def _orch_config(self) -> OrchestratorConfig:
        c = self.tconfig
        return OrchestratorConfig(
            solver=c.placement_solver,
            max_nodes=c.placement_max_nodes,
            move_penalty=c.move_penalty,
            efficiency=c.efficiency,
            move_horizon_s=c.move_horizon_s,
            load_weight=c.load_weight,
            objective=c.objective,
            rho_max=c.rho_max,
            degree_headroom=c.degree_headroom,
            secondary_weight=c.secondary_weight,
            bind_aux=c.bind_aux,
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

    def _orchestrate(self, now: float) -> PlacementResult:
        devices = self.graph.devices()
        demand = self.monitor.demand(self.cost, self.models, now, self.tconfig.efficiency)
        current = self._current()
        # Load time is a cost of *moving*: when some device holds nothing yet (devices
        # joined), every type must be loaded anyway and the penalty would only bias the
        # plan toward small weights.
        moving = bool(current) and all(v is not None for v in current.values())
        return orchestrate(
            self.cost,
            self.models,
            devices,
            demand,
            self.monitor.shapes(now),
            current,
            self._orch_config(),
            move_seconds=self._move_seconds() if moving else None,
            rates=self.monitor.rates(now),
            clock=self.clock,
        )

    def compute_placement(self, now: float) -> Placement:
        res = self._orchestrate(now)
        self._last_placement = res
        self._base = dict(res.plan)
        self.trigger.planned_for(self._mix(now))
        return res.stages()

    def _mix(self, now: float) -> dict[str, float]:
        return mix_of(self.monitor.demand(self.cost, self.models, now, self.tconfig.efficiency))

    def _ratios_of(
        self, placement: Mapping[str, Mapping[str, frozenset[Stage]]], now: float
    ) -> dict[str, float]:
        """Per model with demand: the plan's capacity/demand (exact fluid LP), counting
        every up device that holds the model fully for its type there."""
        demand = self.monitor.demand(self.cost, self.models, now, self.tconfig.efficiency)
        counts: dict[str, dict[tuple[str, str], float]] = {}
        for info in self.graph.devices():
            for m, st in placement.get(info.device_id, {}).items():
                if not st:
                    continue
                key = (m, placement_type(st))
                counts.setdefault(m, {})
                counts[m][key] = counts[m].get(key, 0.0) + info.speed
        out: dict[str, float] = {}
        for m, dem in demand.items():
            if sum(dem.values()) <= 0:
                continue
            types = {t: c for (_, t), c in counts.get(m, {}).items()}
            out[m] = model_capacity_ratio(types, dem, self.tconfig.bind_aux)
        return out

    def _served_of(self, ratios: Mapping[str, float], now: float) -> tuple[float, float]:
        """(served, least capacity/requirement) of a plan's per-model capacity/demand
        ratios under the window's demand (the orchestrator's served objective)."""
        c = self.tconfig
        demand = self.monitor.demand(self.cost, self.models, now, c.efficiency)
        shapes = self.monitor.shapes(now)
        factors = requirement_factors(
            self.cost, self.models, demand, shapes, c.rho_max, c.degree_headroom, c.efficiency
        )
        weights = served_weights(demand, shapes, self.monitor.rates(now))
        served = sum(
            weights.get(m, 0.0) * min(1.0, r / factors.get(m, 1.0)) for m, r in ratios.items()
        )
        least = min((r / factors.get(m, 1.0) for m, r in ratios.items()), default=float("inf"))
        return served, least

    def _model_ratios(self, now: float) -> dict[str, float]:
        return self._ratios_of(self._placement_now(), now)

    def _placement_now(self) -> dict[str, dict[str, frozenset[Stage]]]:
        return {
            info.device_id: dict(self.graph.placement(info.device_id))
            for info in self.graph.devices()
        }

    def snapshot(self, now: float) -> MonitorSnapshot:
        """The monitor's snapshot of the current plan, queue and devices."""
        placement = self._placement_now()
        speeds = {info.device_id: info.speed for info in self.graph.devices()}
        free = {
            d: self.devices[d].info.memory_bytes - self.weights_on(d)
            for d in placement
            if d in self.devices
        }
        inflight = {d: len(self.devices[d].inflight) for d in placement if d in self.devices}
        queue = [(r.spec.model, r.spec.arrival) for r in self.waiting.values()]
        snap = self.monitor.snapshot(
            now,
            self.cost,
            self.models,
            placement,
            speeds,
            model_ratio=self._ratios_of(placement, now),
            queue=queue,
            free_memory=free,
            inflight=inflight,
            efficiency=self.tconfig.efficiency,
        )
        self.last_snapshot = snap
        return snap

    def observe(self, event: Event, now: float, out: list[Command]) -> None:
        if isinstance(event, RequestArrived):
            self.monitor.record_arrival(now, event.request.model, event.request.shape)
        elif isinstance(event, TaskFinished):
            task = self.tasks.get(event.task_id)
            if task is not None:
                k = len(task.cmd.devices)
                busy = event.load_seconds + event.transfer_seconds
                for s, secs in event.stage_seconds.items():
                    # Only the leader runs encode/decode; diffuse runs on all k.
                    self.monitor.record_stage(
                        task.cmd.model, s, float(secs), now, degree=k if s == "diffuse" else 1
                    )
                    busy += float(secs)
                self.monitor.record_busy(now, task.cmd.devices, busy)
        c = self.tconfig
        if not c.dynamic_placement or not isinstance(event, (Tick, RequestArrived)):
            return
        if now - self._last_check < c.replan_interval_s or not self.graph.devices():
            return
        self._last_check = now
        self.maybe_replan(now, out)

    def maybe_replan(self, now: float, out: list[Command]) -> bool:
        """One trigger check; re-plan and apply when the trigger fires and the new plan
        is predicted to gain ``min_gain``. Returns whether the plan changed."""
        snap = self.snapshot(now)
        decision = self.trigger.check(snap, now)
        if decision is None:
            return False
        res = self._orchestrate(now)
        placement = res.stages()
        before_r = snap.model_ratio
        after_r = self._ratios_of(placement, now)
        before = min(before_r.values(), default=float("inf"))
        after = min(after_r.values(), default=float("inf"))
        why: dict[str, object] = {
            "trigger": decision.to_log(),
            "ratio_before": round(before, 4) if before != float("inf") else None,
            "ratio_after": round(after, 4) if after != float("inf") else None,
        }
        if self.tconfig.objective == "served":
            sb, lb = self._served_of(before_r, now)
            sa, la = self._served_of(after_r, now)
            applied = self.trigger.worth_it_served(sb, sa, lb, la)
            why["served_before"] = round(sb, 4)
            why["served_after"] = round(sa, 4)
            gain = f"served {sb:.3f} -> {sa:.3f}"
        else:
            applied = self.trigger.worth_it(before, after)
            gain = f"least ratio {before:.3f} -> {after:.3f}"
        why.update(
            {
                "solver": res.solver,
                "solve_ms": round(res.ms, 2),
                "monitor": snap.summary(),
            }
        )
        changed = 0
        if applied:
            self._last_placement = res
            self._base = dict(res.plan)
            changed = self.apply_placement(
                placement,
                now,
                out,
                reason=f"{decision.describe()}; {gain}",
                why=why,
            )
        else:
            out.append(
                LogEvent(
                    "placement.kept",
                    {
                        "policy": self.name,
                        "reason": f"{decision.describe()}; predicted {gain}: not worth "
                        "moving (below the minimum gain, or the current plan is satisfied)",
                        **why,
                    },
                )
            )
        self.trigger.attempted(now, applied, snap.mix)
        return changed > 0

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
        items = self._batched(items, views, now)
        members = {i.request_id: i.members for i in items if i.members}
        res = self.dispatcher.solve(items, views, now, self.clock)
        for a in res.assignments:
            reqs = [
                r
                for rid in members.get(a.request_id, (a.request_id,))
                if (r := self.requests.get(rid)) is not None and r.task_id is None
            ]
            if len(reqs) > 1:
                out.append(self.issue_batch(reqs, a.stages, a.devices, now, a.task_end))
                out.append(
                    LogEvent(
                        "dispatch.batched",
                        {
                            "request_ids": [r.request_id for r in reqs],
                            "stages": list(a.stages),
                            "devices": list(a.devices),
                        },
                    )
                )
            elif reqs:
                out.append(self.issue(reqs[0], a.stages, a.devices, now, a.task_end))
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

    def _batched(
        self, items: list[QueueItem], views: list[DeviceView], now: float
    ) -> list[QueueItem]:
        """The queue with same-shape small image requests merged into batches where
        requests outnumber the devices free to start them (trident.sched.batching)."""
        if self.batching.max_batch < 2 or len(items) < 2:
            return items
        keys = self._batch_keys
        if len(keys) > 2 * len(self.requests) + 256:  # forget ended requests
            for rid in [r for r in keys if r not in self.requests]:
                del keys[rid]
        for it in items:
            if it.request_id not in keys:
                req = self.requests[it.request_id]
                keys[it.request_id] = batch_key(req.spec, self.models.get(req.spec.model))
        idle: dict[str, int] = {}
        free_at: dict[str, float] = {}
        for v in views:
            if not v.available:
                continue
            for m, st in v.holds.items():
                if "diffuse" in st:
                    free_at[m] = min(free_at.get(m, v.free_at), v.free_at)
                    if v.free_at <= now:
                        idle[m] = idle.get(m, 0) + 1
        return form_batches(items, keys, idle, self.cost, self.batching, now, free_at)


class TridentStaticPolicy(TridentPolicy):
    """``trident-static``: Trident's dispatcher (load-aware) and adjust-on-dispatch for
    a stage with no device at all, but the placement is planned once — for the trace's
    first window (``static_plan_after_s`` after the first arrival, default ``window_s``)
    — and then frozen: no trigger, no re-planning."""

    name = "trident-static"

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        cost: CostModel,
        config: TridentConfig | None = None,
    ) -> None:
        cfg = config or TridentConfig()
        cfg.dynamic_placement = False
        super().__init__(models, cost, cfg)
        self.frozen = False

    def observe(self, event: Event, now: float, out: list[Command]) -> None:
        super().observe(event, now, out)
        first = self.monitor.first_arrival
        if self.frozen or first is None or not self.graph.devices():
            return
        after = self.tconfig.static_plan_after_s
        if now < first + (self.tconfig.window_s if after is None else after):
            return
        self.frozen = True
        snap = self.snapshot(now)
        self.apply_placement(
            self.compute_placement(now),
            now,
            out,
            reason="static: the plan for the first window, frozen",
            why={"monitor": snap.summary()},
        )


# --------------------------------------------------------------------------- factory


def config_keys(name: str) -> tuple[str, ...]:
    """The config keys ``make_policy(name, ..., **config)`` accepts."""
    from trident.sched import baselines

    cls: dict[str, type[Any]] = {
        "trident": TridentConfig,
        "trident-static": TridentConfig,
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
    """A policy by name: ``trident`` (default), ``trident-static``, ``b1``, ``b4``,
    ``b6``, ``authors``, ``fifo``. Unknown config keys raise ``TypeError`` (see :func:`config_keys`)."""
    from trident.sched import baselines

    name = (name or "trident").lower()
    if name == "trident":
        return TridentPolicy(models, cost, TridentConfig(**config))
    if name == "trident-static":
        return TridentStaticPolicy(models, cost, TridentConfig(**config))
    if name == "fifo":
        return FifoPolicy(models, cost, CoreConfig(**config))
    classes: dict[str, tuple[type[Any], type[Any]]] = {
        "b1": (baselines.StaticFifoPolicy, baselines.StaticFifoConfig),
        "b4": (baselines.PipelineSrtfPolicy, baselines.BaselineConfig),
        "b6": (baselines.StageSrtfPolicy, baselines.StageSplitConfig),
        "authors": (baselines.AuthorsPolicy, baselines.AuthorsConfig),
    }
    if name not in classes:
        raise ValueError(
            f"unknown policy {name!r}; known: trident, trident-static, b1, b4, b6, authors, fifo"
        )
    pcls, ccls = classes[name]
    policy: Policy = pcls(models, cost, ccls(**config))
    return policy
