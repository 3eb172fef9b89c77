"""Trident's own policies and their configuration.

- :class:`TridentPolicy` (``trident``): MIP placement (:mod:`trident.sched.orchestrator`)
  re-planned when the trigger fires (:mod:`trident.sched.trigger` on the
  :mod:`trident.sched.monitor` snapshot: stage/model imbalance, mix drift; hysteresis),
  MIP dispatch with greedy fallback (:mod:`trident.sched.dispatcher`), load-aware, with
  batching of small same-shape image requests (:mod:`trident.sched.batching`).
- :class:`TridentStaticPolicy` (``trident-static``): the same, with the placement
  planned once for the first window and then frozen.
- :class:`TridentConfig`: their configuration, one typed section per part
  (``core``, ``dispatch``, ``placement``, ``batching``, ``trigger``, ``monitor``) plus
  the policy's own settings; :data:`TridentConfig.ALIASES` maps the flat option names
  of the docs (``dispatch_max_nodes``, ``max_batch``, ``shed_late_margin_s``, ...) onto
  the sections (parsed by :mod:`trident.sched.options`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from trident.sched.batching import BatchConfig, batch_key, form_batches
from trident.sched.core import CoreConfig
from trident.sched.cost import model_peak_bytes, model_weight_bytes, supported_degrees
from trident.sched.dispatcher import DeviceView, DispatchConfig, Dispatcher, QueueItem
from trident.sched.graph import placement_type
from trident.sched.monitor import Monitor, MonitorConfig, MonitorSnapshot, mix_of
from trident.sched.orchestrator import (
    OrchestratorConfig,
    PlacementResult,
    model_capacity_ratio,
    orchestrate,
    requirement_factors,
    served_weights,
    type_load_seconds,
)
from trident.sched.placed import PlacedPolicy, Placement, core_aliases
from trident.sched.preempt import PreemptConfig, plan_preemptions
from trident.sched.trigger import ReplanTrigger, TriggerConfig
from trident.sched.types import (
    STAGES,
    Command,
    CostModel,
    Event,
    LogEvent,
    ModelInfo,
    RequestArrived,
    Shape,
    Stage,
    TaskFinished,
    Tick,
    UnloadStage,
)
from trident.sched.widen import plan_widening, resume_widened, widen_reserved

__all__ = ["TridentConfig", "TridentPolicy", "TridentStaticPolicy"]

# An idle device a waiting request could be re-homed to: (device, the stages it would
# hold for the model, the stages it unloads, seconds to load what it lacks).
_RehomeOption = tuple[DeviceView, frozenset[Stage], list[tuple[str, Stage]], float]


@dataclass
class TridentConfig:
    """Trident's configuration: the sections are the parts' own config dataclasses
    (with Trident's defaults), the rest is the policy's own. Options by name:
    :func:`trident.sched.registry.parse_policy_options`."""

    core: CoreConfig = field(default_factory=CoreConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    placement: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    # 180 s, not MonitorConfig's 60 s: on four pipelines sharing 128 devices a 60 s
    # window holds ~8 cogvideox and ~10 hunyuanvideo arrivals, and the plan swung by
    # dozens of devices every 30 s (SLO 0.873 -> 0.919 with 180 s; bench/sim.md).
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig(window_s=180.0))
    # predicted completion pays load_seconds(source) for weights not yet loaded
    load_cost: bool = True
    replan_interval_s: float = 5.0  # trigger check period
    dynamic_placement: bool = True  # False: the first plan (devices joined) is kept
    # trident-static: plan once, this long after the first arrival (None: window_s)
    static_plan_after_s: float | None = None
    log_empty_rounds: bool = False  # log dispatch.solved for rounds with nothing to solve
    # Adjust on dispatch may give a backlogged shape that few groups fit further groups,
    # up to this share of the devices per degree (PlacedPolicy.ensure_homes).
    extra_home_share: float = PlacedPolicy.extra_home_share
    # Work conservation: an idle device holding nothing any waiting request can use is
    # re-homed to a waiting request's model when that request would otherwise wait
    # longer than this (and than twice the load) for a device of its own.
    rehome_idle: bool = True
    rehome_min_wait_s: float = 10.0
    # ... and only a device idle this long (a device between two bursts of its own
    # model's work is not idle in that sense).
    rehome_idle_s: float = 10.0
    # ... looked for at most this often (the idle and wait thresholds above are 10 s;
    # searching every round was a fifth of the policy's time on four pipelines).
    rehome_every_s: float = 1.0
    # Step-level preemption (trident.sched.preempt; docs/planner.md "Preemption").
    preempt: PreemptConfig = field(default_factory=PreemptConfig)

    # Flat option names (docs/planner.md; the historical flat TridentConfig) -> the
    # section fields they set. ``section.field`` reaches every other setting.
    ALIASES: ClassVar[Mapping[str, tuple[str, ...]]] = {
        **core_aliases(),
        "efficiency": ("core.efficiency", "dispatch.efficiency", "placement.efficiency"),
        # dispatcher
        "solver": ("dispatch.solver",),
        "dispatch_max_nodes": ("dispatch.max_nodes",),
        "dispatch_max_requests": ("dispatch.max_requests",),
        "groups_per_degree": ("dispatch.groups_per_degree",),
        "lookahead_s": ("dispatch.lookahead_s",),
        "use_mip": ("dispatch.use_mip",),
        "relax_when_idle": ("dispatch.relax_when_idle",),
        "wait_for_on_time": ("dispatch.wait_for_on_time",),
        # batching
        "max_batch": ("batching.max_batch",),
        "batch_min_gain": ("batching.min_gain",),
        # orchestrator
        "placement_solver": ("placement.solver",),
        "placement_max_nodes": ("placement.max_nodes",),
        "move_penalty": ("placement.move_penalty",),
        "move_horizon_s": ("placement.move_horizon_s",),
        "load_weight": ("placement.load_weight",),
        "objective": ("placement.objective",),
        "rho_max": ("placement.rho_max",),
        "degree_headroom": ("placement.degree_headroom",),
        "secondary_weight": ("placement.secondary_weight",),
        "bind_aux": ("placement.bind_aux",),
        # monitor
        "window_s": ("monitor.window_s",),
        "min_model_arrivals": ("monitor.min_model_arrivals",),
        "max_window_s": ("monitor.max_window_s",),
        "imbalance": ("trigger.imbalance", "monitor.imbalance"),
        # trigger
        "drift": ("trigger.drift",),
        "confirm_checks": ("trigger.confirm_checks",),
        "min_replan_interval_s": ("trigger.min_interval_s",),
        "min_gain": ("trigger.min_gain",),
        "satisfied_ratio": ("trigger.satisfied_ratio",),
        "min_served_gain": ("trigger.min_served_gain",),
        "min_arrivals": ("trigger.min_arrivals",),
        # preemption
        "preempt": ("preempt.enabled",),
        "max_preemptions": ("preempt.max_preemptions",),
    }


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
        # Its own copy: the caller's object (and its sections) is never written to.
        self.tconfig = copy.deepcopy(config) if config is not None else TridentConfig()
        c = self.tconfig
        super().__init__(models, cost, c.core)
        self.extra_home_share = c.extra_home_share
        self.dispatcher = Dispatcher(cost, c.dispatch)
        self.monitor = Monitor(**dataclasses.asdict(c.monitor))
        self.trigger = ReplanTrigger(c.trigger)
        self._last_check = -float("inf")
        self._base: dict[str, tuple[str, str] | None] = {}
        self._load_s: dict[tuple[str, Stage, str], float] = {}
        self.last_snapshot: MonitorSnapshot | None = None
        self.batching: BatchConfig = c.batching
        self._batch_keys: dict[str, Hashable | None] = {}  # request id -> batch_key
        self._idle_since: dict[str, float] = {}  # device id -> first seen idle (re-homing)
        # request id -> (next stage, steps done, seconds alone, degree): preemption's
        # urgency filter looks at every waiting request each round (trident.sched.preempt)
        self._alone_memo: dict[str, tuple[int, int, float, int]] = {}
        # request id -> the wider group a pausing diffuse resumes on (trident.sched.widen)
        self._widen: dict[str, tuple[str, ...]] = {}
        self._rehome_next = -math.inf  # when re-homing looks again (rehome_every_s)
        # (key, reserve, protected models): _monitor_figures' cache.
        self._figures: tuple[tuple[int, float, int], dict[str, int], frozenset[str]] | None
        self._figures = None

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
        source = self.load_sources()
        for v in views:
            st = self.devices[v.device_id]
            loads: dict[tuple[str, Stage], float] = {}
            for m, stages in v.holds.items():
                if m not in self.models:
                    continue
                for s in stages:
                    if (m, s) in st.holds:
                        continue
                    loads[m, s] = self._load_seconds(m, s, source(v.device_id, m, s))
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
        return self.tconfig.placement

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
        demand = self.monitor.demand(self.cost, self.models, now, self.config.efficiency)
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
        return mix_of(self.monitor.demand(self.cost, self.models, now, self.config.efficiency))

    def _ratios_of(
        self, placement: Mapping[str, Mapping[str, frozenset[Stage]]], now: float
    ) -> dict[str, float]:
        """Per model with demand: the plan's capacity/demand (exact fluid LP), counting
        every up device that holds the model fully for its type there."""
        demand = self.monitor.demand(self.cost, self.models, now, self.config.efficiency)
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
            out[m] = model_capacity_ratio(types, dem, self.tconfig.placement.bind_aux)
        return out

    def _served_of(self, ratios: Mapping[str, float], now: float) -> tuple[float, float]:
        """(served, least capacity/requirement) of a plan's per-model capacity/demand
        ratios under the window's demand (the orchestrator's served objective)."""
        p = self.tconfig.placement
        demand = self.monitor.demand(self.cost, self.models, now, self.config.efficiency)
        shapes = self.monitor.shapes(now)
        factors = requirement_factors(
            self.cost, self.models, demand, shapes, p.rho_max, p.degree_headroom, p.efficiency
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
            efficiency=self.config.efficiency,
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
        if self.tconfig.placement.objective == "served":
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
        pcfg = self.tconfig.preempt
        if self._widen:
            out.extend(resume_widened(self, now, pcfg))
        if not self.waiting:
            if pcfg.widen and pcfg.enabled and self.tasks:
                out.extend(plan_widening(self, now, pcfg, self._held_devices()))
            return out
        views = self.device_views(now)
        if not views:
            return out
        if self._widen:
            reserved = widen_reserved(self)
            for v in views:
                if v.device_id in reserved:
                    v.available = False
        items = [self.queue_item(r) for r in self.waiting.values()]
        self.ensure_homes(items, views, now, out)
        if self.tconfig.rehome_idle and self._rehome_idle(items, views, now, out):
            views = self.device_views(now)
        by_id = {v.device_id: v for v in views}
        # Decode follows diffuse.
        # (model, shape) with no decode device free this round: issuing only takes
        # devices, so it stays so for the round (under a 3x overload ~20 decodes waited
        # per round, each scanning every device).
        no_decode: set[tuple[str, Shape]] = set()
        for it in sorted((i for i in items if i.next_stage == "decode"), key=lambda i: i.deadline):
            if (it.model, it.shape) in no_decode:
                continue
            a = self.dispatcher.follow_decode(it, views, now)
            if a is None:
                no_decode.add((it.model, it.shape))
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
        out.extend(plan_preemptions(self, now, pcfg))
        if pcfg.widen and pcfg.enabled:
            out.extend(plan_widening(self, now, pcfg, self._held_devices()))
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

    def _held_devices(self) -> dict[str, str]:
        """Device -> the request the dispatcher holds it for."""
        return {d: rid for rid, (grp, _) in self.dispatcher._held.items() for d in grp}

    def extra_home_protected(self, now: float) -> frozenset[str]:
        """Every model with arrivals in the monitor's window. With several models
        sharing the cluster, further homes for one model's backlog (adjust on
        dispatch) are off: on four pipelines on 128 devices they put hunyuanvideo on
        sd3's devices for minutes while sd3's 2-5 s deadlines passed, and re-made
        cogvideox ⟨D⟩ groups after every re-plan (SLO 0.777 with them, 0.872 without,
        bench/sim.md "Four pipelines"). Moving capacity between models is the
        orchestrator's job, idle devices are :meth:`_rehome_idle`'s. A single model's
        backlog (hunyuanvideo 720x1280x129, few groups fit) still gets them."""
        return self._monitor_figures(now)[1]

    def _monitor_figures(self, now: float) -> tuple[dict[str, int], frozenset[str]]:
        """The per-round figures taken from the monitor: each arriving model's diffuse
        reserve (:meth:`_diffuse_reserve`) and the models with arrivals
        (:meth:`extra_home_protected`). Cached by what they depend on: the arrivals
        the monitor holds and the time, in 5 s steps (they trim and age slowly).
        Recomputing them every round was 38% of the policy's time on four pipelines
        with a 180 s window."""
        arr = self.monitor.arrivals
        key = (len(arr), arr[-1][0] if arr else -1.0, int(now // 5.0))
        if self._figures is not None and self._figures[0] == key:
            return self._figures[1], self._figures[2]
        rho = min(1.0, max(1e-3, self.tconfig.placement.rho_max))
        demand = self.monitor.demand(self.cost, self.models, now, self.config.efficiency)
        rates = self.monitor.rates(now)
        last: dict[str, float] = {}
        for t, m, _ in arr:
            last[m] = t
        reserve: dict[str, int] = {}
        for m, st in demand.items():
            work = st.get("diffuse", 0.0)
            rate = rates.get(m, 0.0)
            # A model whose arrivals stopped (no arrival for three of its mean gaps) is
            # not reserved for: its window still counts the traffic that has ended.
            if work <= 0 or rate <= 0 or now - last.get(m, -math.inf) > 3.0 / rate:
                continue
            reserve[m] = max(1, math.ceil(work / rho) + 1)
        protected = frozenset(m for m, r in rates.items() if r > 0)
        self._figures = (key, reserve, protected)
        return reserve, protected

    def _rehome_idle(
        self, items: list[QueueItem], views: list[DeviceView], now: float, out: list[Command]
    ) -> bool:
        """Work conservation. The placement plan follows the monitor's windowed demand,
        which lags a shift (a burst of video after a run of images): a device can sit
        idle holding what nobody waits for, or holding a waiting model's diffuse but not
        its encode, while that model's requests queue for their few full homes. For
        the most urgent waiting requests that would otherwise wait longer than
        ``rehome_min_wait_s`` (and twice the load) for their next stage, an idle device
        is given the stages they need: one that already holds the model's diffuse
        first (the least to load), else one holding nothing waiting requests need.
        Only stages nobody waits for are unloaded. Returns whether the plan changed."""
        cost = self.cost
        waiting = [
            it
            for it in items
            if it.next_stage in ("encode", "diffuse")
            and (r := self.requests.get(it.request_id)) is not None
            and r.task_id is None
        ]
        if not waiting:
            return False
        # What waiting requests need a device for: a model's diffuse (and its encode
        # first, where not done yet), or its decode.
        needs_diffuse = {it.model for it in waiting}
        needs_decode = {it.model for it in items if it.next_stage == "decode"}
        busy_models = needs_diffuse | needs_decode

        def keeps(m: str, s: Stage) -> bool:
            """A stage some waiting request needs from this device."""
            return (s == "diffuse" and m in needs_diffuse) or (s == "decode" and m in needs_decode)

        idle: list[DeviceView] = []
        since = self._idle_since
        for v in sorted(views, key=lambda v: v.device_id):
            st = self.devices.get(v.device_id)
            if v.available and v.free_at <= now and st is not None and not st.inflight:
                if now - since.setdefault(v.device_id, now) >= self.tconfig.rehome_idle_s:
                    idle.append(v)
            else:
                since.pop(v.device_id, None)
        if not idle or now < self._rehome_next:
            return False
        self._rehome_next = now + self.tconfig.rehome_every_s
        # Each (model, stage)'s homes by when they free up; a waiting request's turn is
        # its place in its model's deadline order.
        homes: dict[tuple[str, Stage], list[float]] = {}
        for v in views:
            for m, held in v.holds.items():
                for s in held:
                    homes.setdefault((m, s), []).append(v.free_at)
        for fs in homes.values():
            fs.sort()

        def start_of(key: tuple[str, Stage], p: int, service: float) -> float:
            fs = homes.get(key)
            if not fs:
                return float("inf")
            return fs[p % len(fs)] + (p // len(fs)) * service

        # Per idle device, the models whose stages there some waiting request needs:
        # a device is offered only to a model no other waiting model competes with.
        # A model's last diffuse home is kept too: the plan reserved it (a rare, long
        # model's only group), and taking it makes the next request of that model wait
        # for a load somewhere else (the step trace's phase 1 lost 1.3-2.9 points).
        # More generally, a model keeps as many diffuse homes as its own windowed
        # traffic needs (``_diffuse_reserve``): sd3's devices sit idle between its
        # short requests, and re-homing them to video left its 2 s deadlines queueing
        # (four pipelines: 68 of 149 sd3 256x256 late).
        dif_homes = {m: len(fs) for (m, s), fs in homes.items() if s == "diffuse"}
        reserve = self._diffuse_reserve(now)
        kept = {
            v.device_id: {
                m
                for m, held in v.holds.items()
                for s in held
                if keeps(m, s) or (s == "diffuse" and dif_homes.get(m, 0) <= reserve.get(m, 1))
            }
            for v in idle
        }
        idle_ids = {v.device_id for v in idle}
        source = self.load_sources()
        options: dict[tuple[str, tuple[Stage, ...], int], list[_RehomeOption]] = {}
        turn: dict[str, int] = {}
        changed = False
        for it in sorted(waiting, key=lambda i: (i.deadline, i.arrival, i.request_id)):
            if not idle_ids:
                break
            info = self.models.get(it.model)
            if info is None or not homes.get((it.model, "diffuse")):
                continue  # no home at all: ensure_homes' job
            p = turn.get(it.model, 0)
            turn[it.model] = p + 1
            need: list[Stage] = [s for s in STAGES if s != "encode" or it.next_stage == "encode"]
            service = sum(cost.stage_seconds(info.family, s, it.shape, 1) for s in need)
            wait = max(start_of((it.model, s), p, service) for s in need if s != "decode") - now
            if wait <= self.tconfig.rehome_min_wait_s:
                continue
            if 1 not in supported_degrees(cost, info.family, it.shape, info.max_degree):
                continue  # a shape that needs a group: the orchestrator's job
            peak = max(model_peak_bytes(cost, info, s, it.shape) for s in need)
            key = (it.model, tuple(need), peak)
            if key not in options:
                options[key] = self._rehome_options(
                    idle, it.model, need, peak, busy_models, kept, source
                )
            pick = next(
                (o for o in options[key] if o[0].device_id in idle_ids and wait > 2.0 * o[3]),
                None,
            )
            if pick is not None:
                v, stages, evict, load = pick
                evicted = [f"{v.device_id}:{m}:{s}" for m, s in evict]
                for m, s in evict:
                    out.append(UnloadStage(v.device_id, m, s))
                    left = self.graph.placement(v.device_id).get(m, frozenset()) - {s}
                    self.graph.set_placement(v.device_id, m, left)
                self.graph.set_placement(v.device_id, it.model, stages)
                self._base[v.device_id] = (it.model, placement_type(stages))
                out.append(
                    LogEvent(
                        "placement.rehomed",
                        {
                            "policy": self.name,
                            "model": it.model,
                            "stages": sorted(stages),
                            "device": v.device_id,
                            "evicted": evicted,
                            "request_id": it.request_id,
                            "predicted_wait_s": round(wait, 2),
                            "load_s": round(load, 2),
                            "reason": "an idle device while a request waits for its stages",
                        },
                    )
                )
                idle_ids.discard(v.device_id)
                for m, ev in evict:
                    if ev == "diffuse" and m in dif_homes:
                        dif_homes[m] -= 1
                        if dif_homes[m] <= reserve.get(m, 1):  # its reserve: not offered
                            for o in idle:
                                if "diffuse" in o.holds.get(m, frozenset()):
                                    kept[o.device_id].add(m)
                            options.clear()
                # Later requests of this model see the new home (free once loaded).
                for s in stages:
                    homes.setdefault((it.model, s), []).append(now + load)
                    homes[it.model, s].sort()
                changed = True
        return changed

    def _diffuse_reserve(self, now: float) -> dict[str, int]:
        """Per model with windowed demand: the diffuse homes its own traffic needs —
        its diffuse device-seconds per second over ``rho_max`` (the utilisation a 2.5x
        SLO tolerates), plus one, at least 1, for a model still arriving. Re-homing
        never takes a model below it (below one diffuse home for the rest)."""
        return self._monitor_figures(now)[0]

    def _rehome_options(
        self,
        idle: list[DeviceView],
        model: str,
        need: list[Stage],
        peak: int,
        busy_models: set[str],
        kept: Mapping[str, set[str]],
        source: Callable[[str, str, Stage], str],
    ) -> list[_RehomeOption]:
        """The idle devices that could take ``need`` of ``model`` (with room for
        ``peak``), in order of preference: holding its diffuse already first, then by
        id; each with the stages it would hold, what it unloads and the load time."""
        out: list[_RehomeOption] = []
        for v in sorted(
            (v for v in idle if kept[v.device_id] <= {model}),
            key=lambda v: ("diffuse" not in v.holds.get(model, frozenset()), v.device_id),
        ):
            held = v.holds.get(model, frozenset())
            if v.free_memory >= peak and all(s in held for s in need):
                continue  # holds it all, with room: idle for the dispatcher's reasons
            plan = self._rehome_plan(v, model, need, peak, busy_models)
            if plan is None:
                continue
            stages, evict = plan
            added = [s for s in STAGES if s in stages and s not in held]  # fixed order: sums
            if not added and not evict:
                continue
            load = sum(self._load_seconds(model, s, source(v.device_id, model, s)) for s in added)
            out.append((v, stages, evict, load))
        return out

    def _rehome_plan(
        self,
        v: DeviceView,
        model: str,
        need: list[Stage],
        peak: int,
        busy_models: set[str],
    ) -> tuple[frozenset[Stage], list[tuple[str, Stage]]] | None:
        """The stages ``v`` would hold for ``model`` (the whole pipeline when it fits
        beside the peak activation, else diffuse alone) and the other models' stages to
        unload for room: models nobody waits for first, biggest first. None: no fit."""
        cost = self.cost
        info = self.models[model]
        mem = self.graph.info(v.device_id).memory_bytes
        held = frozenset(v.holds.get(model, frozenset()))
        others: list[tuple[str, Stage]] = [
            (m, s)
            for m, st in sorted(v.holds.items())
            if m != model and m in self.models
            for s in sorted(st)
        ]
        size = {ms: model_weight_bytes(cost, self.models[ms[0]], ms[1]) for ms in others}
        others.sort(key=lambda ms: (ms[0] in busy_models, -size[ms], ms))
        whole: frozenset[Stage] = frozenset([*need, *held])
        alone: frozenset[Stage] = frozenset(["diffuse", *held])
        for want in (whole, alone):
            free = mem - sum(model_weight_bytes(cost, info, s) for s in want)
            free -= sum(size.values())
            evict: list[tuple[str, Stage]] = []
            for ms in others:
                # The device moves to ``model``: what nobody waits for goes (a second
                # model left beside it would cramp both, e.g. their batches' room);
                # waiting models' stages only for room.
                if free >= peak and ms[0] in busy_models:
                    break
                evict.append(ms)
                free += size[ms]
            if free >= peak:
                return want, evict
        return None

    def _batched(
        self, items: list[QueueItem], views: list[DeviceView], now: float
    ) -> list[QueueItem]:
        """The queue with same-shape small image requests merged into batches where
        requests outnumber the devices free to start them (trident.sched.batching)."""
        if self.batching.max_batch < 2 or len(items) < 2:
            return items
        keys = self._batch_keys
        self.forget_ended(keys)
        for it in items:
            if it.request_id not in keys:
                req = self.requests[it.request_id]
                keys[it.request_id] = batch_key(req.spec, self.models.get(req.spec.model))
        idle: dict[str, int] = {}
        free_at: dict[str, float] = {}
        room: dict[str, int] = {}
        for v in views:
            for m, st in v.holds.items():
                if "diffuse" in st:
                    room[m] = max(room.get(m, 0), v.free_memory)
            if not v.available:
                continue
            for m, st in v.holds.items():
                if "diffuse" in st:
                    free_at[m] = min(free_at.get(m, v.free_at), v.free_at)
                    if v.free_at <= now:
                        idle[m] = idle.get(m, 0) + 1
        if any(it.diffuse_fraction < 1.0 for it in items):
            # A paused diffuse resumes alone (its input is chunk state).
            keys = {**keys, **{it.request_id: None for it in items if it.diffuse_fraction < 1}}
        return form_batches(items, keys, idle, self.cost, self.batching, now, free_at, room)


class TridentNoPreemptPolicy(TridentPolicy):
    """``trident-np``: Trident without step-level preemption (a running diffuse always
    runs to its end), beside ``trident`` in the benchmarks so the gain is visible."""

    name = "trident-np"

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        cost: CostModel,
        config: TridentConfig | None = None,
    ) -> None:
        cfg = config if config is not None else TridentConfig()
        off = dataclasses.replace(cfg.preempt, enabled=False)
        super().__init__(models, cost, dataclasses.replace(cfg, preempt=off))


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
        # A copy with dynamic placement off; the caller's config is left as it was.
        cfg = config if config is not None else TridentConfig()
        super().__init__(models, cost, dataclasses.replace(cfg, dynamic_placement=False))
        self.frozen = False

    def observe(self, event: Event, now: float, out: list[Command]) -> None:
        super().observe(event, now, out)
        first = self.monitor.first_arrival
        if self.frozen or first is None or not self.graph.devices():
            return
        after = self.tconfig.static_plan_after_s
        if now < first + (self.tconfig.monitor.window_s if after is None else after):
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
