"""The monitor: a sliding window of arrivals (demand) and per-stage throughput.

Pure bookkeeping, fed by the policy from events. The orchestrator reads demand from
:meth:`Monitor.demand`; :meth:`Monitor.imbalanced` is the re-placement trigger: the
best-served model's capacity/demand ratio is at least ``imbalance`` (paper: 1.5) times
the worst-served one's (stage imbalance within a model is what the placement MIP's flows
already balance, so comparing models is what is left to detect).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from trident.sched.orchestrator import Demand, demand_from_window
from trident.sched.types import CostModel, ModelInfo, Shape

__all__ = ["Monitor"]


@dataclass
class Monitor:
    window_s: float = 60.0
    imbalance: float = 1.5
    arrivals: deque[tuple[float, str, Shape]] = field(default_factory=deque)
    stage_busy: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, stage) -> s
    finished: dict[tuple[str, str], int] = field(default_factory=dict)

    def record_arrival(self, now: float, model: str, shape: Shape) -> None:
        self.arrivals.append((now, model, shape))
        self._trim(now)

    def record_stage(self, model: str, stage: str, seconds: float) -> None:
        key = (model, stage)
        self.stage_busy[key] = self.stage_busy.get(key, 0.0) + seconds
        self.finished[key] = self.finished.get(key, 0) + 1

    def _trim(self, now: float) -> None:
        while self.arrivals and self.arrivals[0][0] < now - self.window_s:
            self.arrivals.popleft()

    def window(self, now: float) -> list[tuple[str, Shape]]:
        self._trim(now)
        return [(m, s) for _, m, s in self.arrivals]

    def shapes(self, now: float) -> dict[str, list[Shape]]:
        out: dict[str, list[Shape]] = {}
        for m, s in self.window(now):
            out.setdefault(m, []).append(s)
        return out

    def demand(
        self, cost: CostModel, models: Mapping[str, ModelInfo], now: float, efficiency: float = 0.8
    ) -> Demand:
        win = self.window(now)
        span = self.window_s
        if self.arrivals:
            span = max(1.0, min(self.window_s, now - self.arrivals[0][0]))
        return demand_from_window(cost, models, win, span, efficiency)

    def imbalanced(self, ratios: Mapping[str, float]) -> bool:
        vals = [r for r in ratios.values() if r > 0]
        if len(vals) < len(ratios) and vals:
            return True  # a model with demand and no capacity
        if len(vals) < 2:
            return False
        return max(vals) >= self.imbalance * min(vals)
