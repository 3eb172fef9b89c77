"""Summaries of a simulation run: SLO attainment, latency percentiles, failure counts.

Definitions (the same for every policy, so ratios between policies are fair):

- **SLO attainment**: requests that completed by their deadline / all requests of the
  trace. Failed and unfinished requests count as misses.
- **latency**: completion time - arrival, over *completed* requests only (mean, P50,
  P95, P99). A policy that fails many requests can therefore look fast; read the
  ``failed`` column beside it.
- **failed**: requests that ended in ``FailRequest`` (any code) or never ended before
  the simulation stopped (``unfinished``). **oom**: requests that had at least one task
  fail with ``out_of_memory`` (whether or not a retry rescued them).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from trident.sim.engine import RequestRecord, SimResult

__all__ = ["Summary", "percentile", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


@dataclass
class Summary:
    requests: int
    slo_attainment: float
    mean_latency_s: float
    p50_latency_s: float
    p95_latency_s: float
    p99_latency_s: float
    completed: int
    failed: int
    oom: int
    unfinished: int
    errors: dict[str, int] = field(default_factory=dict)
    oom_tasks: int = 0
    tasks: int = 0
    end_time_s: float = 0.0
    wall_s: float = 0.0
    policy_wall_s: float = 0.0
    policy_cpu_s: float = 0.0
    # Policy CPU time over simulated time: what share of a real-time scheduler's CPU
    # this policy would need at this scale (a live scheduler must stay well below 1).
    # CPU, not wall time: on a shared machine wall time counts other processes too.
    policy_time_share: float = 0.0
    events: int = 0
    stage_mean_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
        return out


def summarize(result: SimResult | Sequence[RequestRecord]) -> Summary:
    """Summarise a run (or a list of request records)."""
    records = result.records if isinstance(result, SimResult) else list(result)
    n = len(records)
    done = [r for r in records if r.status == "completed"]
    lat = [r.latency for r in done if r.latency is not None]
    met = sum(1 for r in records if r.met_slo)
    errors = Counter(r.error or "unfinished" for r in records if r.status != "completed")
    stage_sum: dict[str, float] = dict.fromkeys(
        ("queue", "encode", "diffuse", "decode", "transfer", "load"), 0.0
    )
    for r in done:
        for k in stage_sum:
            stage_sum[k] += float(r.timings.get(k, 0.0))
    s = Summary(
        requests=n,
        slo_attainment=met / n if n else math.nan,
        mean_latency_s=sum(lat) / len(lat) if lat else math.nan,
        p50_latency_s=percentile(lat, 50),
        p95_latency_s=percentile(lat, 95),
        p99_latency_s=percentile(lat, 99),
        completed=len(done),
        failed=n - len(done),
        oom=sum(1 for r in records if r.oom_tasks > 0),
        unfinished=sum(1 for r in records if r.status == "unfinished"),
        errors=dict(sorted(errors.items())),
        stage_mean_s={k: v / len(done) for k, v in stage_sum.items()} if done else {},
    )
    if isinstance(result, SimResult):
        s.oom_tasks = result.oom_tasks
        s.tasks = result.tasks
        s.end_time_s = result.end_time
        s.wall_s = result.wall_s
        s.policy_wall_s = result.policy_seconds
        s.policy_cpu_s = result.policy_cpu_seconds
        s.policy_time_share = (
            result.policy_cpu_seconds / result.end_time if result.end_time else 0.0
        )
        s.events = result.events
    return s
