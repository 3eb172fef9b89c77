"""The monitor: what the workload and the cluster are doing, over a sliding window.

Pure bookkeeping, fed by the policy from events (no clock of its own: every call takes
``now``). It keeps, over the last ``window_s`` seconds:

- **arrivals** by pipeline and shape (the demand the orchestrator plans for, and the
  *mix* whose drift the trigger watches);
- **completed stage work** per (pipeline, stage) in device-seconds (a degree-k stage
  counts k times its seconds), i.e. the throughput the cluster actually delivered;
- **per-device busy time** (seconds of tasks that ended in the window).

:meth:`Monitor.snapshot` combines that with what only the policy knows at that instant
(the current plan, the queue, free memory) into a :class:`MonitorSnapshot`: per stage
demand, planned capacity and served throughput; per pipeline the plan's capacity/demand
ratio; queue length and waiting times; per device busy fraction and free memory. The
re-placement trigger (:mod:`trident.sched.trigger`) reads only the snapshot, and the
policy logs it with every ``placement.changed``.

Capacity of a stage under a plan ("how fast the plan lets that stage go"): each up
device's speed is shared among the (pipeline, stage) pairs it holds in proportion to
their demand (equally when none has demand); a stage's capacity is the sum of its
shares. Its *supply ratio* is capacity / demand — the paper's per-stage throughput
against what arrives. The pipeline's ratio (``model_ratio``) is the exact fluid LP
(max-flow; :func:`trident.sched.orchestrator.plan_capacity_ratio`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from trident.sched.orchestrator import Demand, demand_from_window
from trident.sched.types import STAGES, CostModel, ModelInfo, Shape, Stage

__all__ = [
    "DeviceStats",
    "Monitor",
    "MonitorConfig",
    "MonitorSnapshot",
    "StageStats",
    "mix_of",
    "shape_key",
    "total_variation",
]


def shape_key(shape: Shape) -> str:
    """A compact, stable name for a shape: ``HxWxF/steps``."""
    return f"{shape.height}x{shape.width}x{shape.num_frames}/{shape.num_inference_steps}"


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Total-variation distance between two distributions given as (unnormalised)
    weights: 0 for the same mix, 1 for disjoint ones. An empty side against a non-empty
    one is 1 (a plan made with no data is as far as can be from any real mix); two empty
    sides are 0."""
    sp, sq = sum(p.values()), sum(q.values())
    if sp <= 0 and sq <= 0:
        return 0.0
    if sp <= 0 or sq <= 0:
        return 1.0
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) / sp - q.get(k, 0.0) / sq) for k in keys)


@dataclass(frozen=True)
class StageStats:
    """One (pipeline, stage), in device-seconds per second."""

    demand: float  # what the window's arrivals need
    capacity: float  # what the current plan can give it (fluid share of its holders)
    served: float  # stage work that completed in the window

    @property
    def supply_ratio(self) -> float:
        """capacity / demand (inf without demand)."""
        return self.capacity / self.demand if self.demand > 0 else math.inf

    @property
    def served_ratio(self) -> float:
        """served / demand (inf without demand)."""
        return self.served / self.demand if self.demand > 0 else math.inf


@dataclass(frozen=True)
class DeviceStats:
    busy_fraction: float  # busy seconds in the window / window span
    free_memory: int  # memory - weights of the planned stages (bytes)
    inflight: int  # tasks sent and not finished
    up: bool = True


@dataclass(frozen=True)
class MonitorSnapshot:
    """Everything the trigger needs, at one instant."""

    now: float
    window_s: float
    span_s: float  # the part of the window with data (short right after start)
    arrivals: Mapping[str, int]  # pipeline -> arrivals in the window
    shapes: Mapping[str, Mapping[str, int]]  # pipeline -> shape key -> arrivals
    mix: Mapping[str, float]  # "pipeline:stage" -> share of the window's work (sums to 1)
    stages: Mapping[str, Mapping[Stage, StageStats]]  # pipeline -> stage -> stats
    model_ratio: Mapping[str, float]  # pipeline -> plan capacity / demand (exact fluid LP)
    queue_len: int = 0
    queue_by_model: Mapping[str, int] = field(default_factory=dict)
    oldest_wait_s: float = 0.0
    mean_wait_s: float = 0.0
    devices: Mapping[str, DeviceStats] = field(default_factory=dict)

    def stage_imbalance(self, model: str) -> tuple[float, str, str]:
        """(fastest / slowest supply ratio, fastest stage, slowest stage) among the
        pipeline's stages with demand; (1, "", "") with fewer than two such stages;
        inf when a stage with demand has no capacity at all."""
        st = {s: v for s, v in self.stages.get(model, {}).items() if v.demand > 0}
        if len(st) < 2:
            return 1.0, "", ""
        fast = max(st, key=lambda s: st[s].supply_ratio)
        slow = min(st, key=lambda s: st[s].supply_ratio)
        lo, hi = st[slow].supply_ratio, st[fast].supply_ratio
        if lo <= 0:
            return math.inf, fast, slow
        return hi / lo, fast, slow

    def model_imbalance(self) -> tuple[float, str, str]:
        """(best / worst plan ratio among pipelines with demand, best, worst); inf when a
        pipeline with demand has no capacity; (1, "", "") with fewer than two."""
        r = {m: v for m, v in self.model_ratio.items() if math.isfinite(v)}
        if len(r) < 2:
            if r and min(r.values()) <= 0:
                m = min(r, key=lambda k: r[k])
                return math.inf, m, m
            return 1.0, "", ""
        best = max(r, key=lambda m: r[m])
        worst = min(r, key=lambda m: r[m])
        if r[worst] <= 0:
            return math.inf, best, worst
        return r[best] / r[worst], best, worst

    def summary(self) -> dict[str, object]:
        """A compact, JSON-friendly view for logs (``placement.changed``)."""

        def rnd(x: float) -> float | None:
            return round(x, 4) if math.isfinite(x) else None

        busy = [d.busy_fraction for d in self.devices.values() if d.up]
        return {
            "window_s": self.window_s,
            "span_s": round(self.span_s, 3),
            "arrivals": dict(self.arrivals),
            "mix": {k: round(v, 4) for k, v in sorted(self.mix.items()) if v > 0},
            "model_ratio": {m: rnd(v) for m, v in self.model_ratio.items()},
            "stages": {
                m: {
                    s: {
                        "demand": round(v.demand, 4),
                        "capacity": round(v.capacity, 4),
                        "served": round(v.served, 4),
                    }
                    for s, v in st.items()
                    if v.demand > 0 or v.served > 0
                }
                for m, st in self.stages.items()
            },
            "queue_len": self.queue_len,
            "queue_by_model": dict(self.queue_by_model),
            "oldest_wait_s": round(self.oldest_wait_s, 3),
            "mean_wait_s": round(self.mean_wait_s, 3),
            "mean_busy": round(sum(busy) / len(busy), 4) if busy else 0.0,
        }


@dataclass
class MonitorConfig:
    """The planner's monitor settings (``Monitor(**asdict(config))``: the window and the
    per-model windows of a :class:`Monitor`). Trident's defaults turn the per-model
    windows on; a bare ``Monitor()`` keeps one window for every model."""

    window_s: float = 60.0
    imbalance: float = 1.5  # fastest / slowest stage (or model) supply ratio
    # a model with fewer arrivals than this in window_s: rate over its last this-many
    # arrivals, looking back at most max_window_s (0: one window for all models)
    min_model_arrivals: int = 8
    max_window_s: float = 300.0


@dataclass
class Monitor:
    window_s: float = 60.0
    imbalance: float = 1.5
    arrivals: deque[tuple[float, str, Shape]] = field(default_factory=deque)
    # (time, model, stage, device-seconds) of completed stage work
    completed: deque[tuple[float, str, str, float]] = field(default_factory=deque)
    # (end time, device, busy seconds) of finished tasks
    busy: deque[tuple[float, str, float]] = field(default_factory=deque)
    # cumulative, for reports
    stage_busy: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, stage) -> s
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    first_arrival: float | None = None
    # Per-model windows: a model with fewer than ``min_model_arrivals`` arrivals in the
    # last ``window_s`` has its rate (and shapes) estimated over its last
    # ``min_model_arrivals`` arrivals, looking back at most ``max_window_s`` — a rare,
    # heavy model (one video a minute) is otherwise 0 or 10 devices of demand from one
    # window to the next. 0 turns it off (one window for every model).
    min_model_arrivals: int = 0
    max_window_s: float = 0.0

    # ------------------------------------------------------------------ recording

    def record_arrival(self, now: float, model: str, shape: Shape) -> None:
        if self.first_arrival is None:
            self.first_arrival = now
        self.arrivals.append((now, model, shape))
        self._trim(now)

    def record_stage(
        self, model: str, stage: str, seconds: float, now: float | None = None, degree: int = 1
    ) -> None:
        """A stage finished after ``seconds`` on ``degree`` devices."""
        key = (model, stage)
        self.stage_busy[key] = self.stage_busy.get(key, 0.0) + seconds
        self.finished[key] = self.finished.get(key, 0) + 1
        if now is not None:
            self.completed.append((now, model, stage, seconds * max(1, degree)))

    def record_busy(self, now: float, devices: Iterable[str], seconds: float) -> None:
        """A task ran ``seconds`` on each of ``devices``, ending at ``now``."""
        for d in devices:
            self.busy.append((now, d, seconds))

    def _trim(self, now: float) -> None:
        lo = now - self.window_s
        keep = now - max(self.window_s, self.max_window_s)
        while self.arrivals and self.arrivals[0][0] < keep:
            self.arrivals.popleft()
        while self.completed and self.completed[0][0] < lo:
            self.completed.popleft()
        while self.busy and self.busy[0][0] < lo:
            self.busy.popleft()

    # ------------------------------------------------------------------ window views

    def model_spans(self, now: float) -> dict[str, float]:
        """Per model with arrivals: the seconds its rate is estimated over — the window
        (:meth:`span`), or longer for a rare model (``min_model_arrivals``)."""
        self._trim(now)
        base = self.span(now)
        times: dict[str, list[float]] = {}
        for t, m, _ in self.arrivals:
            times.setdefault(m, []).append(t)
        k = self.min_model_arrivals
        longest = max(base, self.max_window_s)
        if self.first_arrival is not None:
            longest = max(base, min(longest, now - self.first_arrival))
        out: dict[str, float] = {}
        for m, ts in times.items():
            recent = sum(1 for t in ts if t >= now - base)
            if k <= 0 or recent >= k or longest <= base:
                if recent:
                    out[m] = base
                continue
            if len(ts) >= k:
                span = max(base, min(longest, now - ts[-k]))
            else:
                span = longest
            out[m] = span
        return out

    def window(self, now: float) -> list[tuple[str, Shape]]:
        """(model, shape) of the arrivals in each model's window (:meth:`model_spans`)."""
        return self._window(now, self.model_spans(now))

    def _window(self, now: float, spans: Mapping[str, float]) -> list[tuple[str, Shape]]:
        return [(m, s) for t, m, s in self.arrivals if m in spans and t >= now - spans[m]]

    def rates(self, now: float) -> dict[str, float]:
        """Requests per second per model over its window."""
        spans = self.model_spans(now)
        counts: dict[str, int] = {}
        for m, _ in self.window(now):
            counts[m] = counts.get(m, 0) + 1
        return {m: c / spans[m] for m, c in counts.items()}

    def shapes(self, now: float) -> dict[str, list[Shape]]:
        out: dict[str, list[Shape]] = {}
        for m, s in self.window(now):
            out.setdefault(m, []).append(s)
        return out

    def span(self, now: float) -> float:
        """Seconds of the window that hold data: the window, or less right after the
        first arrival (so early demand is not diluted over time with no data)."""
        if self.first_arrival is None:
            return self.window_s
        return max(1.0, min(self.window_s, now - self.first_arrival))

    def demand(
        self, cost: CostModel, models: Mapping[str, ModelInfo], now: float, efficiency: float = 0.8
    ) -> Demand:
        spans = self.model_spans(now)
        by_model: dict[str, list[tuple[str, Shape]]] = {}
        for x in self._window(now, spans):
            by_model.setdefault(x[0], []).append(x)
        out: Demand = {m: dict.fromkeys(STAGES, 0.0) for m in models}
        for m, span in spans.items():
            if m not in models:
                continue
            part = demand_from_window(cost, {m: models[m]}, by_model.get(m, []), span, efficiency)
            out[m] = part[m]
        return out

    def imbalanced(self, ratios: Mapping[str, float]) -> bool:
        """Legacy check: best / worst capacity-demand ratio across models >= imbalance."""
        vals = [r for r in ratios.values() if r > 0]
        if len(vals) < len(ratios) and vals:
            return True  # a model with demand and no capacity
        if len(vals) < 2:
            return False
        return max(vals) >= self.imbalance * min(vals)

    # ------------------------------------------------------------------ snapshot

    def snapshot(
        self,
        now: float,
        cost: CostModel,
        models: Mapping[str, ModelInfo],
        placement: Mapping[str, Mapping[str, frozenset[Stage]]],
        speeds: Mapping[str, float],
        model_ratio: Mapping[str, float] | None = None,
        queue: Iterable[tuple[str, float]] = (),
        free_memory: Mapping[str, int] | None = None,
        inflight: Mapping[str, int] | None = None,
        efficiency: float = 0.8,
    ) -> MonitorSnapshot:
        """The monitor's view at ``now``.

        ``placement``: up device -> model -> planned stages; ``speeds``: device speed;
        ``model_ratio``: the plan's capacity/demand per model (the policy computes it with
        the exact LP; when ``None`` the per-stage fluid shares give it); ``queue``:
        (model, arrival) of each waiting request.
        """
        win = self.window(now)
        span = self.span(now)
        demand = self.demand(cost, models, now, efficiency)
        arrivals: dict[str, int] = {}
        shapes: dict[str, dict[str, int]] = {}
        for m, shp in win:
            arrivals[m] = arrivals.get(m, 0) + 1
            per = shapes.setdefault(m, {})
            k = shape_key(shp)
            per[k] = per.get(k, 0) + 1
        mix = mix_of(demand)
        # Capacity: each device's speed shared among what it holds, by demand.
        cap: dict[tuple[str, str], float] = {}
        for dev, held in placement.items():
            pairs = [(m, s) for m, st in held.items() for s in st]
            if not pairs:
                continue
            w = [demand.get(m, {}).get(s, 0.0) for m, s in pairs]
            tot = sum(w)
            sp = speeds.get(dev, 1.0)
            for (m, s), wi in zip(pairs, w, strict=True):
                share = wi / tot if tot > 0 else 1.0 / len(pairs)
                cap[m, s] = cap.get((m, s), 0.0) + sp * share
        served: dict[tuple[str, str], float] = {}
        for _, m, stage_name, ds in self.completed:
            served[m, stage_name] = served.get((m, stage_name), 0.0) + ds
        stages: dict[str, dict[Stage, StageStats]] = {}
        for m in models:
            stages[m] = {
                s: StageStats(
                    demand=demand.get(m, {}).get(s, 0.0),
                    capacity=cap.get((m, s), 0.0),
                    served=served.get((m, s), 0.0) / span,
                )
                for s in STAGES
            }
        if model_ratio is None:
            model_ratio = {}
            for m, st in stages.items():
                rs = [v.supply_ratio for v in st.values() if v.demand > 0]
                if rs:
                    model_ratio[m] = min(rs)
        waits = [max(0.0, now - a) for _, a in queue]
        by_model: dict[str, int] = {}
        for m, _ in queue:
            by_model[m] = by_model.get(m, 0) + 1
        busy: dict[str, float] = {}
        for _, d, secs in self.busy:
            busy[d] = busy.get(d, 0.0) + secs
        devices = {
            d: DeviceStats(
                busy_fraction=min(1.0, busy.get(d, 0.0) / span),
                free_memory=int((free_memory or {}).get(d, 0)),
                inflight=int((inflight or {}).get(d, 0)),
            )
            for d in placement
        }
        return MonitorSnapshot(
            now=now,
            window_s=self.window_s,
            span_s=span,
            arrivals=arrivals,
            shapes=shapes,
            mix=mix,
            stages=stages,
            model_ratio=dict(model_ratio),
            queue_len=len(waits),
            queue_by_model=by_model,
            oldest_wait_s=max(waits, default=0.0),
            mean_wait_s=sum(waits) / len(waits) if waits else 0.0,
            devices=devices,
        )


def mix_of(demand: Demand) -> dict[str, float]:
    """The work mix: ``"model:stage"`` -> share of all demanded device-seconds."""
    tot = sum(v for st in demand.values() for v in st.values())
    if tot <= 0:
        return {}
    return {f"{m}:{s}": v / tot for m, st in demand.items() for s, v in st.items() if v > 0}
