"""The orchestrator: which stages each device holds (the placement plan).

MIP over (node, model, placement type) *counts*. Each device holds one placement type of
one served model (⟨EDC⟩ ⟨DC⟩ ⟨ED⟩ ⟨D⟩ primary, ⟨E⟩ ⟨C⟩ auxiliary). Demand is work:
device-seconds per second for each (model, stage), from the monitor's window of arrivals
(diffuse at the request's best efficient degree, times that degree).

Variables: integer ``y[n, m, t]`` devices of node n with type t of model m (only types
whose weights plus the peak activation of the largest windowed request fit the node's
smallest device); continuous flows ``f[m, t, s]``: device-seconds/s that type-t devices
of model m give to stage s (a ⟨EDC⟩ device splits its time between its stages);
``z``: the least capacity/demand ratio; ``u[n, m, t]``: devices newly given (m, t)
versus the current plan.

    max  z - move_penalty * Σu / N - comm_penalty * Σ comm(t) y / N
    s.t. Σ_{m,t} y[n,m,t] <= devices(n)                 (each device one type)
         Σ_s f[m,t,s] <= Σ_n speed(n) y[n,m,t]           (a type's time is shared)
         Σ_{t ∋ s} f[m,t,s] >= z · demand[m,s]           (max-min capacity / demand)
         Σ_{n, t ∋ s} y[n,m,t] >= 1 (every served stage has a home, when devices allow)
         u[n,m,t] >= y[n,m,t] - current[n,m,t]

That is ``objective="maxmin"``. The default ``objective="served"`` replaces z by
per-model ratios r[m] against a *requirement* (work / rho_max + largest degree) and
maximises Σ_m w[m]·min(1, r[m]) + secondary_weight·min_m r[m] (w: share of arrivals),
with every device assigned. With ``bind_aux`` (default) a primary type's encode/decode
flow is tied to its own diffuse flow (f[m,t,E] = f[m,t,D]·demand[m,E]/demand[m,D]): an
⟨EDC⟩ device encodes only what it diffuses, so ⟨D⟩ groups need ⟨E⟩/⟨C⟩ devices.

Nodes with the same device count, memory, speed and current plan are aggregated into
one class (integer counts over the class), so the model stays small at 128 devices.
The per-node packing then lays each node out: models with more primary devices first,
primary devices contiguous from index 0 (aligned degree-k groups of one model), then
auxiliary devices; devices keep their current (model, type) where the counts allow.

:func:`proportional_plan` is the paper's heuristic (virtual replicas in proportion to
demand), used as the fallback and as a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from trident.sched.cost import (
    activation_scale,
    best_degree,
    efficient_degrees,
    memo_table,
    model_weight_bytes,
)
from trident.sched.dispatcher import SolverName
from trident.sched.graph import PLACEMENT_TYPES, placement_type, stages_of_type
from trident.sched.solver import Clock, no_clock, optimize, preload, solver_library
from trident.sched.types import STAGES, CostModel, DeviceInfo, ModelInfo, Shape, Stage

__all__ = [
    "COMM_COST",
    "Demand",
    "OrchestratorConfig",
    "PlacementObjective",
    "PlacementResult",
    "PlacementSolver",
    "cover_models",
    "demand_from_window",
    "model_capacity_ratio",
    "orchestrate",
    "pack_nodes",
    "placement_solver",
    "plan_capacity_ratio",
    "plan_served",
    "proportional_plan",
    "requirement_factors",
    "served_weights",
    "type_fits",
    "type_load_seconds",
]

# Communication a type implies (stage hand-offs that cross devices), for tie-breaking.
COMM_COST: dict[str, float] = {"EDC": 0.0, "DC": 1.0, "ED": 1.0, "D": 2.0, "E": 1.0, "C": 1.0}

Demand = dict[str, dict[Stage, float]]  # model -> stage -> device-seconds per second

PlacementObjective = Literal["served", "maxmin"]
# "auto": HiGHS up to ``OrchestratorConfig.highs_max_devices`` devices, CBC above.
PlacementSolver = Literal["auto", "cbc", "highs"]


@dataclass
class OrchestratorConfig:
    # HiGHS proves this small MIP optimal fastest on small clusters (128 devices: p50 16
    # / p99 37 ms against CBC's 57 / 180), but its root node always computes an
    # analytic centre by interior point, which slows as the counts' bounds grow (1,024
    # devices: p50 98 / p99 218 ms against CBC's 55 / 90; bench/planner.md).
    solver: PlacementSolver = "auto"
    highs_max_devices: int = 256
    # Branch-and-bound nodes per solve: a deterministic budget (trident.sched.solver);
    # past it, the best incumbent found.
    max_nodes: int = 500
    move_penalty: float = 0.05
    comm_penalty: float = 0.01
    efficiency: float = 0.8
    use_mip: bool = True
    # Load cost of a move: a device newly given (model, type) cannot serve while it
    # loads that type's weights (``move_seconds[(model, type)]``); over a plan expected
    # to hold ``move_horizon_s`` that is a loss of ``speed * seconds / horizon`` device-
    # seconds per second of the model's capacity, charged in the objective's units (the
    # least capacity/demand ratio, were the model the bottleneck) times ``load_weight``.
    move_horizon_s: float = 300.0
    load_weight: float = 1.0
    # Objective. "served" (default): maximise the share of requests whose model gets the
    # capacity its latency needs, Σ_m w_m·min(1, capacity_m / requirement_m) (w_m: the
    # model's share of arrivals), with the least capacity/requirement ratio as a small
    # secondary term (``secondary_weight``); "maxmin": the least capacity/demand ratio
    # alone (the paper's objective; the previous default).
    objective: PlacementObjective = "served"
    # Requirement of a model (served objective): its work / ``rho_max`` (a stage class
    # run above ~70% utilisation queues far past a 2.5x SLO) plus, with
    # ``degree_headroom``, the largest degree one of its windowed requests runs at (one
    # big request in service must not hold up everything else).
    rho_max: float = 0.7
    degree_headroom: bool = True
    secondary_weight: float = 0.01
    # Aux stages on a primary device serve only that device's own requests: an ⟨EDC⟩
    # device encodes/decodes what it diffuses (merged tasks), never another group's
    # (the encode would queue behind a long diffuse: head-of-line blocking). Encode /
    # decode for ⟨D⟩ groups must come from ⟨E⟩ / ⟨C⟩ devices.
    bind_aux: bool = True


@dataclass
class PlacementResult:
    plan: dict[str, tuple[str, str] | None]  # device -> (model, type) or None (idle)
    ratio: float  # least capacity / demand (fluid estimate)
    solver: str  # "mip" | "proportional"
    ms: float
    reason: str = ""
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (node, model, type)
    # Served objective's value (share of requests whose model has its requirement), when
    # the plan was made with objective "served"; None otherwise.
    served: float | None = None
    # Co-located additions (:func:`cover_models`): device -> model -> stages, for models
    # whose stages the per-device plan left without a home.
    extra: dict[str, dict[str, frozenset[Stage]]] = field(default_factory=dict)

    def stages(self) -> dict[str, dict[str, frozenset[Stage]]]:
        """device -> model -> stages (the plan's type plus co-located additions)."""
        out: dict[str, dict[str, frozenset[Stage]]] = {}
        for d, mt in self.plan.items():
            out[d] = {mt[0]: stages_of_type(mt[1])} if mt else {}
        for d, add in self.extra.items():
            held = out.setdefault(d, {})
            for m, st in add.items():
                held[m] = held.get(m, frozenset()) | st
        return out

    def types(self) -> dict[str, dict[str, str]]:
        """device -> model -> placement type (several models per device after cover)."""
        return {
            d: {m: placement_type(st) for m, st in held.items()}
            for d, held in self.stages().items()
        }


def demand_from_window(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    window: Sequence[tuple[str, Shape]],
    window_s: float,
    efficiency: float = 0.8,
) -> Demand:
    """Device-seconds per second per (model, stage) from (model, shape) arrivals."""
    out: Demand = {m: dict.fromkeys(STAGES, 0.0) for m in models}
    # Per (family, shape, max degree): the arrival's (encode, k * diffuse at its best
    # degree k, decode) seconds, memoised on the cost model when it allows (the same
    # figures, summed in the same order: the demand is bit for bit the uncached one).
    memo = memo_table(cost, "arrival_work")
    for model, shape in window:
        info = models.get(model)
        if info is None:
            continue
        work = None
        if memo is not None:
            key = (info.family, shape, info.max_degree, efficiency)
            try:
                work = memo.get(key)
            except TypeError:
                memo = None
            if work is None:
                work = _arrival_work(cost, info, shape, efficiency)
                if memo is not None:
                    memo[key] = work
        else:
            work = _arrival_work(cost, info, shape, efficiency)
        st = out[model]
        st["encode"] += work[0]
        st["diffuse"] += work[1]
        st["decode"] += work[2]
    span = max(window_s, 1e-9)
    return {m: {s: v / span for s, v in st.items()} for m, st in out.items()}


def _arrival_work(
    cost: CostModel, info: ModelInfo, shape: Shape, efficiency: float
) -> tuple[float, float, float]:
    """(encode s, k * diffuse s at the best efficient degree k, decode s) of one arrival."""
    fam = info.family
    k = best_degree(cost, fam, shape, info.max_degree, efficiency)
    return (
        cost.stage_seconds(fam, "encode", shape),
        k * cost.stage_seconds(fam, "diffuse", shape, k),
        cost.stage_seconds(fam, "decode", shape),
    )


def _type_need(
    cost: CostModel, info: ModelInfo, ptype: str, shapes: Sequence[Shape], efficiency: float
) -> int:
    """Bytes a device of ``ptype`` needs: weights + the largest peak among ``shapes``
    (diffuse at the shape's largest efficient degree — the least memory per device)."""
    stages = stages_of_type(ptype)
    need = sum(model_weight_bytes(cost, info, s) for s in stages)
    return need + max((_stage_peak(cost, info, s, shapes, efficiency) for s in stages), default=0)


def _stage_peak(
    cost: CostModel, info: ModelInfo, stage: Stage, shapes: Sequence[Shape], efficiency: float
) -> int:
    """The largest activation peak of ``stage`` among ``shapes`` (diffuse at the shape's
    largest efficient degree — the least memory per device)."""
    fam = info.family
    peak = 0
    for shape in shapes:
        if stage == "diffuse":
            k = max(efficient_degrees(cost, fam, shape, info.max_degree, efficiency))
            p = cost.stage_peak_bytes(fam, stage, shape, k)
        else:
            p = cost.stage_peak_bytes(fam, stage, shape, 1)
        peak = max(peak, p)
    return int(activation_scale(info) * peak)


def type_fits(
    cost: CostModel,
    info: ModelInfo,
    ptype: str,
    memory: int,
    shapes: Sequence[Shape],
    efficiency: float = 0.8,
) -> bool:
    return _type_need(cost, info, ptype, shapes, efficiency) <= memory


@dataclass
class _NodeClass:
    nodes: list[str]
    count: int  # devices per node
    memory: int
    speed: float
    current: dict[tuple[str, str], int]  # summed over the class's nodes
    node_current: dict[str, dict[tuple[str, str], int]]  # node -> (model, type) -> devices


def _ordered(ptype: str) -> tuple[Stage, ...]:
    """A placement type's stages in pipeline order. Iterating ``stages_of_type``'s
    frozenset follows the string hash (PYTHONHASHSEED): the MIP's variable order, and
    so its choice among equal plans, would change from run to run."""
    st = stages_of_type(ptype)
    return tuple(s for s in STAGES if s in st)


def _classes(
    devices: Sequence[DeviceInfo], current: Mapping[str, tuple[str, str] | None]
) -> list[_NodeClass]:
    per_node: dict[str, list[DeviceInfo]] = {}
    for d in devices:
        per_node.setdefault(d.node_id, []).append(d)
    keyed: dict[tuple[object, ...], _NodeClass] = {}
    for node, devs in sorted(per_node.items()):
        cur: dict[tuple[str, str], int] = {}
        for d in devs:
            mt = current.get(d.device_id)
            if mt:
                cur[mt] = cur.get(mt, 0) + 1
        mem = min(d.memory_bytes for d in devs)
        speed = min(d.speed for d in devs)
        # The current plan is not part of the key: a class's move count is exact at the
        # class level (see _split_classes), so nodes with different current types
        # still aggregate — one class for a homogeneous cluster.
        key = (len(devs), mem, speed)
        cls = keyed.get(key)
        if cls is None:
            keyed[key] = _NodeClass([node], len(devs), mem, speed, {}, {})
            cls = keyed[key]
        else:
            cls.nodes.append(node)
        cls.node_current[node] = cur
        for mt, c in cur.items():
            cls.current[mt] = cls.current.get(mt, 0) + c
    return list(keyed.values())


def requirement_factors(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    demand: Demand,
    shapes: Mapping[str, Sequence[Shape]] | None = None,
    rho_max: float = 0.7,
    degree_headroom: bool = True,
    efficiency: float = 0.8,
) -> dict[str, float]:
    """Per model: requirement / work, where the requirement (device-seconds per second
    at speed 1) is ``work / rho_max`` plus, with ``degree_headroom``, the largest best
    degree among the model's windowed shapes. Capacity/requirement ≥ 1 means the model
    has the utilisation headroom a latency SLO needs, not just throughput."""
    shapes = shapes or {}
    rho = min(1.0, max(1e-3, rho_max))
    out: dict[str, float] = {}
    for m, st in demand.items():
        work = sum(st.values())
        if work <= 0:
            out[m] = 1.0 / rho
            continue
        extra = 0.0
        info = models.get(m)
        if degree_headroom and info is not None:
            extra = float(
                max(
                    (
                        best_degree(cost, info.family, sh, info.max_degree, efficiency)
                        for sh in dict.fromkeys(shapes.get(m, ()))
                    ),
                    default=0,
                )
            )
        out[m] = (work / rho + extra) / work
    return out


def served_weights(
    demand: Demand,
    shapes: Mapping[str, Sequence[Shape]] | None = None,
    rates: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per model: its share of requests (``rates`` in req/s when given, else the number
    of windowed shapes); models with no requests weigh 0. With neither, every model
    with demand weighs the same. Sums to 1 (or all 0 without demand)."""
    shapes = shapes or {}
    if rates is None and not any(shapes.get(m) for m in demand):
        busy = [m for m, st in demand.items() if sum(st.values()) > 0]
        return {m: (1.0 / len(busy) if m in busy else 0.0) for m in demand}
    raw = {
        m: float((rates or {}).get(m, 0.0)) if rates is not None else float(len(shapes.get(m, ())))
        for m in demand
    }
    tot = sum(raw.values())
    return {m: v / tot if tot > 0 else 0.0 for m, v in raw.items()}


def model_capacity_ratio(
    types: Mapping[str, float],
    dem: Mapping[Stage, float],
    bind_aux: bool = True,
    iters: int = 40,
) -> float:
    """One model's capacity/demand given type -> devices (speed-weighted). With
    ``bind_aux`` a primary device's encode/decode serve only the requests it diffuses
    (see :class:`OrchestratorConfig`); else every holder's time is fluid (max-flow)."""
    dem = {s: v for s, v in dem.items() if v > 0}
    if not dem:
        return math.inf
    types = {t: c for t, c in types.items() if c > 0}
    if not types:
        return 0.0
    if not bind_aux or dem.get("diffuse", 0.0) <= 0:
        return plan_capacity_ratio({("m", t): c for t, c in types.items()}, {"m": dict(dem)})
    dd = dem["diffuse"]
    de, dc = dem.get("encode", 0.0), dem.get("decode", 0.0)
    ae, ac = de / dd, dc / dd  # aux seconds per diffuse second

    def dcap(t: str) -> float:  # diffuse a primary type can give, its own aux included
        st = stages_of_type(t)
        return types.get(t, 0.0) / (
            1.0 + (ae if "encode" in st else 0.0) + (ac if "decode" in st else 0.0)
        )

    cap_e, cap_c = types.get("E", 0.0), types.get("C", 0.0)

    def feasible(r: float) -> bool:
        need_d = r * dd
        if sum(dcap(t) for t in ("EDC", "ED", "DC", "D")) < need_d - 1e-12:
            return False
        # Diffuse needing its encode (decode) from an aux device is ≤ cap_e/ae (cap_c/ac).
        need_e = need_d - (cap_e / ae if ae > 0 else math.inf)  # diffuse on encode holders
        need_c = need_d - (cap_c / ac if ac > 0 else math.inf)
        a = min(dcap("EDC"), need_d)
        b = min(dcap("ED"), max(0.0, need_e - a))
        c = min(dcap("DC"), max(0.0, need_c - a))
        if a + b < need_e - 1e-12 or a + c < need_c - 1e-12:
            return False
        return a + b + c <= need_d + 1e-12

    lo, hi = 0.0, sum(types.values()) / min(dem.values()) + 1.0
    if not feasible(1e-12):
        return 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan_served(
    counts: Mapping[tuple[str, str], float],
    demand: Demand,
    factors: Mapping[str, float],
    weights: Mapping[str, float],
    bind_aux: bool = True,
) -> tuple[float, float, dict[str, float]]:
    """(served, least capacity/requirement, per-model capacity/demand) of a plan given
    as (model, type) -> devices: served = Σ_m w_m·min(1, ratio_m / factor_m)."""
    ratios: dict[str, float] = {}
    for m, st in demand.items():
        if sum(st.values()) <= 0:
            continue
        types = {t: c for (mm, t), c in counts.items() if mm == m}
        ratios[m] = model_capacity_ratio(types, st, bind_aux)
    served = sum(weights.get(m, 0.0) * min(1.0, r / factors.get(m, 1.0)) for m, r in ratios.items())
    least = min((r / factors.get(m, 1.0) for m, r in ratios.items()), default=math.inf)
    return served, least, ratios


def plan_capacity_ratio(
    counts: Mapping[tuple[str, str], float],
    demand: Demand,
    speed: float = 1.0,
    iters: int = 30,
) -> float:
    """Least capacity/demand of a plan given as (model, type) -> devices (fluid LP solved
    greedily is not exact; this is the exact LP via max-flow bisection)."""
    import networkx as nx

    models = {m for m, _ in counts} | {
        m for m, st in demand.items() if any(v > 0 for v in st.values())
    }
    ratio = math.inf
    for m in models:
        dem = {s: v for s, v in demand.get(m, {}).items() if v > 0}
        if not dem:
            continue
        types = {t: c for (mm, t), c in counts.items() if mm == m and c > 0}
        if not types:
            return 0.0
        lo, hi = 0.0, sum(types.values()) * speed / min(dem.values()) + 1.0
        for _ in range(iters):
            mid = (lo + hi) / 2
            g = nx.DiGraph()
            for t, c in types.items():
                g.add_edge("src", t, capacity=c * speed)
                for s in _ordered(t):
                    if s in dem:
                        g.add_edge(t, s, capacity=math.inf)
            for s, v in dem.items():
                g.add_edge(s, "dst", capacity=mid * v)
            need = mid * sum(dem.values())
            if "src" in g and "dst" in g and nx.maximum_flow_value(g, "src", "dst") >= need - 1e-9:
                lo = mid
            else:
                hi = mid
        ratio = min(ratio, lo)
    return ratio


def orchestrate(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    devices: Sequence[DeviceInfo],
    demand: Demand,
    shapes: Mapping[str, Sequence[Shape]] | None = None,
    current: Mapping[str, tuple[str, str] | None] | None = None,
    config: OrchestratorConfig | None = None,
    move_seconds: Mapping[tuple[str, str], float] | None = None,
    rates: Mapping[str, float] | None = None,
    clock: Clock = no_clock,
) -> PlacementResult:
    """A placement plan for ``devices``; MIP with the proportional heuristic as fallback.

    ``move_seconds[(model, type)]``: seconds a device needs to load that type's weights
    (:func:`type_load_seconds`); it raises the MIP's penalty on giving a device that
    type (see :class:`OrchestratorConfig`). Without it, moves cost ``move_penalty`` only.
    ``rates``: requests per second per model (the served objective's weights; default:
    the number of windowed shapes per model).
    """
    cfg = config or OrchestratorConfig()
    solver = placement_solver(cfg, len(devices))
    if cfg.use_mip:
        preload(solver)  # once per process
    t0 = clock()  # for the logs only (res.ms)
    current = current or {}
    shapes = shapes or {}
    weights = served_weights({m: demand.get(m, {}) for m in models}, shapes, rates)
    demand = _with_prior(demand, models)
    res: PlacementResult | None = None
    if cfg.use_mip:
        res = _mip_plan(
            cost, models, devices, demand, shapes, current, cfg, move_seconds or {}, weights
        )
    if res is None:
        res = proportional_plan(cost, models, devices, demand, shapes, current, cfg.efficiency)
        res.reason = res.reason or ("fallback" if cfg.use_mip else "configured")
    cover_models(cost, models, devices, res, shapes, cfg.efficiency, demand)
    res.ms = (clock() - t0) * 1e3
    return res


def cover_models(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    devices: Sequence[DeviceInfo],
    result: PlacementResult,
    shapes: Mapping[str, Sequence[Shape]] | None = None,
    efficiency: float = 0.8,
    demand: Demand | None = None,
) -> None:
    """Post-pass: every served model gets a home for each of its stages, when memory
    allows, by co-locating it on devices that already hold another model's stages.

    The MIP gives each device one (model, type), so with fewer devices than models (or a
    plan that starves a no-demand model) some stages have no device. For each model
    (busiest first) the stages nobody holds go, all together if possible (one ⟨EDC⟩-like
    home, merged tasks), else one by one, to the device with the most memory left
    after them: weights of everything it holds plus the largest activation peak among
    what it holds (stages run one at a time, so peaks do not add). Stages that fit
    nowhere stay homeless; the policy places them on dispatch (with eviction).
    Results go to ``result.extra``; ``result.plan`` (the MIP's per-device type) is kept.
    """
    shapes = shapes or {}
    uniq = {m: list(dict.fromkeys(shapes.get(m, ()))) for m in models}
    held = result.stages()
    wt: dict[tuple[str, Stage], int] = {}
    pk: dict[tuple[str, Stage], int] = {}
    for m, info in models.items():
        for s in STAGES:
            wt[m, s] = model_weight_bytes(cost, info, s)
            pk[m, s] = _stage_peak(cost, info, s, uniq[m], efficiency)
    mem = {d.device_id: d.memory_bytes for d in devices}
    used_w: dict[str, int] = {}
    used_p: dict[str, int] = {}
    covered: set[tuple[str, Stage]] = set()
    for d in mem:
        ms = held.get(d, {})
        used_w[d] = sum(wt.get((m, s), 0) for m, st in ms.items() for s in st)
        used_p[d] = max((pk.get((m, s), 0) for m, st in ms.items() for s in st), default=0)
        covered |= {(m, s) for m, st in ms.items() for s in st}
    work = {m: sum((demand or {}).get(m, {}).values()) for m in models}
    for m in sorted(models, key=lambda m: (-work[m], m)):
        missing = [s for s in STAGES if (m, s) not in covered]
        if not missing:
            continue
        batches = [missing] + ([[s] for s in missing] if len(missing) > 1 else [])
        for batch in batches:
            if any((m, s) in covered for s in batch):
                continue
            w = sum(wt[m, s] for s in batch)
            p = max(pk[m, s] for s in batch)
            best: tuple[int, int, str] | None = None
            for d in mem:
                slack = mem[d] - used_w[d] - w - max(used_p[d], p)
                if slack < 0:
                    continue
                key = (-slack, len(held.get(d, {})), d)
                if best is None or key < best:
                    best = key
            if best is None:
                continue
            d = best[2]
            add = frozenset(batch)
            held.setdefault(d, {})
            held[d][m] = held[d].get(m, frozenset()) | add
            ext = result.extra.setdefault(d, {})
            ext[m] = ext.get(m, frozenset()) | add
            used_w[d] += w
            used_p[d] = max(used_p[d], p)
            covered |= {(m, s) for s in batch}


def type_load_seconds(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    source: Mapping[tuple[str, Stage], str] | None = None,
) -> dict[tuple[str, str], float]:
    """Seconds a device needs to load each (model, placement type)'s weights: the sum of
    ``cost.load_seconds(family, stage, source)`` over the type's stages, each stage's
    source from ``source[(model, stage)]`` (default "disk")."""
    source = source or {}
    out: dict[tuple[str, str], float] = {}
    for m, info in models.items():
        per = {s: cost.load_seconds(info.family, s, source.get((m, s), "disk")) for s in STAGES}
        for t in PLACEMENT_TYPES:
            out[m, t] = sum(per[s] for s in _ordered(t))
    return out


def _with_prior(demand: Demand, models: Mapping[str, ModelInfo]) -> Demand:
    """Models with no demand in the window get a small prior (E:D:C = 5:85:10 of 1% of
    the busiest model's work), so every served model keeps a home."""
    total = max((sum(st.values()) for st in demand.values()), default=0.0)
    base = 0.01 * total if total > 0 else 1.0
    out: Demand = {}
    for m in models:
        st = demand.get(m, {})
        if sum(st.values()) > 0:
            out[m] = {s: float(st.get(s, 0.0)) for s in STAGES}
        else:
            out[m] = {"encode": 0.05 * base, "diffuse": 0.85 * base, "decode": 0.10 * base}
    return out


def placement_solver(cfg: OrchestratorConfig, n_devices: int) -> SolverName:
    """The solver a placement MIP over ``n_devices`` devices uses (resolves "auto")."""
    if cfg.solver == "auto":
        return "highs" if n_devices <= cfg.highs_max_devices else "cbc"
    return cfg.solver


def _needs(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    shapes: Mapping[str, Sequence[Shape]],
    efficiency: float,
) -> dict[tuple[str, str], int]:
    """Bytes each (model, type) needs per device; shapes deduplicated first."""
    out = {}
    for m, info in models.items():
        uniq = list(dict.fromkeys(shapes.get(m, ())))
        for t in PLACEMENT_TYPES:
            out[m, t] = _type_need(cost, info, t, uniq, efficiency)
    return out


def _mip_plan(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    devices: Sequence[DeviceInfo],
    demand: Demand,
    shapes: Mapping[str, Sequence[Shape]],
    current: Mapping[str, tuple[str, str] | None],
    cfg: OrchestratorConfig,
    move_seconds: Mapping[tuple[str, str], float] | None = None,
    weights: Mapping[str, float] | None = None,
) -> PlacementResult | None:
    try:
        import mip
    except ImportError:  # pragma: no cover
        return None
    classes = _classes(devices, current)
    needs = _needs(cost, models, shapes, cfg.efficiency)
    n_dev = max(1, len(devices))
    served_mode = cfg.objective == "served"
    factors: dict[str, float] = {}
    weights = dict(weights or {})
    if served_mode:
        # Unscaled: ratios are capacity / requirement (device-seconds per second).
        factors = requirement_factors(
            cost, models, demand, shapes, cfg.rho_max, cfg.degree_headroom, cfg.efficiency
        )
        scale = 1.0
    else:
        scale = max(max(st.values()) for st in demand.values()) or 1.0
    dem = {
        m: {s: v * factors.get(m, 1.0) / scale for s, v in st.items() if v > 0}
        for m, st in demand.items()
    }
    move_seconds = move_seconds or {}
    horizon = max(cfg.move_horizon_s, 1e-9)
    try:
        solver = placement_solver(cfg, len(devices))
        mdl = mip.Model(sense=mip.MAXIMIZE, solver_name=solver_library(solver))
        mdl.verbose = 0
        mdl.threads = 1
        z = mdl.add_var(lb=0.0, ub=1e6)
        y: dict[tuple[int, str, str], mip.Var] = {}
        allowed_any: dict[str, set[str]] = {m: set() for m in models}
        # served: per model r (capacity / requirement) and s = min(1, r); z ≤ every r.
        r_var: dict[str, mip.Var] = {}
        if served_mode:
            obj = mip.LinExpr() + cfg.secondary_weight * z
            for m in dem:
                r_var[m] = mdl.add_var(lb=0.0, ub=1e6)
                mdl.add_constr(z <= r_var[m])
                if weights.get(m, 0.0) > 0:
                    sv = mdl.add_var(lb=0.0, ub=1.0)
                    mdl.add_constr(sv <= r_var[m])
                    obj += weights[m] * sv
        else:
            obj = mip.LinExpr() + z
        for ci, cls in enumerate(classes):
            allowed = [mt for mt, need in needs.items() if need <= cls.memory]
            cap = cls.count * len(cls.nodes)
            for m, t in allowed:
                v = mdl.add_var(var_type=mip.INTEGER, lb=0, ub=cap)
                y[ci, m, t] = v
                allowed_any[m].add(t)
                obj -= cfg.comm_penalty * COMM_COST[t] / n_dev * v
                cur = cls.current.get((m, t), 0)
                u = mdl.add_var(lb=0.0)
                mdl.add_constr(u >= v - cur)
                # z is the least ratio x scale; a device of speed `sp` loading for L s
                # out of the horizon costs model m (were it the bottleneck) about
                # sp * L / H / (m's scaled work) of z.
                # (served: the same loss in requirement units, times the model's weight.)
                load_s = move_seconds.get((m, t), 0.0)
                work = sum(dem.get(m, {}).values())
                load_pen = 0.0
                if load_s > 0 and work > 0:
                    load_pen = cfg.load_weight * cls.speed * (load_s / horizon) / work
                    load_pen = min(load_pen, 1.0)  # never more than a whole scaled unit
                    if served_mode:
                        load_pen *= weights.get(m, 0.0) + cfg.secondary_weight
                obj -= (cfg.move_penalty / n_dev + load_pen) * u
            vs = [y[ci, m, t] for m, t in allowed]
            if vs and served_mode:
                # Every device serves something: a spare device is headroom (secondary
                # term), and keeping a device's current type costs nothing.
                mdl.add_constr(mip.xsum(vs) == cap)
            elif vs:
                mdl.add_constr(mip.xsum(vs) <= cap)
        for m, st in dem.items():
            f: dict[tuple[str, Stage], mip.Var] = {}
            bind = cfg.bind_aux and st.get("diffuse", 0.0) > 0
            for t in sorted(allowed_any[m]):
                ss = [s for s in _ordered(t) if s in st]
                fs = []
                for s in ss:
                    f[t, s] = mdl.add_var(lb=0.0)
                    fs.append(f[t, s])
                supply = mip.xsum(
                    classes[ci].speed * v for (ci, mm, tt), v in y.items() if mm == m and tt == t
                )
                if fs:
                    mdl.add_constr(mip.xsum(fs) <= supply)
                if bind and "diffuse" in ss:
                    # A primary's encode/decode serve only what it diffuses.
                    for s in ss:
                        if s != "diffuse":
                            mdl.add_constr(f[t, s] == f[t, "diffuse"] * (st[s] / st["diffuse"]))
            target = r_var.get(m, z)
            for s, v in st.items():
                mdl.add_constr(mip.xsum(f[t, ss] for (t, ss) in f if ss == s) >= v * target)
        # Every stage of every model has a home, when there are enough devices for it.
        if len(devices) >= 3 * len(models) or (
            len(devices) >= len(models) and all("EDC" in allowed_any[m] for m in models)
        ):
            for m in models:
                for s in STAGES:
                    vs = [v for (_, mm, t), v in y.items() if mm == m and s in stages_of_type(t)]
                    if vs:
                        mdl.add_constr(mip.xsum(vs) >= 1)
        mdl.objective = obj
        status = optimize(mdl, cfg.max_nodes)
    except Exception:
        return None
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return None
    counts_cls: dict[tuple[int, str, str], int] = {
        key: round(v.x or 0.0) for key, v in y.items() if (v.x or 0.0) > 0.5
    }
    node_counts = _split_classes(classes, counts_cls)
    plan = pack_nodes(devices, node_counts, current)
    ratio = (z.x or 0.0) / scale
    served: float | None = None
    if served_mode:
        type_counts: dict[tuple[str, str], float] = {}
        for (ci, m, t), c in counts_cls.items():
            type_counts[m, t] = type_counts.get((m, t), 0.0) + c * classes[ci].speed
        served, _, per = plan_served(type_counts, demand, factors, weights, cfg.bind_aux)
        ratio = min(per.values(), default=0.0)  # least capacity / demand
    return PlacementResult(
        plan=plan,
        ratio=ratio,
        solver="mip",
        ms=0.0,
        reason="optimal" if status == mip.OptimizationStatus.OPTIMAL else "feasible",
        counts=node_counts,
        served=served,
    )


def _split_classes(
    classes: Sequence[_NodeClass], counts: Mapping[tuple[int, str, str], int]
) -> dict[tuple[str, str, str], int]:
    """Spread a class's counts over its nodes: whole blocks first (a model's primary
    devices stay together on as few nodes as possible), then remainders."""
    out: dict[tuple[str, str, str], int] = {}
    for ci, cls in enumerate(classes):
        free = dict.fromkeys(cls.nodes, cls.count)
        items = sorted(
            ((m, t, c) for (cj, m, t), c in counts.items() if cj == ci),
            key=lambda x: (-x[2], x[0], PLACEMENT_TYPES.index(x[1])),
        )
        # Current types stay on the nodes that have them (so the devices that change
        # are exactly sum(max(0, y - current)) over the class, as the MIP counted).
        for m, t, c in list(items):
            left = c
            for n in cls.nodes:
                keep = min(cls.node_current[n].get((m, t), 0), free[n], left)
                if keep > 0:
                    out[n, m, t] = out.get((n, m, t), 0) + keep
                    free[n] -= keep
                    left -= keep
            items[items.index((m, t, c))] = (m, t, left)
        for m, t, c in items:
            left = c
            for n in sorted(cls.nodes, key=lambda n: -free[n]):
                if left <= 0:
                    break
                take = min(free[n], left)
                if take > 0:
                    out[n, m, t] = out.get((n, m, t), 0) + take
                    free[n] -= take
                    left -= take
    return out


def pack_nodes(
    devices: Sequence[DeviceInfo],
    counts: Mapping[tuple[str, str, str], int],
    current: Mapping[str, tuple[str, str] | None] | None = None,
) -> dict[str, tuple[str, str] | None]:
    """Concrete device -> (model, type) from per-node counts. Primary devices of a model
    are laid out contiguously from the lowest index (aligned groups), models with more
    primaries first; a device keeps its current (model, type) when that type's slot
    range on the node contains it."""
    current = current or {}
    plan: dict[str, tuple[str, str] | None] = {d.device_id: None for d in devices}
    per_node: dict[str, list[DeviceInfo]] = {}
    for d in devices:
        per_node.setdefault(d.node_id, []).append(d)
    for node, devs in per_node.items():
        devs = sorted(devs, key=lambda d: (d.index, d.device_id))
        want = {(m, t): c for (n, m, t), c in counts.items() if n == node and c > 0}
        prim: dict[str, int] = {}
        for (m, t), c in want.items():
            if "D" in t:
                prim[m] = prim.get(m, 0) + c
        order: list[tuple[str, str]] = []
        for m in sorted(prim, key=lambda m: (-prim[m], m)):
            order += [(m, t) for t in ("EDC", "ED", "DC", "D") if (m, t) in want]
        order += sorted(((m, t) for (m, t) in want if "D" not in t), key=lambda x: (x[0], x[1]))
        slots: list[tuple[str, str]] = []
        for mt in order:
            slots += [mt] * want[mt]
        slots = slots[: len(devs)]
        # Within a model's primary block, keep devices on their current type if possible.
        for i, d in enumerate(devs):
            plan[d.device_id] = slots[i] if i < len(slots) else None
        _stabilise(devs, plan, current)
    return plan


def _stabilise(
    devs: Sequence[DeviceInfo],
    plan: dict[str, tuple[str, str] | None],
    current: Mapping[str, tuple[str, str] | None],
) -> None:
    """Swap types between devices of the same model block so that fewer devices change
    (same model, both primary or both auxiliary: group alignment is unchanged)."""
    ids = [d.device_id for d in devs]
    for i, a in enumerate(ids):
        if plan[a] == current.get(a) or plan[a] is None:
            continue
        want = current.get(a)
        if want is None:
            continue
        for b in ids[i + 1 :]:
            pb, pa = plan[b], plan[a]
            if (
                pb == want
                and pa is not None
                and pa[0] == pb[0]
                and ("D" in pa[1]) == ("D" in pb[1])
                and plan[b] != current.get(b)
            ):
                plan[a], plan[b] = pb, pa
                break


def proportional_plan(
    cost: CostModel,
    models: Mapping[str, ModelInfo],
    devices: Sequence[DeviceInfo],
    demand: Demand,
    shapes: Mapping[str, Sequence[Shape]] | None = None,
    current: Mapping[str, tuple[str, str] | None] | None = None,
    efficiency: float = 0.8,
) -> PlacementResult:
    """The paper's heuristic: per model, the least-communication virtual replica whose
    memory fits (V0=⟨EDC⟩, V1=⟨DC⟩+⟨E⟩, V2=⟨ED⟩+⟨C⟩, V3=⟨D⟩+⟨E⟩+⟨C⟩); devices shared
    among models in proportion to demand; within a replica, primary vs auxiliary devices
    split by stage work; then packed per node (each node's devices go to the models in
    proportion too, so every node can form aligned groups)."""
    shapes = shapes or {}
    demand = _with_prior(demand, models)
    n = len(devices)
    mem = min((d.memory_bytes for d in devices), default=0)
    replicas: tuple[tuple[str, ...], ...] = (("EDC",), ("DC", "E"), ("ED", "C"), ("D", "E", "C"))
    chosen: dict[str, tuple[str, ...]] = {}
    needs = _needs(cost, models, shapes, efficiency)
    for m in models:
        for rep in replicas:
            if all(needs[m, t] <= mem for t in rep):
                chosen[m] = rep
                break
    work = {m: sum(demand[m].values()) for m in chosen}
    total = sum(work.values()) or 1.0
    shares = _largest_remainder({m: work[m] / total * n for m in chosen}, n, minimum=1)
    type_counts: dict[tuple[str, str], int] = {}
    for m, rep in chosen.items():
        dem = demand[m]
        if len(rep) == 1:
            split = {rep[0]: float(shares[m])}
        else:
            w = {}
            for t in rep:
                w[t] = sum(dem[s] for s in _ordered(t))
            tw = sum(w.values()) or 1.0
            split = {t: w[t] / tw * shares[m] for t in rep}
        cnt = _largest_remainder(split, shares[m], minimum=1 if shares[m] >= len(rep) else 0)
        for t, c in cnt.items():
            if c:
                type_counts[m, t] = c
    # Per node: deal devices type by type, round-robin over nodes, so models spread.
    nodes = sorted({d.node_id for d in devices})
    cap = {nd: sum(1 for d in devices if d.node_id == nd) for nd in nodes}
    counts: dict[tuple[str, str, str], int] = {}
    for (m, t), c in sorted(type_counts.items(), key=lambda x: (-x[1], x[0])):
        left = c
        # fill nodes with the most room first, whole blocks
        for nd in sorted(nodes, key=lambda nd: -cap[nd]):
            if left <= 0:
                break
            take = min(cap[nd], left)
            if take:
                counts[nd, m, t] = counts.get((nd, m, t), 0) + take
                cap[nd] -= take
                left -= take
    plan = pack_nodes(devices, counts, current)
    ratio = plan_capacity_ratio(type_counts, demand) if type_counts else 0.0
    return PlacementResult(
        plan=plan,
        ratio=ratio,
        solver="proportional",
        ms=0.0,  # timed by orchestrate() when it is the fallback
        counts=counts,
    )


def _largest_remainder(shares: Mapping[str, float], total: int, minimum: int = 0) -> dict[str, int]:
    keys = list(shares)
    if not keys:
        return {}
    out = {k: max(minimum, math.floor(shares[k])) for k in keys}
    while sum(out.values()) > total:
        k = max(
            (k for k in keys if out[k] > minimum), key=lambda k: out[k] - shares[k], default=None
        )
        if k is None:
            k = max(keys, key=lambda k: out[k])
            if out[k] == 0:
                break
        out[k] -= 1
    rem = sorted(keys, key=lambda k: -(shares[k] - math.floor(shares[k])))
    i = 0
    while sum(out.values()) < total and rem:
        out[rem[i % len(rem)]] += 1
        i += 1
    return out
