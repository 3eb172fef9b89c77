"""The resource-aware dispatcher: which degree and which devices each queued request's
diffuse stage gets, with encode and decode following.

One *round* (:meth:`Dispatcher.solve`) sees a snapshot: the queue (:class:`QueueItem`)
and the devices (:class:`DeviceView`: plan placement, estimated free time, free memory,
whether it can take a task now). It returns :class:`Assignment` s, at most one per
request, each device used at most once per round.

Model (kept small on purpose: on a 2-core machine CBC needed 30 s for a 2,000-binary assignment):

- Window: the ``max_requests`` most urgent waiting requests: those that can still
  make their deadline (at the fastest degree, no queueing) earliest deadline first,
  then the hopeless ones shortest remaining time first. Devices: only those that can
  take a task now and free up within ``lookahead_s``.
- Wait rather than miss: a request whose candidates are all late gets none when some
  group (busy ones included, at its predicted free time) would still complete it on
  time.
- Hold rather than starve: such a waiting request of degree > 1 holds the group it
  waits for, across rounds (at most ``max_holds`` requests): others take its devices
  only for tasks that end before the group frees (backfilling), so a 4- or 8-device
  clip is not kept waiting while degree-1 work refills each device in turn.
- Variables ``x[r, g]`` only for efficient degrees ((t1/tk)/k >= threshold) and
  memory-feasible aligned groups ``g``; per (r, k) only the ``groups_per_degree`` groups
  with the earliest predicted completion.
- Predicted completion counts the group's free time (queueing), encode (on the leader
  if it holds encode, else the earliest-free encode device, plus the embeddings'
  transfer), diffuse at degree k on the slowest member, decode (on the leader if it
  holds decode, else the earliest-free decode device, plus the latents' transfer).
- Objective: sum of rewards — on time: ``on_time_reward`` plus an urgency bonus; late:
  far below (at most ``late_reward``), shortest first, a little aging, never <= 0 —
  minus a cross-node transfer penalty and a small device-seconds penalty (prefer thrifty
  degrees; in a relaxed round — idle devices for every waiting request's largest
  degree — a per-second completion penalty instead: the fastest efficient degree). On-time-ness of each (r, g) is known before the solve (completion is a
  function of the choice), so no big-M constraints are needed.
- Constraints: each request at most once; each device at most once.
- Deterministic budget (``max_nodes`` branch-and-bound nodes, single thread, no clock:
  see :mod:`trident.sched.solver`); warm start from the greedy plan (which keeps the
  last round's choices where still possible); greedy fallback (EDF + thriftiest on-time
  efficient degree, else earliest completion) when the solver stops at the node limit
  with nothing better than it, fails, or python-mip is missing. Rounds that are trivially optimal for
  greedy (no two candidates share a device) skip the solver.

Batches: an item may stand for several same-shape requests that run as one batched
call (formed before the round by :mod:`trident.sched.batching`). Such an item runs at
degree 1; its times are the batched call's (``batch_stage_seconds``: encode and decode
per member, diffuse together), its deadline is its members' earliest, and its reward
counts every member.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from trident.sched.cost import (
    batch_peak_bytes,
    batch_stage_seconds,
    efficient_degrees,
    supported_degrees,
)
from trident.sched.solver import Clock, no_clock, optimize, preload, solver_library
from trident.sched.types import CostModel, Shape, Stage

__all__ = [
    "Assignment",
    "DeviceView",
    "DispatchConfig",
    "DispatchResult",
    "Dispatcher",
    "QueueItem",
    "SolverName",
]

SolverName = Literal["cbc", "highs"]


@dataclass(frozen=True)
class QueueItem:
    """A waiting request whose next stage is ``next_stage``."""

    request_id: str
    model: str
    family: str
    shape: Shape
    arrival: float
    deadline: float
    next_stage: Stage
    input_device: str | None = None  # where the previous stage's output is kept
    max_degree: int = 8
    # A batch: every member's request id (this item's ``request_id`` first); the item's
    # deadline is the earliest member's. Empty for a single request.
    members: tuple[str, ...] = ()
    # Share of the diffuse still to run: below 1 for a paused diffuse that resumes
    # (docs/planner.md "Preemption"); its diffuse times are scaled by it.
    diffuse_fraction: float = 1.0
    # Activation bytes of this model against the cost model's (bfloat16) figures: its
    # dtype's (trident.sched.cost.activation_scale; float32: 2).
    bytes_scale: float = 1.0

    @property
    def size(self) -> int:
        """Requests this item stands for."""
        return max(1, len(self.members))


@dataclass
class DeviceView:
    device_id: str
    node_id: str
    index: int
    speed: float
    free_at: float  # estimated time its queue drains
    free_memory: int  # memory_bytes - weights of the stages its plan puts on it
    holds: Mapping[str, frozenset[Stage]]  # model -> stages (plan)
    available: bool = True  # can take a new task now (in-flight limit)
    # Seconds to load a planned stage's weights before it can run here: (model, stage)
    # -> load_seconds(source) for planned stages that are not resident; absent = 0.
    load_s: Mapping[tuple[str, Stage], float] = field(default_factory=dict)

    def load(self, model: str, stage: Stage) -> float:
        """Seconds before ``stage`` of ``model`` can run here for lack of weights."""
        return self.load_s.get((model, stage), 0.0) if self.load_s else 0.0


@dataclass(frozen=True)
class Assignment:
    request_id: str
    degree: int  # diffuse degree
    group: tuple[str, ...]  # diffuse devices (leader first)
    stages: tuple[Stage, ...]  # the task to issue now
    devices: tuple[str, ...]  # where that task runs
    start: float  # predicted start of the task
    task_end: float  # predicted end of the task
    finish: float  # predicted completion of the request
    on_time: bool
    cross_node: int = 0  # inter-node transfers on the predicted path


@dataclass
class DispatchResult:
    assignments: list[Assignment]
    solver: Literal["mip", "greedy"]
    reason: str  # "optimal", "feasible", "trivial", "node_limit", "error", "no_solver", "empty"
    ms: float
    variables: int = 0
    objective: float = 0.0


@dataclass
class DispatchConfig:
    solver: SolverName = "cbc"
    # Branch-and-bound nodes per solve: a deterministic budget (trident.sched.solver).
    # Past it, the best incumbent if it beats the greedy plan, else the greedy plan.
    max_nodes: int = 200
    max_requests: int = 24
    groups_per_degree: int = 3
    lookahead_s: float = 2.0
    efficiency: float = 0.8
    on_time_reward: float = 1000.0
    drop_late_if_on_time: bool = True
    # Requests of degree > 1 waiting for an on-time group that frees later hold it
    # (at most this many at once): other requests use its devices only for tasks done
    # before it frees; a hold ends when its request is dispatched, becomes hopeless,
    # leaves the queue, or hold_grace_s after the group should have freed.
    max_holds: int = 4
    hold_grace_s: float = 5.0
    late_reward: float = 100.0  # base reward for serving a request that will be late
    cross_node_penalty: float = 5.0  # per inter-node hand-off
    transfer_penalty: float = 1.0  # per hand-off between different devices
    device_seconds_penalty: float = 0.01  # per device-second of diffuse
    # Relaxed rounds (idle devices enough for every waiting request to get a whole
    # node): per second of predicted completion instead of the device-seconds penalty.
    relaxed_finish_penalty: float = 0.1
    relax_when_idle: bool = True  # relaxed rounds allowed at all
    # ... and only while this share of all devices stays idle beyond the whole nodes the
    # waiting requests could take (a busy cluster's next arrivals need them)
    relax_reserve: float = 0.0
    wait_for_on_time: bool = True  # late candidates dropped while an on-time group frees
    use_mip: bool = True


@dataclass
class _Cand:
    item: QueueItem
    k: int
    group: tuple[str, ...]
    stages: tuple[Stage, ...]
    devices: tuple[str, ...]
    start: float
    task_end: float
    finish: float
    on_time: bool
    cross: int
    dev_seconds: float
    weight: float = 0.0
    xfers: int = 0

    def for_item(self, item: QueueItem) -> _Cand:
        """The same option for another item of the same shape and input (unweighed)."""
        c = copy.copy(self)
        c.item = item
        c.weight = 0.0
        return c

    def assignment(self) -> Assignment:
        return Assignment(
            self.item.request_id,
            self.k,
            self.group,
            self.stages,
            self.devices,
            self.start,
            self.task_end,
            self.finish,
            self.on_time,
            self.cross,
        )


@dataclass(frozen=True)
class _ShapeInfo:
    """Cost-model figures of one (family, shape, max degree), cached across rounds."""

    efficient: tuple[int, ...]
    supported: tuple[int, ...]
    diffuse: Mapping[int, tuple[float, int]]  # k -> (seconds, peak bytes)
    enc_t: float
    dec_t: float
    enc_peak: int
    dec_peak: int
    text_b: int
    lat_b: int


def _fitting_degrees(info: _ShapeInfo, group_free: Callable[[int], int]) -> tuple[int, ...]:
    """Degrees offered for a diffuse stage: the efficient ones whose peak activation fits
    some group holding the stage (``group_free(k)``: best free memory of a degree-k
    group); when none does, any supported degree that fits (an inefficient degree beats
    waiting forever). Empty when nothing fits: the policy places the stage elsewhere."""
    fit = tuple(k for k in info.efficient if info.diffuse[k][1] <= group_free(k))
    if fit:
        return fit
    return tuple(
        k for k in info.supported if k not in info.efficient and info.diffuse[k][1] <= group_free(k)
    )


@dataclass
class Dispatcher:
    """Stateless but for the last solution (warm start), a cache of cost-model figures
    per shape (the cost model is immutable) and solver statistics."""

    cost: CostModel
    config: DispatchConfig = field(default_factory=DispatchConfig)
    last: dict[str, tuple[str, ...]] = field(default_factory=dict)
    relaxed: bool = False  # whether the last round was relaxed (see candidates)
    _held: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict, repr=False)
    _queued: set[str] = field(default_factory=set, repr=False)
    _shapes: dict[tuple[str, Shape, int, int, float, float], _ShapeInfo] = field(
        default_factory=dict, repr=False
    )
    # request id -> (queue item, its best_case): items are reused from round to round
    # while their request does not change (PlacedPolicy.queue_item), so is their figure.
    _best: dict[str, tuple[QueueItem, float]] = field(default_factory=dict, repr=False)

    def _shape_info(
        self,
        family: str,
        shape: Shape,
        max_degree: int,
        batch: int = 1,
        fraction: float = 1.0,
        scale: float = 1.0,
    ) -> _ShapeInfo:
        """Figures of one call for ``batch`` requests of ``shape`` (batches: degree 1;
        output bytes are every member's together); ``fraction``: share of the diffuse
        steps still to run (a resumed chunk); ``scale``: the model's activation bytes
        against the family's (its dtype: ``QueueItem.bytes_scale``)."""
        key = (family, shape, max_degree, batch, fraction, scale)
        got = self._shapes.get(key)
        if got is not None:
            return got
        cost = self.cost
        if batch > 1:
            max_degree = 1
        eff = efficient_degrees(cost, family, shape, max_degree, self.config.efficiency)
        sup = supported_degrees(cost, family, shape, max_degree)
        ks = sorted(set(eff) | set(sup))
        got = _ShapeInfo(
            efficient=eff,
            supported=sup,
            diffuse={
                k: (
                    fraction * batch_stage_seconds(cost, family, "diffuse", shape, k, batch),
                    int(scale * batch_peak_bytes(cost, family, "diffuse", shape, k, batch)),
                )
                for k in ks
            },
            enc_t=batch_stage_seconds(cost, family, "encode", shape, 1, batch),
            dec_t=batch_stage_seconds(cost, family, "decode", shape, 1, batch),
            enc_peak=int(scale * batch_peak_bytes(cost, family, "encode", shape, 1, batch)),
            dec_peak=int(scale * batch_peak_bytes(cost, family, "decode", shape, 1, batch)),
            text_b=int(batch * scale * cost.output_bytes(family, "encode", shape)),
            lat_b=batch * cost.output_bytes(family, "diffuse", shape),
        )
        if len(self._shapes) >= 4096:
            self._shapes.clear()
        self._shapes[key] = got
        return got

    # ------------------------------------------------------------------ public

    def solve(
        self,
        items: Sequence[QueueItem],
        devices: Sequence[DeviceView],
        now: float,
        clock: Clock = no_clock,
    ) -> DispatchResult:
        """One dispatch round. ``clock`` only times it for the logs (``res.ms``)."""
        cfg = self.config
        if cfg.use_mip:
            preload(cfg.solver)  # once per process
        t0 = clock()
        dev = {d.device_id: d for d in devices}
        if len(self._best) > 2 * len(items) + 1024:
            self._best.clear()  # ended requests' entries
        queue = [i for i in items if i.next_stage != "decode"]
        # One key per request (its first field is hopeless()), for both uses.
        keyed = [(self.window_key(it, now), n, it) for n, it in enumerate(queue)]
        self._queued = {it.request_id for key, _, it in keyed if key[0] == 0}
        cands = self.candidates(
            _in_window_order(keyed),
            dev,
            now,
            degree_sum=sum(i.max_degree for i in queue),
        )
        if not cands:
            return DispatchResult([], "greedy", "empty", (clock() - t0) * 1e3)
        greedy = self.greedy(cands)
        trivial = self._trivial(cands) if cfg.use_mip else None
        if trivial is not None:
            res = DispatchResult(
                [c.assignment() for c in trivial],
                "greedy",
                "trivial",
                0.0,
                len(cands),
                sum(c.weight for c in trivial),
            )
        elif not cfg.use_mip:
            res = DispatchResult(
                [c.assignment() for c in greedy],
                "greedy",
                "configured",
                0.0,
                len(cands),
                sum(c.weight for c in greedy),
            )
        else:
            res = self._mip(cands, greedy)
        self.last = {a.request_id: a.group for a in res.assignments}
        res.ms = (clock() - t0) * 1e3
        return res

    def best_case(self, item: QueueItem, now: float) -> float:
        """Seconds the request still needs with no queueing at its fastest supported
        degree (a lower bound on its remaining time)."""
        got = self._best.get(item.request_id)
        if got is not None and got[0] is item:
            return got[1]
        info = self._shape_info(
            item.family,
            item.shape,
            item.max_degree,
            item.size,
            item.diffuse_fraction,
            item.bytes_scale,
        )
        dif = min((t for t, _ in info.diffuse.values()), default=0.0)
        best = (info.enc_t if item.next_stage == "encode" else 0.0) + dif + info.dec_t
        self._best[item.request_id] = (item, best)
        return best

    def hopeless(self, item: QueueItem, now: float) -> bool:
        """Whether the request cannot meet its deadline even started now on idle devices
        at its fastest degree."""
        return _past_deadline(item, now + self.best_case(item, now))

    def window_key(self, item: QueueItem, now: float) -> tuple[int, float, float, str]:
        """Window order: requests that can still make their deadline first, earliest
        deadline first; then the hopeless ones, shortest remaining time first."""
        best = self.best_case(item, now)  # once for both (hopeless() is this test)
        if _past_deadline(item, now + best):
            return (1, best, item.arrival, item.request_id)
        return (0, item.deadline, item.arrival, item.request_id)

    def follow_decode(
        self, item: QueueItem, devices: Sequence[DeviceView], now: float
    ) -> Assignment | None:
        """Decode follows diffuse: the input's device if it holds decode, else the
        earliest-completing available decode device."""
        best: tuple[float, DeviceView, int] | None = None
        size = self.cost.output_bytes(item.family, "diffuse", item.shape)
        src = item.input_device
        src_node = next((d.node_id for d in devices if d.device_id == src), None)
        peak = item.bytes_scale * self.cost.stage_peak_bytes(item.family, "decode", item.shape)
        for d in devices:
            if not d.available or "decode" not in d.holds.get(item.model, frozenset()):
                continue
            if peak > d.free_memory:
                continue
            xfer = 0.0
            cross = 0
            if src is not None and src != d.device_id:
                same = src_node == d.node_id
                xfer = self.cost.transfer_seconds(size, same)
                cross = 0 if same else 1
            start = max(now, d.free_at)
            end = (
                start
                + max(xfer, d.load(item.model, "decode"))
                + self.cost.stage_seconds(item.family, "decode", item.shape) / d.speed
            )
            key = end + 1e-6 * cross
            if best is None or key < best[0]:
                best = (key, d, cross)
        if best is None:
            return None
        _, d, cross = best
        start = max(now, d.free_at)
        end = best[0] - 1e-6 * cross
        return Assignment(
            item.request_id,
            1,
            (d.device_id,),
            ("decode",),
            (d.device_id,),
            start,
            end,
            end,
            end <= item.deadline + 1e-9,
            cross,
        )

    # ------------------------------------------------------------------ candidates

    def candidates(
        self,
        window: Iterable[QueueItem],
        dev: Mapping[str, DeviceView],
        now: float,
        degree_sum: int | None = None,
    ) -> list[_Cand]:
        """Candidates for the requests of ``window`` in its order, until
        ``max_requests`` have some. ``degree_sum``: the whole window's Σ max degree (for
        the relaxed test) when ``window`` is a lazy iterator; else it is summed here."""
        cfg = self.config
        horizon = now + cfg.lookahead_s
        usable = [d for d in dev.values() if d.available and d.free_at <= horizon]
        # Per model, no more requests than usable devices holding its diffuse stage.
        room: dict[str, int] = {}
        for d in usable:
            for m, st in d.holds.items():
                if "diffuse" in st:
                    room[m] = room.get(m, 0) + 1
        taken = 0
        out: list[_Cand] = []
        # Relaxed: enough idle devices to give every waiting request a whole node and
        # still leave ``relax_reserve`` of the cluster idle, so lower latency costs
        # nothing — prefer the fastest efficient degree over the thriftiest.
        if degree_sum is None:
            window = list(window)
            degree_sum = sum(i.max_degree for i in window)
        idle = sum(1 for d in usable if d.free_at <= now)
        relaxed = (
            cfg.relax_when_idle
            and degree_sum > 0
            and degree_sum + cfg.relax_reserve * len(dev) <= idle
        )
        self.relaxed = relaxed
        # Aligned groups of every up device holding a model's diffuse stage (busy ones
        # too), per (model, k), built once per round: the least free memory of each (what
        # fits: ``room_of``), when it frees (an on-time option later: then a late one now
        # is not taken) and whether every member is usable now (the candidates).
        all_by_node: dict[str, dict[int, DeviceView]] = {}
        for d in dev.values():
            all_by_node.setdefault(d.node_id, {})[d.index] = d
        usable_ids = {d.device_id for d in usable}
        _Group = tuple[str, list[DeviceView], int, float, bool]
        all_groups: dict[tuple[str, int], list[_Group]] = {}
        holders: dict[str, list[tuple[str, dict[int, DeviceView]]]] = {}

        def groups_all(m: str, k: int) -> list[_Group]:
            got = all_groups.get((m, k))
            if got is None:
                hold = holders.get(m)
                if hold is None:
                    hold = holders[m] = [
                        (node, {i: d for i, d in idx.items() if "diffuse" in d.holds.get(m, ())})
                        for node, idx in sorted(all_by_node.items())
                    ]
                got = all_groups[m, k] = [
                    (
                        node,
                        grp,
                        min(g.free_memory for g in grp),
                        max(g.free_at for g in grp),
                        all(g.device_id in usable_ids for g in grp),
                    )
                    for node, idx in hold
                    for grp in _aligned(idx, k)
                ]
            return got

        later: dict[tuple[str, int], list[tuple[str, list[DeviceView], int]]] = {}

        def later_groups(m: str, k: int) -> list[tuple[str, list[DeviceView], int]]:
            got = later.get((m, k))
            if got is None:
                allg = sorted(groups_all(m, k), key=lambda g: (g[3], g[1][0].device_id))
                got = later[m, k] = [(g[0], g[1], g[2]) for g in allg[:4]]
            return got

        gfree: dict[tuple[str, int], int] = {}
        groups: dict[tuple[str, int], list[tuple[str, list[DeviceView], int]]] = {}
        aux: dict[tuple[str, Stage, int], DeviceView | None] = {}

        def groups_for(m: str, k: int) -> list[tuple[str, list[DeviceView], int]]:
            got = groups.get((m, k))
            if got is None:
                got = groups[m, k] = [(g[0], g[1], g[2]) for g in groups_all(m, k) if g[4]]
            return got

        def group_free(m: str, k: int) -> int:
            got = gfree.get((m, k))
            if got is None:
                got = gfree[m, k] = max((g[2] for g in groups_all(m, k)), default=-1)
            return got

        def earliest(m: str, stage: Stage, peak: int) -> DeviceView | None:
            key = (m, stage, peak)
            if key not in aux:
                aux[key] = _earliest(usable, m, stage, peak, now)
            return aux[key]

        # Groups held for waiting wide requests (kept across rounds until the request is
        # dispatched, becomes hopeless or leaves): others only backfill them.
        inf = float("inf")
        held: dict[str, tuple[str, float]] = {}
        for rid, (grp_ids, frees) in list(self._held.items()):
            if rid not in self._queued or now > frees + cfg.hold_grace_s:
                del self._held[rid]
                continue
            for dev_id in grp_ids:
                held[dev_id] = (rid, frees)
        open_models = sum(1 for v in room.values() if v > 0)
        _Geo = tuple[str, Shape, int, int, float, float]
        geos: dict[
            _Geo, tuple[_ShapeInfo, tuple[int, ...], bool, DeviceView | None, DeviceView | None]
        ] = {}
        later_opts: dict[tuple[_Geo, Stage, str | None], list[_Cand]] = {}
        # (geo, next stage, input, group) -> the prediction, for another item alike.
        predicted: dict[tuple[_Geo, Stage, str | None, tuple[str, ...]], _Cand | None] = {}
        for item in window:
            if taken >= cfg.max_requests or open_models == 0:
                break  # (no model has a usable device left: every later item is skipped)
            if room.get(item.model, 0) <= 0:
                continue
            before = len(out)
            shape, model = item.shape, item.model
            # Everything below but the deadline's tests depends on the item's model,
            # shape and input only: computed once per round for all items alike (under
            # overload a round walks hundreds of same-shape requests in EDF order).
            geo = (
                model,
                shape,
                item.max_degree,
                item.size,
                item.diffuse_fraction,
                item.bytes_scale,
            )
            per_geo = geos.get(geo)
            if per_geo is None:
                info = self._shape_info(
                    item.family,
                    shape,
                    item.max_degree,
                    item.size,
                    item.diffuse_fraction,
                    item.bytes_scale,
                )

                def room_of(k: int, m: str = model) -> int:
                    return group_free(m, k)

                ks = _fitting_degrees(info, room_of)
                # Whether a usable group of an offered degree has room at all.
                fits = any(
                    least >= info.diffuse[k][1] for k in ks for _, _, least in groups_for(model, k)
                )
                per_geo = geos[geo] = (
                    info,
                    ks,
                    fits,
                    earliest(model, "encode", info.enc_peak),
                    earliest(model, "decode", info.dec_peak),
                )
            info, ks, fits, aux_enc, aux_dec = per_geo
            # With no room anywhere the item can only hold a busy group (below); when it
            # cannot, skip it: in an overload most of the backlog is such items.
            if not fits and not (
                cfg.max_holds
                and item.max_degree > 1
                and cfg.wait_for_on_time
                and (item.request_id in self._held or len(self._held) < cfg.max_holds)
            ):
                continue
            enc_t, dec_t = info.enc_t, info.dec_t
            enc_peak, dec_peak = info.enc_peak, info.dec_peak
            text_b, lat_b = info.text_b, info.lat_b
            src = item.input_device if item.next_stage == "diffuse" else None
            budget = max(1e-6, item.deadline - item.arrival)
            age = max(0.0, now - item.arrival) / budget
            item_cands: list[_Cand] = []
            for k in ks:
                dif_t, dif_peak = info.diffuse[k]
                per_k: list[_Cand] = []
                for node, grp, least_free in groups_for(model, k):
                    if least_free < dif_peak:
                        continue
                    until = inf
                    for g in grp:
                        h = held.get(g.device_id)
                        if h is not None and h[0] != item.request_id and h[1] < until:
                            until = h[1]
                    if until < inf and now + dif_t > until:
                        continue  # held for a wider request: backfill only
                    pkey = (geo, item.next_stage, src, tuple(g.device_id for g in grp))
                    if pkey in predicted:
                        c = predicted[pkey]
                        if c is not None:
                            c = c.for_item(item)
                    else:
                        c = predicted[pkey] = self._predict(
                            item,
                            k,
                            grp,
                            node,
                            now,
                            enc_t,
                            dif_t,
                            dec_t,
                            enc_peak,
                            dec_peak,
                            text_b,
                            lat_b,
                            aux_enc,
                            aux_dec,
                            dev,
                        )
                        if c is not None:
                            c = c.for_item(item)  # the memo keeps its own
                    if c is None or c.task_end > until:
                        continue
                    late = c.finish > item.deadline + 1e-9
                    c.on_time = not late
                    if late:
                        # Far below any on-time candidate (a degree-8 group displaces at
                        # most 8 of these), shortest first, a little aging; never <= 0,
                        # so leftover capacity always serves it.
                        rem = max(0.0, c.finish - now)
                        w = cfg.late_reward * (0.2 + 0.6 * 60.0 / (60.0 + rem))
                        w = w * item.size + 2.5 * min(age, 8.0)
                        w -= cfg.cross_node_penalty * c.cross + cfg.transfer_penalty * c.xfers
                        w -= 1e-3 * rem
                        c.weight = max(1.0, w)
                    else:  # urgency is the request's, not the candidate's
                        w = (cfg.on_time_reward + 100.0 * min(1.0, age)) * item.size
                        w -= cfg.cross_node_penalty * c.cross + cfg.transfer_penalty * c.xfers
                        if relaxed:  # idle cluster: the earliest completion
                            w -= cfg.relaxed_finish_penalty * (c.finish - now)
                        else:
                            w -= cfg.device_seconds_penalty * c.dev_seconds
                            w -= 1e-3 * (c.finish - now)  # tie-break: earlier is better
                        c.weight = w
                    per_k.append(c)
                per_k.sort(key=lambda c: (-c.weight, c.group))
                item_cands.extend(per_k[: cfg.groups_per_degree])
            wait = None
            # (With no candidate at all a request may still hold a group: see below.)
            if (
                cfg.wait_for_on_time
                and not any(c.on_time for c in item_cands)
                and (item_cands or (cfg.max_holds and item.max_degree > 1))
            ) and not self.hopeless(item, now):
                # The options depend on the item's shape and input, not its deadline:
                # one list per round for every item alike (EDF order: many).
                lkey = (geo, item.next_stage, src)
                opts = later_opts.get(lkey)
                if opts is None:
                    opts = later_opts[lkey] = self._later_options(
                        item, ks, info, later_groups, now, aux_enc, aux_dec, dev
                    )
                wait = next((c for c in opts if c.finish <= item.deadline + 1e-9), None)
            if wait is not None:
                item_cands = []  # wait for the on-time option rather than miss now
                if wait.k > 1:
                    self._hold(item.request_id, wait.group, dev, held, now)
            elif any(c.on_time for c in item_cands):
                self._held.pop(item.request_id, None)
                if cfg.drop_late_if_on_time:
                    # Where another request takes its on-time group, it waits for the
                    # next one rather than take a late leftover (a 33-frame video ran
                    # late at degree 1 with 100 s of slack left).
                    item_cands = [c for c in item_cands if c.on_time]
            out.extend(item_cands)
            if len(out) > before:
                taken += 1
                room[item.model] -= 1
                if room[item.model] == 0:
                    open_models -= 1
        return out

    def _hold(
        self,
        rid: str,
        group: tuple[str, ...],
        dev: Mapping[str, DeviceView],
        held: dict[str, tuple[str, float]],
        now: float,
    ) -> None:
        """Hold ``group`` for request ``rid`` (or move its hold there) unless another
        request holds one of its devices or ``max_holds`` requests already hold one."""
        if any(held.get(d, (rid,))[0] != rid for d in group):
            return
        if rid not in self._held and len(self._held) >= self.config.max_holds:
            return
        old = self._held.get(rid)
        if old is not None:
            for d in old[0]:
                held.pop(d, None)
        frees = max(now, max(dev[d].free_at for d in group))
        self._held[rid] = (group, frees)
        for d in group:
            held[d] = (rid, frees)

    def _later_options(
        self,
        item: QueueItem,
        ks: Sequence[int],
        info: _ShapeInfo,
        later_groups: Callable[[str, int], list[tuple[str, list[DeviceView], int]]],
        now: float,
        aux_enc: DeviceView | None,
        aux_dec: DeviceView | None,
        dev: Mapping[str, DeviceView],
    ) -> list[_Cand]:
        """The request's options on the groups that free first (busy ones included, at
        their predicted free time), degree by degree: where one still completes it on
        time it should wait for it. Only ``k``, ``group`` and ``finish`` are read (the
        list serves every item of the same shape and input in a round)."""
        out: list[_Cand] = []
        for k in ks:
            dif_t, dif_peak = info.diffuse[k]
            for node, grp, least_free in later_groups(item.model, k):
                if least_free < dif_peak:
                    continue
                c = self._predict(
                    item,
                    k,
                    grp,
                    node,
                    now,
                    info.enc_t,
                    dif_t,
                    info.dec_t,
                    info.enc_peak,
                    info.dec_peak,
                    info.text_b,
                    info.lat_b,
                    aux_enc,
                    aux_dec,
                    dev,
                )
                if c is not None:
                    out.append(c)
        return out

    def _predict(
        self,
        item: QueueItem,
        k: int,
        grp: Sequence[DeviceView],
        node: str,
        now: float,
        enc_t: float,
        dif_t: float,
        dec_t: float,
        enc_peak: int,
        dec_peak: int,
        text_b: int,
        lat_b: int,
        aux_enc: DeviceView | None,
        aux_dec: DeviceView | None,
        dev: Mapping[str, DeviceView],
    ) -> _Cand | None:
        cost = self.cost
        leader = grp[0]
        held = leader.holds.get(item.model, frozenset())
        speed = min(g.speed for g in grp)
        g_free = max(max(g.free_at for g in grp), now)
        ids = tuple(g.device_id for g in grp)
        cross = 0
        xfers = 0
        first_end = now
        stages: list[Stage] = []
        m = item.model
        # Weights not resident are loaded when the task lands: members in parallel, the
        # leader one stage after another.
        grp_load = max(g.load(m, "diffuse") for g in grp)
        lead_dec = leader.load(m, "decode") if "decode" in held else 0.0
        if item.next_stage == "encode":
            if "encode" in held and leader.free_memory >= enc_peak:
                stages = ["encode", "diffuse"]
                start = g_free
                lead = leader.load(m, "encode") + leader.load(m, "diffuse") + lead_dec
                d_start = start + max(lead, grp_load) + enc_t / leader.speed
                task_devices = ids
            else:
                if aux_enc is None:
                    return None
                e_start = max(now, aux_enc.free_at)
                e_end = e_start + aux_enc.load(m, "encode") + enc_t / aux_enc.speed
                same = aux_enc.node_id == node
                cross += 0 if same else 1
                xfers += 1
                d_start = max(
                    g_free + max(grp_load, leader.load(m, "diffuse") + lead_dec),
                    e_end + cost.transfer_seconds(text_b, same),
                )
                # The task issued now is encode alone; diffuse is re-planned when it ends.
                stages = ["encode"]
                start = e_start
                task_devices = (aux_enc.device_id,)
                first_end = e_end
        else:  # diffuse
            src = item.input_device
            xfer = 0.0
            if src is not None and src != leader.device_id:
                xfers += 1
                src_view = dev.get(src)
                same = src_view is not None and src_view.node_id == node
                cross += 0 if same else 1
                xfer = cost.transfer_seconds(text_b, same)
            stages = ["diffuse"]
            start = g_free
            d_start = start + max(xfer, grp_load, leader.load(m, "diffuse") + lead_dec)
            task_devices = ids
        d_end = d_start + dif_t / speed
        if "decode" in held and leader.free_memory >= dec_peak:
            finish = d_end + dec_t / leader.speed
            if stages[-1] == "diffuse":
                stages.append("decode")
                task_end = finish
            else:
                task_end = first_end
        else:
            if aux_dec is None:
                return None
            same = aux_dec.node_id == node
            cross += 0 if same else 1
            xfers += 1
            c_start = max(
                aux_dec.free_at + aux_dec.load(m, "decode"),
                d_end + cost.transfer_seconds(lat_b, same),
            )
            finish = c_start + dec_t / aux_dec.speed
            task_end = d_end if stages[-1] == "diffuse" else first_end
        return _Cand(
            item=item,
            k=k,
            group=ids,
            stages=tuple(stages),
            devices=task_devices,
            start=start,
            task_end=task_end,
            finish=finish,
            on_time=finish <= item.deadline,
            cross=cross,
            dev_seconds=k * dif_t / speed,
            xfers=xfers,
        )

    # ------------------------------------------------------------------ solvers

    def greedy(self, cands: Sequence[_Cand]) -> list[_Cand]:
        """EDF; per request the thriftiest on-time candidate (least device-seconds), else
        the earliest completion; each device once. Last round's choice first."""
        by_req: dict[str, list[_Cand]] = {}
        for c in cands:
            by_req.setdefault(c.item.request_id, []).append(c)

        # Requests with an on-time candidate first (EDF), then the others shortest first.
        def order_key(cs: list[_Cand]) -> tuple[int, float, float, str]:
            it = cs[0].item
            if any(c.on_time for c in cs):
                return (0, it.deadline, it.arrival, it.request_id)
            return (1, min(c.finish for c in cs), it.arrival, it.request_id)

        order = sorted(by_req.values(), key=order_key)
        used: set[str] = set()
        out: list[_Cand] = []
        relaxed = self.relaxed
        for cs in order:
            prev = self.last.get(cs[0].item.request_id)

            def key(c: _Cand, prev: tuple[str, ...] | None = prev) -> tuple[int, int, float, float]:
                return (
                    0 if c.group == prev else 1,
                    0 if c.on_time else 1,
                    c.dev_seconds if c.on_time and not relaxed else c.finish,
                    c.finish,
                )

            for c in sorted(cs, key=key):
                if used.isdisjoint(c.group) and used.isdisjoint(c.devices):
                    out.append(c)
                    used.update(c.group)
                    used.update(c.devices)
                    break
        return out

    @staticmethod
    def _trivial(cands: Sequence[_Cand]) -> list[_Cand] | None:
        """When no device appears in candidates of two different requests, the optimum
        is each request's best candidate: return it (no solver needed); else None."""
        owner: dict[str, str] = {}
        for c in cands:
            for d in (*c.group, *c.devices):
                if owner.setdefault(d, c.item.request_id) != c.item.request_id:
                    return None
        best: dict[str, _Cand] = {}
        for c in cands:
            b = best.get(c.item.request_id)
            if b is None or c.weight > b.weight:
                best[c.item.request_id] = c
        return [c for c in best.values() if c.weight > 0]

    def _mip(self, cands: Sequence[_Cand], greedy: Sequence[_Cand]) -> DispatchResult:
        """Solve within ``max_nodes``; warm-started from the greedy plan."""
        cfg = self.config
        try:
            import mip
        except ImportError:  # pragma: no cover - mip is a dependency
            return DispatchResult(
                [c.assignment() for c in greedy], "greedy", "no_solver", 0.0, len(cands)
            )
        try:
            m = mip.Model(sense=mip.MAXIMIZE, solver_name=solver_library(cfg.solver))
            m.verbose = 0
            x = [m.add_var(var_type=mip.BINARY, obj=c.weight) for c in cands]
            by_req: dict[str, list[int]] = {}
            by_dev: dict[str, list[int]] = {}
            for j, c in enumerate(cands):
                by_req.setdefault(c.item.request_id, []).append(j)
                # In a fixed order (not a set's, which follows PYTHONHASHSEED): the
                # constraints' order decides among equal plans within the node budget.
                for d in dict.fromkeys((*c.group, *c.devices)):
                    by_dev.setdefault(d, []).append(j)
            for js in by_req.values():
                if len(js) > 1:
                    m.add_constr(mip.xsum(x[j] for j in js) <= 1)
            for js in by_dev.values():
                if len(js) > 1:
                    m.add_constr(mip.xsum(x[j] for j in js) <= 1)
            index = {id(c): j for j, c in enumerate(cands)}
            m.start = [(x[index[id(c)]], 1.0) for c in greedy]
            status = optimize(m, cfg.max_nodes)
        except Exception:  # solver trouble must never stop dispatch
            return DispatchResult(
                [c.assignment() for c in greedy], "greedy", "error", 0.0, len(cands)
            )
        greedy_weight = sum(c.weight for c in greedy)
        if status in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
            chosen = [c for j, c in enumerate(cands) if (x[j].x or 0.0) > 0.5]
            weight = sum(c.weight for c in chosen)
            if status == mip.OptimizationStatus.OPTIMAL or weight >= greedy_weight:
                return DispatchResult(
                    [c.assignment() for c in chosen],
                    "mip",
                    "optimal" if status == mip.OptimizationStatus.OPTIMAL else "feasible",
                    0.0,
                    len(cands),
                    weight,
                )
        # Node limit without a better incumbent (or anything else): the greedy plan.
        return DispatchResult(
            [c.assignment() for c in greedy],
            "greedy",
            "node_limit",
            0.0,
            len(cands),
            greedy_weight,
        )


def _past_deadline(item: QueueItem, finish: float) -> bool:
    return finish > item.deadline + 1e-9


def _in_window_order(
    keyed: list[tuple[tuple[int, float, float, str], int, QueueItem]],
) -> Iterator[QueueItem]:
    """The items of ``keyed`` ((window key, position, item)) in key order, lazily: a
    round takes candidates from the first few dozen only, and sorting a 3,000-request
    backlog every round was most of its cost. Consumes ``keyed``."""
    heapq.heapify(keyed)
    while keyed:
        yield heapq.heappop(keyed)[2]


_T = TypeVar("_T")


def _aligned(idx: Mapping[int, _T], k: int) -> list[list[_T]]:
    """The aligned groups of ``k`` (indices jk .. jk+k-1) whose members all appear in
    ``idx`` (index -> device, or any figure of it)."""
    if not idx:
        return []
    out = []
    for j in range(max(idx) // k + 1):
        grp = [idx.get(i) for i in range(j * k, (j + 1) * k)]
        if all(g is not None for g in grp):
            out.append([g for g in grp if g is not None])
    return out


def _earliest(
    usable: Sequence[DeviceView], model: str, stage: Stage, peak: int, now: float
) -> DeviceView | None:
    best: DeviceView | None = None
    best_key: tuple[float, str] | None = None
    for d in usable:
        if stage in d.holds.get(model, frozenset()) and d.free_memory >= peak:
            key = (max(now, d.free_at) + d.load(model, stage), d.device_id)
            if best_key is None or key < best_key:
                best, best_key = d, key
    return best
