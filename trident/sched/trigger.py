"""The re-placement trigger: when to ask the orchestrator for a new plan.

Pure and clock-free (every call takes ``now``); reads only a
:class:`~trident.sched.monitor.MonitorSnapshot`.

Rules (any one is a *condition*):

- ``stage-imbalance`` (the paper's rule, per pipeline): the fastest stage's supply ratio
  (planned capacity / demand) is at least ``imbalance`` (1.5) times the slowest's.
- ``model-imbalance``: across pipelines with demand, the best-served pipeline's plan
  ratio is at least ``imbalance`` times the worst-served one's (a pipeline with demand
  and no capacity at all counts as infinitely imbalanced).
- ``drift``: the total-variation distance between the window's work mix (share of
  demanded device-seconds per pipeline and stage) and the mix the current plan was made
  (or last confirmed) for is at least ``drift`` (0.25).

Hysteresis, so that the plan does not flap:

- the condition must hold for ``confirm_checks`` consecutive checks (an oscillating
  signal resets the count and never fires);
- at least ``min_interval_s`` between two re-plan *attempts* (applied or not);
- no decision on a window with fewer than ``min_arrivals`` arrivals (noise);
- the caller applies the new plan only when its predicted least capacity/demand ratio
  beats the current plan's by ``min_gain`` and the current plan's is below
  ``satisfied_ratio`` (1.25: every pipeline already has 25% headroom — moving weights
  around would cost more than it gives) (:meth:`ReplanTrigger.worth_it`); the
  orchestrator's move penalty (which includes the weights' load time) keeps the plan
  close to the current one;
- a rejected attempt re-bases the drift reference on the current mix (the current plan
  was just found good enough for it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from trident.sched.monitor import MonitorSnapshot, total_variation

__all__ = ["ReplanTrigger", "TriggerConfig", "TriggerDecision"]


@dataclass
class TriggerConfig:
    imbalance: float = 1.5  # fastest / slowest stage (or model) supply ratio
    drift: float = 0.25  # total-variation distance of the work mix
    confirm_checks: int = 3  # consecutive checks the condition must hold
    min_interval_s: float = 30.0  # between two re-plan attempts
    min_gain: float = 0.1  # predicted least-ratio improvement needed to apply
    # A plan whose least capacity/demand ratio is at least this is good enough: no move.
    satisfied_ratio: float = 1.25
    min_arrivals: int = 10  # no decision on a window with fewer arrivals (noise)
    # Served objective: a new plan must serve this much more of the requests (share of
    # arrivals whose model gets its latency requirement) to be applied.
    min_served_gain: float = 0.05


@dataclass(frozen=True)
class TriggerDecision:
    """Why a re-plan is due: the first rule that holds, its numbers, and the others."""

    rule: str  # "stage-imbalance" | "model-imbalance" | "drift"
    value: float  # the measured factor or distance
    threshold: float
    detail: Mapping[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        v = "inf" if not math.isfinite(self.value) else f"{self.value:.3f}"
        extra = ", ".join(f"{k}={val}" for k, val in self.detail.items())
        return f"{self.rule} {v} >= {self.threshold:g}" + (f" ({extra})" if extra else "")

    def to_log(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "value": round(self.value, 4) if math.isfinite(self.value) else None,
            "threshold": self.threshold,
            **dict(self.detail),
        }


@dataclass
class ReplanTrigger:
    config: TriggerConfig = field(default_factory=TriggerConfig)
    reference_mix: dict[str, float] = field(default_factory=dict)
    streak: int = 0
    last_attempt: float = -math.inf
    last_applied: float = -math.inf
    attempts: int = 0
    applied: int = 0

    def evaluate(self, snap: MonitorSnapshot) -> TriggerDecision | None:
        """The condition at this instant, without hysteresis (no state change)."""
        cfg = self.config
        if sum(snap.arrivals.values()) < cfg.min_arrivals:
            return None
        found: list[TriggerDecision] = []
        # Paper's rule, per pipeline: fastest stage vs slowest stage.
        worst: tuple[float, str, str, str] | None = None
        for m in sorted(snap.stages):
            f, fast, slow = snap.stage_imbalance(m)
            if fast and (worst is None or f > worst[0]):
                worst = (f, m, fast, slow)
        if worst is not None and worst[0] >= cfg.imbalance:
            f, m, fast, slow = worst
            st = snap.stages[m]
            found.append(
                TriggerDecision(
                    "stage-imbalance",
                    f,
                    cfg.imbalance,
                    {
                        "model": m,
                        "fastest": fast,
                        "slowest": slow,
                        "fastest_ratio": _r(st[fast].supply_ratio),  # type: ignore[index]
                        "slowest_ratio": _r(st[slow].supply_ratio),  # type: ignore[index]
                    },
                )
            )
        f, best, worst_m = snap.model_imbalance()
        if best and f >= cfg.imbalance:
            found.append(
                TriggerDecision(
                    "model-imbalance",
                    f,
                    cfg.imbalance,
                    {
                        "best": best,
                        "worst": worst_m,
                        "best_ratio": _r(snap.model_ratio[best]),
                        "worst_ratio": _r(snap.model_ratio[worst_m]),
                    },
                )
            )
        d = total_variation(snap.mix, self.reference_mix)
        if d >= cfg.drift:
            found.append(
                TriggerDecision(
                    "drift",
                    d,
                    cfg.drift,
                    {"mix": _top(snap.mix), "plan_mix": _top(self.reference_mix)},
                )
            )
        if not found:
            return None
        first = found[0]
        if len(found) > 1:
            also = {x.rule: (_r(x.value)) for x in found[1:]}
            return TriggerDecision(
                first.rule, first.value, first.threshold, {**first.detail, "also": also}
            )
        return first

    def check(self, snap: MonitorSnapshot, now: float) -> TriggerDecision | None:
        """A decision when a re-plan attempt is due now (condition held for
        ``confirm_checks`` checks in a row and ``min_interval_s`` passed since the last
        attempt); the caller then reports :meth:`attempted`."""
        cond = self.evaluate(snap)
        if cond is None:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < max(1, self.config.confirm_checks):
            return None
        if now - self.last_attempt < self.config.min_interval_s:
            return None
        return cond

    def worth_it(self, before: float, after: float) -> bool:
        """Is a plan predicted at least-ratio ``after`` worth moving to from ``before``?"""
        if not math.isfinite(after) or after <= 0:
            return False
        if before <= 0:
            return True
        if before >= self.config.satisfied_ratio:
            return False
        return after > before * (1.0 + self.config.min_gain)

    def worth_it_served(
        self,
        served_before: float,
        served_after: float,
        least_before: float = math.inf,
        least_after: float = math.inf,
    ) -> bool:
        """Served objective: apply when the new plan serves ``min_served_gain`` more of
        the requests; on a tie (within it), only when the least capacity/requirement
        ratio is below ``satisfied_ratio`` now and gains ``min_gain`` — so a plan with
        headroom over every requirement is not moved for noise, and demand noise that
        does not change who is served moves little."""
        cfg = self.config
        if served_after >= served_before + cfg.min_served_gain:
            return True
        if served_after < served_before - cfg.min_served_gain:
            return False
        if not math.isfinite(least_after) or least_after <= 0:
            return False
        if least_before >= cfg.satisfied_ratio:
            return False
        return least_after > least_before * (1.0 + cfg.min_gain)

    def attempted(self, now: float, applied: bool, mix: Mapping[str, float]) -> None:
        """Record an attempt: the streak restarts and the drift reference becomes the
        mix the (new or confirmed) plan is for."""
        self.attempts += 1
        self.last_attempt = now
        self.streak = 0
        self.reference_mix = dict(mix)
        if applied:
            self.applied += 1
            self.last_applied = now

    def planned_for(self, mix: Mapping[str, float]) -> None:
        """A plan was made outside the trigger (devices joined): its mix is the reference."""
        self.reference_mix = dict(mix)


def _r(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def _top(mix: Mapping[str, float], n: int = 6) -> dict[str, float]:
    return {k: round(v, 3) for k, v in sorted(mix.items(), key=lambda kv: -kv[1])[:n]}
