"""Baseline policies behind the same Policy interface (for honest comparison).

- ``b1`` :class:`StaticFifoPolicy` — xDiT-style static pipeline-level FIFO: every device
  holds a whole pipeline (⟨EDC⟩ of one model), devices are split into fixed instances of
  degree ``degree``; each instance serves its model's requests first-come-first-served,
  all stages merged in one task.
- ``b4`` :class:`PipelineSrtfPolicy` — dynamic pipeline-level SRTF: whole pipelines per
  device, each request (shortest remaining time first) takes its best efficient degree
  on any free aligned group of its model's devices, all stages in one task.
- ``b6`` :class:`StageSrtfPolicy` — dynamic stage-level SRTF with a manual split: each
  model's devices are split ⟨D⟩:⟨E⟩:⟨C⟩ by ``split`` (default 6:1:1 per 8); each stage
  is its own task: encode / decode on the earliest-free ⟨E⟩ / ⟨C⟩, diffuse at the best
  efficient degree on a free aligned ⟨D⟩ group.
- ``authors`` :class:`AuthorsPolicy` — the TridentServe authors' public dispatch: an
  SP-degree ILP over *diffuse time only*: binary x[r, k, machine], per machine
  Σ k·x + slack = free devices, maximise Σ reward·x - Σ slack, reward 1000 if on time
  else growing with lateness, (t1/tk)/k >= 0.8, hard-coded memory rules (>= 2048²
  images need k >= 2; 720p videos longer than 65 frames need k >= 4); whole pipelines
  on every device (their code's placement is static), all stages merged.

Placement for the pipeline-level baselines: each model gets aligned blocks of devices
(whole nodes when there are at least as many nodes as models) in proportion to
``shares`` (default equal).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from trident.sched.core import CoreConfig, DeviceState, RequestState
from trident.sched.cost import best_degree, efficient_degrees, model_peak_bytes
from trident.sched.dispatcher import SolverName
from trident.sched.placed import PlacedPolicy, Placement, core_aliases
from trident.sched.solver import optimize, preload, solver_library
from trident.sched.types import STAGES, Command, CostModel, DeviceInfo, LogEvent, ModelInfo, Stage

__all__ = [
    "AuthorsConfig",
    "AuthorsPolicy",
    "BaselineConfig",
    "PipelineSrtfPolicy",
    "StageSplitConfig",
    "StageSrtfPolicy",
    "StaticFifoConfig",
    "StaticFifoPolicy",
    "model_blocks",
]


@dataclass
class BaselineConfig:
    """A pipeline-level baseline's configuration (``b4``; the others extend it): the
    core's settings as the ``core`` section (flat option names too: ``max_queue``),
    and the model -> device share of the placement."""

    # baselines do not pre-queue: one task per device at a time
    core: CoreConfig = field(default_factory=lambda: CoreConfig(max_inflight_per_device=1))
    shares: Mapping[str, float] = field(default_factory=dict)  # model -> device share

    ALIASES: ClassVar[Mapping[str, tuple[str, ...]]] = core_aliases()


@dataclass
class StaticFifoConfig(BaselineConfig):
    """``b1``: fixed instances of ``degree`` devices."""

    degree: int = 1


@dataclass
class StageSplitConfig(BaselineConfig):
    """``b6``: each model block split ⟨D⟩:⟨E⟩:⟨C⟩ by ``split``."""

    split: tuple[int, int, int] = (6, 1, 1)  # D : E : C devices per block


@dataclass
class AuthorsConfig(BaselineConfig):
    """``authors``: the SP-degree ILP's budget, pacing and solver."""

    # Theirs has no limit; a generous deterministic one (trident.sched.solver).
    max_nodes: int = 10_000
    min_interval_s: float = 0.0  # theirs: 0.5 s between solves (needs Ticks to advance)
    solver: SolverName = "cbc"


def model_blocks(
    devices: Sequence[DeviceInfo], models: Sequence[str], shares: Mapping[str, float]
) -> dict[str, list[list[DeviceInfo]]]:
    """Aligned device blocks per model: whole nodes if nodes >= models, else each node
    is cut into the largest power-of-two blocks that give every model one."""
    per_node: dict[str, list[DeviceInfo]] = {}
    for d in devices:
        per_node.setdefault(d.node_id, []).append(d)
    if not models or not per_node:
        return {m: [] for m in models}
    size = max(len(v) for v in per_node.values())
    nodes = len(per_node)
    block = size
    while block > 1 and nodes * (size // block) < len(models):
        block //= 2
    blocks: list[list[DeviceInfo]] = []
    for _, devs in sorted(per_node.items()):
        devs = sorted(devs, key=lambda d: d.index)
        for j in range(0, len(devs), block):
            blocks.append(devs[j : j + block])
    weights = {m: float(shares.get(m, 1.0)) for m in models}
    total = sum(weights.values()) or 1.0
    out: dict[str, list[list[DeviceInfo]]] = {m: [] for m in models}
    got = dict.fromkeys(models, 0)
    # Interleave across nodes so each model is spread (deficit round robin).
    order = sorted(range(len(blocks)), key=lambda i: (i % max(1, size // block), i))
    for i in order:
        n_assigned = sum(got.values()) + len(blocks[i])
        m = max(models, key=lambda m: (weights[m] / total * n_assigned - got[m], -models.index(m)))
        out[m].append(blocks[i])
        got[m] += len(blocks[i])
    return out


class _PipelineBase(PlacedPolicy):
    """Whole pipelines (⟨EDC⟩) per device, model blocks by share."""

    def __init__(
        self, models: Mapping[str, ModelInfo], cost: CostModel, config: BaselineConfig
    ) -> None:
        self.bconfig = config
        super().__init__(models, cost, config.core)
        self._round_free: dict[tuple[str, int], list[tuple[str, ...]]] = {}
        self._groups_cache: dict[tuple[str, int], list[tuple[str, ...]]] = {}
        self._groups_version = -1
        self._remaining: dict[tuple[str, int], float] = {}

    def compute_placement(self, now: float) -> Placement:
        blocks = model_blocks(self.graph.devices(), list(self.models), self.bconfig.shares)
        out: Placement = {}
        for m, bl in blocks.items():
            for b in bl:
                for d in b:
                    out[d.device_id] = {m: frozenset(STAGES)}
        return out

    def _begin_plan(self) -> None:
        """Start of a dispatch round: free groups are computed once per (model, k) per
        round and shrink as tasks are issued (nothing frees up inside a round)."""
        self._round_free = {}

    def _model_groups(self, model: str, k: int) -> list[tuple[str, ...]]:
        """Aligned degree-k groups of up devices that all hold ``model``'s diffuse
        stage; cached until the graph (membership, up state, placement) changes."""
        cache = self._groups_cache
        if self._groups_version != self.graph.version:
            cache = self._groups_cache = {}
            self._groups_version = self.graph.version
        got = cache.get((model, k))
        if got is None:
            got = cache[model, k] = [
                grp
                for grp in self.graph.instances(k)
                if all(self.graph.holds(d, model, "diffuse") for d in grp)
            ]
        return got

    def free_groups(self, model: str, k: int) -> list[tuple[str, ...]]:
        limit = self.config.max_inflight_per_device
        devs = self.devices
        round_free = self._round_free
        prev = round_free.get((model, k))
        src = prev if prev is not None else self._model_groups(model, k)
        out = [grp for grp in src if all(d in devs and len(devs[d].inflight) < limit for d in grp)]
        round_free[model, k] = out
        return out

    def _any_free(self) -> bool:
        """Whether some up device can take a task (else a round has nothing to do)."""
        limit = self.config.max_inflight_per_device
        return any(st.up and len(st.inflight) < limit for st in self.devices.values())

    def remaining(self, req: RequestState) -> float:
        key = (req.request_id, len(req.pending_stages))
        cache = self._remaining
        got = cache.get(key)
        if got is None:
            if len(cache) > 65536:
                cache.clear()
            got = cache[key] = self._remaining_of(req)
        return got

    def _remaining_of(self, req: RequestState) -> float:
        info = self.models[req.spec.model]
        k = best_degree(
            self.cost, req.family, req.spec.shape, info.max_degree, self.config.efficiency
        )
        t = 0.0
        for s in req.pending_stages:
            t += self.cost.stage_seconds(req.family, s, req.spec.shape, k if s == "diffuse" else 1)
        return t

    def fits(self, req: RequestState, grp: Sequence[str], stages: Sequence[Stage]) -> bool:
        k = len(grp)
        info = self.models[req.spec.model]
        for d in grp:
            free = self.devices[d].info.memory_bytes - self.weights_on(d)
            for s in stages:
                if s != "diffuse" and d != grp[0]:
                    continue
                peak = model_peak_bytes(
                    self.cost, info, s, req.spec.shape, k if s == "diffuse" else 1
                )
                if peak > free:
                    return False
        return True

    def est(self, req: RequestState, stages: Sequence[Stage], k: int, speed: float) -> float:
        return sum(
            self.cost.stage_seconds(req.family, s, req.spec.shape, k if s == "diffuse" else 1)
            for s in stages
        ) / max(speed, 1e-9)

    def run_pipeline(self, req: RequestState, grp: tuple[str, ...], now: float) -> Command:
        stages = req.pending_stages
        speed = min(self.devices[d].info.speed for d in grp)
        start = max(now, *(self.devices[d].busy_until for d in grp))
        return self.issue(req, stages, grp, now, start + self.est(req, stages, len(grp), speed))


class StaticFifoPolicy(_PipelineBase):
    name = "b1"

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        cost: CostModel,
        config: StaticFifoConfig | None = None,
    ) -> None:
        self.sconfig = config or StaticFifoConfig()
        super().__init__(models, cost, self.sconfig)

    def plan(self, now: float) -> list[Command]:
        self._begin_plan()
        out: list[Command] = []
        k = self.sconfig.degree
        for req in list(self.waiting.values()):  # arrival order
            if not self._any_free():
                break
            groups = self.free_groups(req.spec.model, k)
            if not groups:
                continue
            grp = min(groups, key=lambda g: (max(self.devices[d].busy_until for d in g), g))
            out.append(self.run_pipeline(req, grp, now))
        return out


class PipelineSrtfPolicy(_PipelineBase):
    name = "b4"

    def __init__(
        self, models: Mapping[str, ModelInfo], cost: CostModel, config: BaselineConfig | None = None
    ) -> None:
        super().__init__(models, cost, config or BaselineConfig())

    def plan(self, now: float) -> list[Command]:
        self._begin_plan()
        out: list[Command] = []
        if not self._any_free():
            return out
        for req in sorted(self.waiting.values(), key=lambda r: (self.remaining(r), r.spec.arrival)):
            if not self._any_free():
                break
            info = self.models[req.spec.model]
            ks = efficient_degrees(
                self.cost, req.family, req.spec.shape, info.max_degree, self.config.efficiency
            )
            ks_sorted = sorted(
                ks, key=lambda k: self.cost.stage_seconds(req.family, "diffuse", req.spec.shape, k)
            )
            for k in ks_sorted:
                groups = [
                    g
                    for g in self.free_groups(req.spec.model, k)
                    if self.fits(req, g, req.pending_stages)
                ]
                if groups:
                    out.append(self.run_pipeline(req, groups[0], now))
                    break
        return out


class StageSrtfPolicy(_PipelineBase):
    name = "b6"

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        cost: CostModel,
        config: StageSplitConfig | None = None,
    ) -> None:
        self.xconfig = config or StageSplitConfig()
        super().__init__(models, cost, self.xconfig)

    def compute_placement(self, now: float) -> Placement:
        blocks = model_blocks(self.graph.devices(), list(self.models), self.xconfig.shares)
        nd, ne, nc = self.xconfig.split
        tot = nd + ne + nc
        out: Placement = {}
        for m, bl in blocks.items():
            for b in bl:
                n = len(b)
                e = max(1, round(n * ne / tot)) if n >= 3 else 0
                c = max(1, round(n * nc / tot)) if n >= 3 else 0
                d = n - e - c
                for i, dev in enumerate(b):
                    if n < 3:
                        st: frozenset[Stage] = frozenset(STAGES)
                    elif i < d:
                        st = frozenset(("diffuse",))
                    elif i < d + e:
                        st = frozenset(("encode",))
                    else:
                        st = frozenset(("decode",))
                    out[dev.device_id] = {m: st}
        return out

    def plan(self, now: float) -> list[Command]:
        self._begin_plan()
        out: list[Command] = []
        limit = self.config.max_inflight_per_device
        if not self._any_free():
            return out
        # Per round: (model, stage) -> free devices holding it (shrinks as tasks issue).
        holders: dict[tuple[str, Stage], list[DeviceState]] = {}
        for req in sorted(self.waiting.values(), key=lambda r: (self.remaining(r), r.spec.arrival)):
            if not self._any_free():
                break
            stage = req.pending_stages[0]
            model = req.spec.model
            if stage == "diffuse":
                info = self.models[model]
                ks = efficient_degrees(
                    self.cost, req.family, req.spec.shape, info.max_degree, self.config.efficiency
                )
                for k in sorted(
                    ks,
                    key=lambda k: self.cost.stage_seconds(req.family, "diffuse", req.spec.shape, k),
                ):
                    groups = [
                        g for g in self.free_groups(model, k) if self.fits(req, g, ("diffuse",))
                    ]
                    if groups:
                        speed = min(self.devices[d].info.speed for d in groups[0])
                        out.append(
                            self.issue(
                                req,
                                ("diffuse",),
                                groups[0],
                                now,
                                now + self.est(req, ("diffuse",), k, speed),
                            )
                        )
                        break
                continue
            hs = holders.get((model, stage))
            if hs is None:
                hs = [
                    st
                    for st in self.devices.values()
                    if st.up
                    and st.device_id in self.graph
                    and self.graph.holds(st.device_id, model, stage)
                ]
            hs = holders[model, stage] = [st for st in hs if len(st.inflight) < limit]
            cands = [st for st in hs if self.fits(req, (st.device_id,), (stage,))]
            if not cands:
                continue
            best = min(cands, key=lambda st: (max(now, st.busy_until), st.device_id))
            end = max(now, best.busy_until) + self.est(req, (stage,), 1, best.info.speed)
            out.append(self.issue(req, (stage,), (best.device_id,), now, end))
        return out


class AuthorsPolicy(_PipelineBase):
    name = "authors"

    def __init__(
        self, models: Mapping[str, ModelInfo], cost: CostModel, config: AuthorsConfig | None = None
    ) -> None:
        self.aconfig = config or AuthorsConfig()
        super().__init__(models, cost, self.aconfig)
        self._last_solve = -math.inf

    def allowed_degrees(self, req: RequestState) -> tuple[int, ...]:
        info = self.models[req.spec.model]
        sh = req.spec.shape
        ks = efficient_degrees(self.cost, req.family, sh, info.max_degree, self.config.efficiency)
        lo = 1
        if sh.num_frames <= 1 and sh.height * sh.width >= 2048 * 2048:
            lo = 2
        if sh.num_frames > 65 and sh.height * sh.width >= 720 * 1280:
            lo = 4
        ks2 = tuple(k for k in ks if k >= lo)
        if not ks2:
            ks2 = tuple(k for k in (2, 4, 8) if lo <= k <= info.max_degree)[:1]
        return ks2

    def plan(self, now: float) -> list[Command]:
        self._begin_plan()
        if not self.waiting or now - self._last_solve < self.aconfig.min_interval_s:
            return []
        self._last_solve = now
        # Free devices per machine (idle, holding the model).
        limit = self.config.max_inflight_per_device
        free: dict[tuple[str, str], int] = {}
        for st in self.devices.values():
            if not st.up or st.device_id not in self.graph or len(st.inflight) >= limit:
                continue
            for m in self.graph.placement(st.device_id):
                key = (st.info.node_id, m)
                free[key] = free.get(key, 0) + 1
        if not free:
            return []
        vars_: list[tuple[RequestState, int, str, float]] = []
        for req in self.waiting.values():
            m = req.spec.model
            for k in self.allowed_degrees(req):
                t = self.cost.stage_seconds(req.family, "diffuse", req.spec.shape, k)
                dl = req.deadline if req.deadline is not None else math.inf
                late = now + t - dl
                reward = 1000.0 if late <= 0 else 1000.0 + 10.0 * late
                for (node, mm), n in free.items():
                    if mm == m and n >= k:
                        vars_.append((req, k, node, reward))
        if not vars_:
            return []
        chosen = self._solve(vars_, free)
        out: list[Command] = [self._last_log]
        used: set[str] = set()
        for req, k, node, _ in sorted(chosen, key=lambda v: -v[1]):
            groups = [
                g
                for g in self.free_groups(req.spec.model, k)
                if self.graph.info(g[0]).node_id == node and used.isdisjoint(g)
            ]
            if not groups:
                continue
            used.update(groups[0])
            out.append(self.run_pipeline(req, groups[0], now))
        return out

    def _solve(
        self, vars_: list[tuple[RequestState, int, str, float]], free: Mapping[tuple[str, str], int]
    ) -> list[tuple[RequestState, int, str, float]]:
        import mip

        preload(self.aconfig.solver)  # once per process (trident.sched.solver)
        t0 = self.clock()
        self._last_log = LogEvent("dispatch.solved", {"solver": "mip", "ms": 0.0})
        m = mip.Model(sense=mip.MAXIMIZE, solver_name=solver_library(self.aconfig.solver))
        m.verbose = 0
        x = [m.add_var(var_type=mip.BINARY) for _ in vars_]
        slack = {key: m.add_var(lb=0.0) for key in free}
        nodes = {node for node, _ in free}
        for node in sorted(nodes):  # a set of str: its order changes with the hash seed
            keys = [key for key in free if key[0] == node]
            m.add_constr(
                mip.xsum(v[1] * x[i] for i, v in enumerate(vars_) if v[2] == node)
                + mip.xsum(slack[key] for key in keys)
                == sum(free[key] for key in keys)
            )
        by_req: dict[str, list[int]] = {}
        for i, v in enumerate(vars_):
            by_req.setdefault(v[0].request_id, []).append(i)
        for idx in by_req.values():
            m.add_constr(mip.xsum(x[i] for i in idx) <= 1)
        m.objective = mip.xsum(v[3] * x[i] for i, v in enumerate(vars_)) - mip.xsum(slack.values())
        status = optimize(m, self.aconfig.max_nodes)
        self._last_log = LogEvent(
            "dispatch.solved",
            {
                "solver": "mip",
                "ms": round((self.clock() - t0) * 1e3, 3),
                "status": status.name,
            },
        )
        if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
            return []
        return [v for i, v in enumerate(vars_) if (x[i].x or 0.0) > 0.5]
