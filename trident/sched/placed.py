"""Placement plumbing shared by Trident and the baselines: :class:`PlacedPolicy`.

A :class:`PlacedPolicy` is a :class:`~trident.sched.core.SchedulerCore` (request
lifecycle, kept outputs, retries, admission) that also *holds a placement* — which
stages each device holds — in a :class:`~trident.sched.graph.ClusterGraph`. It emits
``LoadStage`` for its initial placement when devices join (so the simulator accounts
memory and load time) and ``LoadStage``/``UnloadStage`` when the placement changes;
fails at once the requests that fit no device (:meth:`PlacedPolicy.memory_misfit`);
and *adjusts on dispatch* (:meth:`PlacedPolicy.ensure_homes`): a stage a waiting
request needs that no device holds is added to the plan of the group that can take it
with the least harm. Subclasses say where the plan comes from
(:meth:`~PlacedPolicy.compute_placement`) and how requests are dispatched
(:meth:`~trident.sched.core.SchedulerCore.plan`): :mod:`trident.sched.tridentpolicy`,
:mod:`trident.sched.baselines`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from trident.sched.core import CoreConfig, RequestState, SchedulerCore
from trident.sched.cost import (
    activation_scale,
    efficient_degrees,
    memo_table,
    model_peak_bytes,
    model_weight_bytes,
    supported_degrees,
)
from trident.sched.dispatcher import DeviceView, QueueItem, _aligned
from trident.sched.graph import ClusterGraph, placement_type
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
    RequestSpec,
    Shape,
    Stage,
    UnloadStage,
)

__all__ = ["PlacedPolicy", "Placement", "core_aliases"]

# Core settings that only the core's FIFO reads (a placed policy places and sizes groups
# itself): no flat option of the placed policies.
_FIFO_ONLY = frozenset({"preload", "diffuse_degree"})
_DIFFUSE = STAGES.index("diffuse")


def core_aliases() -> dict[str, tuple[str, ...]]:
    """Flat option names of a placed policy's ``core`` section (``max_queue`` ->
    ``core.max_queue``, ...): every core setting a placed policy reads."""
    return {f.name: (f"core.{f.name}",) for f in fields(CoreConfig) if f.name not in _FIFO_ONLY}


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
        # (plan version and up devices, then ensure_homes' placement figures).
        self._homes_memo: tuple[Any, ...] | None = None
        # request id -> (what its queue item depends on, the item): queue_item's cache.
        self._items: dict[str, tuple[tuple[int, int, float | None, object], QueueItem]] = {}

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
                need, k_best = w + model_peak_bytes(cost, info, s, shape), 1
                if need <= top:
                    continue
            else:
                options: list[tuple[int, int]] = []
                ok = False
                for k in supported_degrees(cost, fam, shape, info.max_degree):
                    need_k = w + model_peak_bytes(cost, info, s, shape, k)
                    best = _best_aligned_memory(per_node, k)
                    if best < 0:
                        continue  # no node has an aligned group of k devices
                    if need_k <= best:
                        ok = True
                        break
                    options.append((need_k, k))
                if ok:
                    continue
                fallback = w + model_peak_bytes(cost, info, s, shape)
                need, k_best = min(options, default=(fallback, 1))
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
        # Figures of the placement alone (what each device holds, its free memory after
        # weights, its node and index): kept from round to round while the plan and the
        # up devices stay the same, reset when this pass changes the plan. Best free
        # memory of a degree-k group holding a model's diffuse stage; most free memory
        # of a device holding (m, s).
        sig = (self.graph.version, tuple(v.device_id for v in views))
        if self._homes_memo is None or self._homes_memo[0] != sig:
            self._homes_memo = (sig, {}, {}, {}, {}, {})
        gfree: dict[tuple[str, int], int] = self._homes_memo[1]
        sfree: dict[tuple[str, Stage], int] = self._homes_memo[2]

        def group_free(m: str, k: int) -> int:
            # The best free memory of an aligned degree-k group holding m's diffuse,
            # from the same groups count_fit counts.
            if (m, k) not in gfree:
                mins = group_mins(m, k)
                gfree[m, k] = max(-1, mins[-1]) if mins else -1
            return gfree[m, k]

        def stage_free(m: str, s: Stage) -> int:
            if (m, s) not in sfree:
                sfree[m, s] = max(
                    (v.free_memory for v in views if s in v.holds.get(m, frozenset())),
                    default=-1,
                )
            return sfree[m, s]

        cfit: dict[tuple[str, int, int], int] = self._homes_memo[3]
        # Likewise: per model, its diffuse holders by node and index; per (model, k),
        # the sorted least free memory of each aligned degree-k group of them (one pass
        # per model and per (m, k), not per (m, k, peak)).
        cnodes: dict[str, dict[str, dict[int, DeviceView]]] = self._homes_memo[4]
        cmins: dict[tuple[str, int], list[int]] = self._homes_memo[5]

        def group_mins(m: str, k: int) -> list[int]:
            mins = cmins.get((m, k))
            if mins is None:
                by_node = cnodes.get(m)
                if by_node is None:
                    by_node = cnodes[m] = {}
                    for v in views:
                        if "diffuse" in v.holds.get(m, frozenset()):
                            by_node.setdefault(v.node_id, {})[v.index] = v
                mins = cmins[m, k] = sorted(
                    min(g.free_memory for g in grp)
                    for idx in by_node.values()
                    for grp in _aligned(idx, k)
                )
            return mins

        def count_fit(m: str, k: int, peak: int) -> int:
            """Aligned degree-k groups holding m's diffuse with room for ``peak``."""
            if (m, k, peak) not in cfit:
                mins = group_mins(m, k)
                cfit[m, k, peak] = len(mins) - bisect_left(mins, peak)
            return cfit[m, k, peak]

        # One pass over the backlog: diffuse demand per (model, shape), and the first
        # request of each (model, shape, next stage) — every later one needs the same
        # stages (the walk below would only skip it), and under overload the backlog is
        # thousands of requests every round.
        backlog: dict[tuple[str, Stage, Shape], int] = {}
        firsts: dict[tuple[str, Shape, int], tuple[QueueItem, tuple[Stage, ...]]] = {}
        for it in items:
            r = self.requests.get(it.request_id)
            if r is None:
                continue
            fk = (it.model, it.shape, r.next_stage)
            if fk not in firsts:
                firsts[fk] = (it, r.pending_stages)
            if r.task_id is None and r.next_stage <= _DIFFUSE:
                bk: tuple[str, Stage, Shape] = (it.model, "diffuse", it.shape)
                backlog[bk] = backlog.get(bk, 0) + 1

        for it, pending in list(firsts.values()):
            info = self.models.get(it.model)
            if info is None:
                continue
            for s in pending:
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
                    peaks = {k: model_peak_bytes(cost, info, s, it.shape, k) for k in ks}
                    extra = False
                    if any(peaks[k] <= group_free(it.model, k) for k in ks):
                        # Homed already. A shape that only few groups fit (e.g. one
                        # homed ⟨D⟩ group) with a backlog gets more groups, up to
                        # ``extra_home_share`` of the devices per degree; as many as it
                        # needs when nothing else waits (devices idle otherwise).
                        need = backlog.get(key, 0)
                        alone = all(bk == key for bk, n in backlog.items() if n > 0)
                        share = len(views) if alone else self.extra_home_share * len(views)
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
                    if model_peak_bytes(cost, info, s, it.shape) <= stage_free(it.model, s):
                        continue
                if extra and self.extra_home_protected(now) - {it.model}:
                    continue  # other models' traffic needs their devices
                if self._home(it.model, s, it.shape, ks, views, out, new_only=extra):
                    changed = True
                    views[:] = self.device_views(now)
                    gfree.clear()
                    sfree.clear()
                    cfit.clear()
                    cnodes.clear()
                    cmins.clear()
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

    def extra_home_protected(self, now: float) -> frozenset[str]:
        """Models with traffic of their own: while any model other than the backlogged
        one is among them, :meth:`ensure_homes` adds no *further* homes (only first
        ones). None here; :class:`TridentPolicy` names every model with recent
        arrivals."""
        return frozenset()

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
            peak = model_peak_bytes(self.cost, info, stage, shape, k)
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
        return self._weights_on(device_id, memo_table(self.cost, "stage_set_weights"))

    def _weights_on(self, device_id: str, memo: dict[Any, Any] | None) -> int:
        # Per (model, stages): (the ModelInfo it was computed for, bytes), memoised on
        # the cost model when it allows (memo_table); a different info is recomputed.
        total = 0
        for m, stages in self.graph.placement(device_id).items():
            info = self.models.get(m)
            if info is None:
                continue
            key = (m, stages)
            try:
                hit = None if memo is None else memo.get(key)
            except TypeError:  # stages not a frozenset: no memo
                memo = None
            if memo is None:
                total += sum(model_weight_bytes(self.cost, info, s) for s in stages)
                continue
            if hit is None or hit[0] is not info:
                hit = memo[key] = (
                    info,
                    sum(model_weight_bytes(self.cost, info, s) for s in stages),
                )
            total += hit[1]
        return total

    def device_views(self, now: float) -> list[DeviceView]:
        limit = self.config.max_inflight_per_device
        memo = memo_table(self.cost, "stage_set_weights")
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
                    free_memory=info.memory_bytes - self._weights_on(info.device_id, memo),
                    holds=dict(self.graph.placement(info.device_id)),
                    available=len(st.inflight) < limit,
                )
            )
        return out

    def forget_ended(self, memo: dict[str, Any]) -> None:
        """Drop the entries of ended requests from a per-request memo, once it holds
        well more than the live ones (amortised: not every round)."""
        if len(memo) > 2 * len(self.requests) + 256:
            for rid in [r for r in memo if r not in self.requests]:
                del memo[rid]

    def queue_item(self, req: RequestState) -> QueueItem:
        """The request as the dispatcher sees it; the same object from round to round
        until its next stage, its kept output, its diffuse progress or its deadline
        changes (the dispatcher keeps per-item figures by identity; building ~3,000
        items every round under overload was a tenth of the policy's time)."""
        sig = (req.next_stage, req.steps_done, req.deadline, req.output)
        got = self._items.get(req.request_id)
        if got is not None and got[0][:3] == sig[:3] and got[0][3] is sig[3]:
            return got[1]
        self.forget_ended(self._items)
        item = self._make_queue_item(req)
        self._items[req.request_id] = (sig, item)
        return item

    def _make_queue_item(self, req: RequestState) -> QueueItem:
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
            diffuse_fraction=req.remaining_diffuse_fraction,
            bytes_scale=activation_scale(info),
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
