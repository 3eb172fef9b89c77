"""Planner benchmark: solve time of the orchestrator and the dispatcher at scale.

``trident bench planner --nodes 16 --gpus-per-node 8 --queue 256 [--solver cbc|highs]
[--json OUT]`` calls :func:`main`. Synthetic but realistic states: 4 pipelines (flux,
sd3, cogvideox, hunyuanvideo) with the trace mix of the authors' code, a placement from
the orchestrator, devices busy for random remaining times (``--free-fraction`` free
now), and ``--queue`` waiting requests with deadlines = arrival + 2.5 x standalone.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from trident.cliformat import DefaultsHelpFormatter
from trident.sched.batching import BatchConfig, form_batches
from trident.sched.cost import load_cost_model
from trident.sched.dispatcher import DeviceView, DispatchConfig, Dispatcher, QueueItem
from trident.sched.orchestrator import (
    OrchestratorConfig,
    demand_from_window,
    orchestrate,
    placement_solver,
)
from trident.sched.solver import loaded_ms, preload
from trident.sched.types import DeviceInfo, ModelInfo, Shape

__all__ = ["build_parser", "main"]

MODELS = ("flux", "sd3", "cogvideox", "hunyuanvideo")


def _shape(rng: random.Random, m: str) -> Shape:
    if m == "flux":
        s = rng.choice([128, 256, 512, 1024, 2048])
        return Shape(s, s, 1, 28)
    if m == "sd3":
        s = rng.choice([512, 1024, 1536])
        return Shape(s, s, 1, 20)
    if m == "cogvideox":
        return Shape(768, rng.choice([1360, 432]), rng.choice([17, 33, 65, 81]), 6)
    h, w = rng.choice([(720, 1280), (960, 544)])
    return Shape(h, w, rng.choice([17, 33, 65, 129]), 50)


def _pct(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return 0.0
    i = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[i]


def build_parser() -> argparse.ArgumentParser:
    """``trident bench planner``'s command line."""
    ap = argparse.ArgumentParser(
        prog="trident bench planner",
        description="Solve time of the orchestrator and the dispatcher at scale, on "
        "synthetic but realistic cluster states (4 pipelines, a placement from the "
        "orchestrator, busy devices, --queue waiting requests).",
        formatter_class=DefaultsHelpFormatter,
    )
    ap.add_argument("--nodes", type=int, default=16, help="nodes in the synthetic cluster")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="devices per node")
    ap.add_argument("--queue", type=int, default=256, help="waiting requests per dispatch round")
    ap.add_argument("--solver", choices=["cbc", "highs"], default="cbc", help="dispatcher solver")
    ap.add_argument(
        "--placement-solver",
        choices=["auto", "cbc", "highs"],
        default="auto",
        help="orchestrator solver (auto: HiGHS up to 256 devices, CBC above)",
    )
    ap.add_argument("--rounds", type=int, default=100, help="dispatcher rounds")
    ap.add_argument("--max-batch", type=int, default=4, help="batching before each round (1: off)")
    ap.add_argument("--placements", type=int, default=10, help="orchestrator solves")
    ap.add_argument(
        "--max-nodes",
        type=int,
        default=None,
        help="dispatcher branch-and-bound nodes per solve (default: DispatchConfig's, 200)",
    )
    ap.add_argument(
        "--placement-max-nodes",
        type=int,
        default=None,
        help="orchestrator branch-and-bound nodes per solve (default: OrchestratorConfig's, 500)",
    )
    ap.add_argument(
        "--free-fraction", type=float, default=0.25, help="fraction of devices free now"
    )
    ap.add_argument("--memory-gb", type=float, default=48.0, help="memory per device, GB")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic states")
    ap.add_argument(
        "--json",
        dest="json_out",
        default=None,
        help="write the results to this file (default: none)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    rng = random.Random(a.seed)
    cost = load_cost_model([])
    models = {m: ModelInfo(m, m, is_video=m in ("cogvideox", "hunyuanvideo")) for m in MODELS}
    mem = int(a.memory_gb * 1e9)
    devs = [
        DeviceInfo(f"n{n}/sim:{i}", f"n{n}", "sim", i, mem)
        for n in range(a.nodes)
        for i in range(a.gpus_per_node)
    ]

    orch_cfg = OrchestratorConfig(solver=a.placement_solver)
    for solver in (placement_solver(orch_cfg, len(devs)), a.solver):  # timed, outside solves
        preload(solver, clock=time.perf_counter)
    disp_cfg = DispatchConfig(solver=a.solver)
    if a.max_nodes is not None:
        disp_cfg.max_nodes = a.max_nodes
    if a.placement_max_nodes is not None:
        orch_cfg.max_nodes = a.placement_max_nodes

    # ---------------- orchestrator
    orch_ms: list[float] = []
    orch_solver: dict[str, int] = {}
    current = None
    plan = None
    for _ in range(max(1, a.placements)):
        window = [
            (m, _shape(rng, m)) for m in rng.choices(MODELS, weights=[1.5, 1.5, 1.5, 1.0], k=300)
        ]
        demand = demand_from_window(cost, models, window, 120.0)
        shapes: dict[str, list[Shape]] = {}
        for m, s in window:
            shapes.setdefault(m, []).append(s)
        res = orchestrate(
            cost,
            models,
            devs,
            demand,
            shapes,
            current,
            orch_cfg,
            clock=time.perf_counter,
        )
        orch_ms.append(res.ms)
        orch_solver[f"{res.solver}:{res.reason}"] = (
            orch_solver.get(f"{res.solver}:{res.reason}", 0) + 1
        )
        current = res.plan
        plan = res
    assert plan is not None
    holds = plan.stages()

    # ---------------- dispatcher
    disp = Dispatcher(cost, disp_cfg)
    weights = {
        d.device_id: sum(
            cost.weight_bytes(m, s) for m, st in holds[d.device_id].items() for s in st
        )
        for d in devs
    }
    batch_cfg = BatchConfig(max_batch=a.max_batch)
    batch_ms: list[float] = []
    batched: list[int] = []  # requests merged into batches per round
    disp_ms: list[float] = []
    reasons: dict[str, int] = {}
    variables: list[int] = []
    now = 1000.0
    for r in range(a.rounds + 1):
        views = [
            DeviceView(
                d.device_id,
                d.node_id,
                d.index,
                d.speed,
                now if rng.random() < a.free_fraction else now + rng.uniform(0.1, 60.0),
                d.memory_bytes - weights[d.device_id],
                holds[d.device_id],
                True,
            )
            for d in devs
        ]
        items = []
        for i in range(a.queue):
            m = rng.choices(MODELS, weights=[1.5, 1.5, 1.5, 1.0])[0]
            sh = _shape(rng, m)
            arr = now - rng.uniform(0.0, 120.0)
            base = cost.standalone_seconds(m, sh, max(cost.efficient_degrees(m, sh)))
            items.append(
                QueueItem(
                    f"q{r}.{i}",
                    m,
                    m,
                    sh,
                    arr,
                    arr + 2.5 * base,
                    rng.choice(["encode", "encode", "diffuse"]),
                    rng.choice(views).device_id,
                )
            )
        # As the policy does before each round: merge same-shape small image requests
        # (every image request may batch here; videos never do).
        t0 = time.perf_counter()
        keys = {
            i.request_id: (i.model, i.shape) if i.model in ("flux", "sd3") else None for i in items
        }
        idle = {
            m: sum(
                1 for v in views if v.free_at <= now and m in v.holds and "diffuse" in v.holds[m]
            )
            for m in MODELS
        }
        queue = form_batches(items, keys, idle, cost, batch_cfg, now)
        bms = (time.perf_counter() - t0) * 1e3
        res2 = disp.solve(queue, views, now, clock=time.perf_counter)
        if r == 0:
            continue  # warm-up: first solver call loads the library
        batch_ms.append(bms)
        batched.append(sum(i.size for i in queue if i.members))
        disp_ms.append(res2.ms)
        variables.append(res2.variables)
        reasons[res2.reason] = reasons.get(res2.reason, 0) + 1
    fallbacks = sum(v for k, v in reasons.items() if k in ("node_limit", "error", "no_solver"))
    out: dict[str, Any] = {
        "config": {
            "nodes": a.nodes,
            "gpus_per_node": a.gpus_per_node,
            "queue": a.queue,
            "solver": a.solver,
            "placement_solver": a.placement_solver,
            "placement_solver_used": placement_solver(orch_cfg, len(devs)),
            "max_nodes": disp_cfg.max_nodes,
            "placement_max_nodes": orch_cfg.max_nodes,
            "rounds": a.rounds,
            "placements": a.placements,
            "free_fraction": a.free_fraction,
            "seed": a.seed,
        },
        "dispatcher": {
            "p50_ms": round(statistics.median(disp_ms), 3),
            "p99_ms": round(_pct(disp_ms, 99), 3),
            "max_ms": round(max(disp_ms), 3),
            "fallback_rate": round(fallbacks / max(1, len(disp_ms)), 4),
            "reasons": reasons,
            "mean_variables": round(statistics.mean(variables), 1),
        },
        "batching": {
            "p50_ms": round(statistics.median(batch_ms), 3),
            "p99_ms": round(_pct(batch_ms, 99), 3),
            "mean_requests_batched": round(statistics.mean(batched), 1),
            "max_batch": a.max_batch,
        },
        "orchestrator": {
            "p50_ms": round(statistics.median(orch_ms), 3),
            "p99_ms": round(_pct(orch_ms, 99), 3),
            "max_ms": round(max(orch_ms), 3),
            "solvers": orch_solver,
            "ratio": round(plan.ratio, 4),
        },
    }
    # Solver libraries load once per process, before any timed solve (trident.sched.solver).
    out["solver_library_load_ms"] = {k: round(v, 1) for k, v in loaded_ms().items()}
    try:
        import os

        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    d, o = out["dispatcher"], out["orchestrator"]
    print(
        f"devices={len(devs)} queue={a.queue} solver={a.solver}\n"
        f"dispatcher:   p50 {d['p50_ms']:.1f} ms  p99 {d['p99_ms']:.1f} ms  "
        f"fallback rate {d['fallback_rate']:.3f}  reasons {reasons}\n"
        f"batching:     p50 {out['batching']['p50_ms']:.1f} ms  p99 {out['batching']['p99_ms']:.1f} ms  "
        f"requests batched per round {out['batching']['mean_requests_batched']}\n"
        f"orchestrator: p50 {o['p50_ms']:.1f} ms  p99 {o['p99_ms']:.1f} ms  {orch_solver}\n"
        f"solver library load (once per process, untimed): {out['solver_library_load_ms']}"
        f"  load average {out.get('load_average')}"
    )
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
