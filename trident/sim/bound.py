"""An upper bound on SLO attainment for a trace on a cluster: the physical limit a
policy is measured against (``trident bench sim`` reports it beside the policies).

The relaxation keeps only what no schedule can escape, so every policy's attainment on
the same trace and cluster is at most the bound:

- preemptive fluid work: a request's diffuse steps may be split among degrees in any
  proportion and re-sharded between steps for free;
- no memory limit, no weight loads, no encode, decode or transfers (dropping work only
  loosens the bound);
- only diffuse time counts, from the cost model (``stage_seconds(..., "diffuse",
  shape, k)``) on the cluster's device speed; every degree the cost model supports
  (``supported_degrees``: powers of two) up to the model's ``max_degree`` and the node
  size.

LP: for request r and degree k, ``x[r,k]`` is the fraction of r's steps run at degree
k; ``y_r = Σ_k x[r,k] <= 1`` is its on-time share.

- time: ``Σ_k x[r,k]·T[r,k] <= (deadline_r - arrival_r)·y_r`` (steps run one after
  the other; ``T[r,k]`` is the whole diffuse at degree k);
- work: for every interval [s, e] of a family of intervals,
  ``Σ x[r,k]·k·T[r,k]`` over the requests arriving at or after s with deadlines at or
  before e is at most ``G·(e - s)`` (G devices);
- maximise ``Σ_r y_r``; the bound is that over the number of requests.

Any subset of intervals keeps the LP a valid relaxation; more intervals tighten it.
The family used here: lengths L = ``min_interval_s``·2^i up to the horizon (the last
one the whole horizon), each length's windows starting every L/``overlap`` seconds
from the first arrival — about 2·overlap·horizon/``min_interval_s`` constraints. Requests without a
deadline are not counted (as in the simulator's SLO attainment). With ``--noise``
the simulator's stage times differ from the cost model's; the bound uses the cost
model's (the expected times), so it is then an estimate, not a proof.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trident.sched.cost import supported_degrees
from trident.sched.solver import preload, solver_library
from trident.sched.types import CostModel, ModelInfo, RequestSpec

__all__ = ["AttainmentBound", "slo_attainment_bound"]


@dataclass
class AttainmentBound:
    bound: float  # upper bound on SLO attainment (on-time requests / requests)
    requests: int
    with_deadline: int
    intervals: int
    status: str  # "optimal", or why the bound is the trivial 1.0
    per_request: dict[str, float] = field(default_factory=dict)  # y_r


def slo_attainment_bound(
    requests: Sequence[RequestSpec],
    models: Mapping[str, ModelInfo],
    cost: CostModel,
    *,
    devices: int,
    gpus_per_node: int,
    speed: float = 1.0,
    min_interval_s: float = 15.0,
    overlap: int = 4,
    solver: str = "highs",
) -> AttainmentBound:
    """The LP bound (module docstring) for ``requests`` on ``devices`` devices."""
    timed = [r for r in requests if r.slo_s is not None and r.model in models]
    n = len(requests)
    if not timed or devices <= 0:
        return AttainmentBound(1.0 if n == 0 else 0.0, n, len(timed), 0, "empty")
    import mip

    preload(solver)  # once per process (trident.sched.solver: no hang in a later solve)
    m = mip.Model(sense=mip.MAXIMIZE, solver_name=solver_library(solver))
    m.verbose = 0
    m.threads = 1
    ys: dict[str, mip.Var] = {}
    work: list[tuple[float, float, mip.LinExpr]] = []  # (arrival, deadline, work expr)
    for r in timed:
        info = models[r.model]
        window = float(r.slo_s or 0.0)
        y = m.add_var(lb=0.0, ub=1.0)
        xs = []
        time_expr = mip.LinExpr()
        work_expr = mip.LinExpr()
        cap = max(1, min(info.max_degree, gpus_per_node))
        for k in supported_degrees(cost, info.family, r.shape, cap):
            t = float(cost.stage_seconds(info.family, "diffuse", r.shape, k)) / speed
            x = m.add_var(lb=0.0, ub=1.0)
            xs.append(x)
            time_expr.add_term(x, t)
            work_expr.add_term(x, k * t)
        m.add_constr(mip.xsum(xs) == y)
        m.add_constr(time_expr <= window * y)
        ys[r.request_id] = y
        work.append((r.arrival, r.arrival + window, work_expr))
    work.sort(key=lambda w: w[0])
    arrivals = [w[0] for w in work]
    first, last = arrivals[0], max(w[1] for w in work)
    horizon = last - first
    intervals = 0
    length = min(min_interval_s, horizon) if horizon > 0 else 0.0
    while length > 0:
        step = length / max(1, overlap)
        s = first
        while s < last:
            e = s + length
            lo = bisect.bisect_left(arrivals, s)
            hi = bisect.bisect_right(arrivals, e)  # arriving after e: ends after e too
            inside = [w[2] for w in work[lo:hi] if w[1] <= e]
            if inside:
                m.add_constr(mip.xsum(inside) <= devices * length)
                intervals += 1
            s += step
        if length >= horizon:
            break
        length = min(2 * length, horizon)
    m.objective = mip.xsum(ys.values())
    status = m.optimize()
    if status != mip.OptimizationStatus.OPTIMAL:
        return AttainmentBound(1.0, n, len(timed), intervals, status.name.lower())
    per = {rid: float(y.x or 0.0) for rid, y in ys.items()}
    return AttainmentBound(
        bound=min(1.0, sum(per.values()) / n),
        requests=n,
        with_deadline=len(timed),
        intervals=intervals,
        status="optimal",
        per_request=per,
    )
