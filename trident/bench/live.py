"""``trident bench live``: one trace through the simulator *and* the real daemons.

The live run starts a real scheduler and ``--nodes`` ``trident-node --devices sim:G``
processes on loopback, replays the trace from a client at ``--time-scale`` (simulated
seconds x scale = wall seconds; the sim devices sleep for the cost model's time x the
same scale and the scheduler plans with the same scaled times), and reports SLO
attainment and latency (converted back to simulated seconds) beside the simulator's
figures for the same trace, policy and cluster. Agreement between the two is what makes
the simulator's large-cluster numbers believable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from trident.bench.cluster import LocalCluster, NodeSpec
from trident.bench.sim import BenchConfig, run_policies
from trident.client import AsyncClient
from trident.cliformat import DefaultsHelpFormatter
from trident.errors import RequestError
from trident.sched.cost import load_cost_model
from trident.sim.metrics import percentile
from trident.sim.scenario import GPU_PROFILES, build_models, make_requests
from trident.sim.traces import load_trace, make_trace

__all__ = ["build_parser", "main", "run_live"]

GIB = 1 << 30


def _trace(cfg: BenchConfig) -> list[Any]:
    if cfg.trace_file:
        return load_trace(cfg.trace_file)
    assert cfg.trace is not None
    return make_trace(
        cfg.trace,
        rate=cfg.rate,
        duration_s=cfg.duration_s,
        seed=cfg.seed,
        arrival=cfg.arrival,  # type: ignore[arg-type]
        cv=cfg.cv,
    )


def run_live(
    cfg: BenchConfig, policy: str, time_scale: float, log_dir: str | None = None
) -> dict[str, Any]:
    """Replay ``cfg``'s trace on real daemons with sim devices; metrics in simulated seconds."""
    cost = load_cost_model(list(cfg.profiles))
    trace = _trace(cfg)
    models = build_models(cost, [r.model for r in trace], dict(cfg.model_map))
    requests = make_requests(trace, models, cost, cfg.slo_scale, cfg.gpus_per_node)
    gpu = GPU_PROFILES[cfg.gpu]
    nodes = [
        NodeSpec(
            f"sim:{cfg.gpus_per_node}",
            node_id=f"n{i}",
            time_scale=time_scale,
            sim_memory_gb=gpu.memory_bytes / GIB,
            extra=["--speed", str(gpu.speed)],
        )
        for i in range(cfg.nodes)
    ]
    served = [f"{name}=sim:{info.family}" for name, info in models.items()]
    # The core ticks as often, in simulated time, as in the simulator.
    tick = max(0.002, cfg.tick_s * time_scale)
    opts: list[str] = [
        "--slo-scale",
        str(cfg.slo_scale),
        "--max-queue",
        str(max(1024, 2 * len(requests))),
        "--tick-s",
        str(tick),
    ]
    for key, value in cfg.policy_options:
        if "." not in key:
            opts += ["--policy-option", f"{key}={value}"]
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory()
        log_dir = tmp.name
    cluster = LocalCluster(
        served, nodes, policy=policy, log_dir=log_dir, scheduler_args=opts, startup_timeout=120
    )
    records: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with cluster:

        async def replay() -> None:
            async with AsyncClient(cluster.client_addr) as c:
                loop = asyncio.get_running_loop()
                t0 = loop.time()

                async def one(spec: Any) -> None:
                    delay = t0 + spec.arrival * time_scale - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    shape = spec.shape
                    budget = spec.slo_s * time_scale if spec.slo_s is not None else None
                    rec: dict[str, Any] = {"request_id": spec.request_id, "model": spec.model}
                    try:
                        res = await c.generate(
                            model=spec.model,
                            prompt="live bench",
                            height=shape.height,
                            width=shape.width,
                            num_frames=shape.num_frames if models[spec.model].is_video else None,
                            num_inference_steps=shape.num_inference_steps,
                            guidance_scale=5.0 if shape.cfg else None,
                            seed=0,
                            slo_s=budget,
                            timeout=max(600.0, 20 * (budget or 0)),
                        )
                        rec.update(
                            status="completed",
                            latency=res.timings["total"] / time_scale,
                            met_slo=bool(res.met_slo),
                        )
                    except RequestError as exc:
                        rec.update(status="failed", error=type(exc).__name__, met_slo=False)
                    records.append(rec)

                await asyncio.gather(*(one(s) for s in requests))

        asyncio.run(replay())
    wall = time.perf_counter() - t_start
    if tmp is not None:
        tmp.cleanup()
    lat = [r["latency"] for r in records if r["status"] == "completed"]
    n = len(records)
    return {
        "requests": n,
        "completed": len(lat),
        "failed": n - len(lat),
        "slo_attainment": sum(1 for r in records if r["met_slo"]) / n if n else math.nan,
        "mean_latency_s": sum(lat) / len(lat) if lat else math.nan,
        "p95_latency_s": percentile(lat, 95),
        "wall_s": wall,
        "time_scale": time_scale,
    }


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / abs(b) if b else math.inf


def build_parser() -> argparse.ArgumentParser:
    """``trident bench live``'s command line."""
    p = argparse.ArgumentParser(
        prog="trident bench live",
        description="One trace through the simulator and the real daemons (sim devices), "
        "their SLO attainment and latency side by side.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--trace", default="flux", help="built-in trace (trident bench sim's)")
    p.add_argument("--trace-file", help="JSON Lines trace file instead of --trace (default: none)")
    p.add_argument("--nodes", type=int, default=2, help="trident-node processes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="sim devices per node")
    p.add_argument("--gpu", default="l20", choices=sorted(GPU_PROFILES), help="simulated GPU model")
    p.add_argument("--policy", default="trident", help="scheduling policy")
    p.add_argument(
        "--slo-scale",
        type=float,
        default=2.5,
        help="deadline = this x a request's standalone latency",
    )
    p.add_argument("--rate", type=float, help="requests per second (default: the trace's)")
    p.add_argument("--duration", type=float, default=300.0, help="simulated seconds of trace")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace's arrivals and shapes")
    p.add_argument(
        "--arrival",
        default="constant",
        choices=["constant", "poisson", "bursty"],
        help="arrival process",
    )
    p.add_argument(
        "--time-scale", type=float, default=0.05, help="wall seconds per simulated second"
    )
    p.add_argument("--log-dir", help="keep the daemons' logs here (default: a temporary directory)")
    p.add_argument(
        "--json", help="write the results to this file as JSON (default: none, stdout only)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = BenchConfig(
        trace=None if args.trace_file else args.trace,
        trace_file=args.trace_file,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu=args.gpu,
        policies=(args.policy,),
        slo_scale=args.slo_scale,
        rate=args.rate,
        duration_s=args.duration,
        seed=args.seed,
        arrival=args.arrival,
    )
    sims, _ = run_policies(replace(cfg), log=None)
    sim = sims[args.policy].to_json()
    live = run_live(cfg, args.policy, args.time_scale, args.log_dir)
    rows = [
        ("slo_attainment", "SLO attainment"),
        ("mean_latency_s", "mean latency (s)"),
        ("p95_latency_s", "P95 latency (s)"),
        ("completed", "completed"),
        ("failed", "failed"),
    ]
    print(
        f"{args.trace_file or args.trace} on {args.nodes}x{args.gpus_per_node} {args.gpu}, policy {args.policy}, "
        f"{live['requests']} requests, live time scale {args.time_scale} ({live['wall_s']:.0f}s wall)"
    )
    print(f"{'metric':<18} {'simulator':>10} {'live':>10} {'rel. diff':>10}")
    agree = {}
    for key, label in rows:
        a, b = live[key], sim[key]
        if a is None or b is None:
            continue
        d = _rel(float(a), float(b))
        agree[key] = d
        print(f"{label:<18} {float(b):>10.3f} {float(a):>10.3f} {d:>9.1%}")
    out = {
        "config": cfg.to_json() | {"time_scale": args.time_scale},
        "simulator": sim,
        "live": live,
        "relative_difference": agree,
        "command": "trident bench live " + " ".join(argv or sys.argv[3:]),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
