"""``trident bench sim``: every policy on the same trace and cluster, side by side.

Example (the paper's flux trace on 16 nodes x 8 simulated L20s)::

    python -m trident.bench.sim --trace flux --nodes 16 --gpus-per-node 8 \\
        --policies trident,b1,b4,b6,authors --slo-scale 2.5 --json out.json

Each request's deadline is ``arrival + slo_s``: the trace's ``slo_s`` when given, else
``slo_scale`` x its standalone latency (encode + diffuse at the best efficient degree
+ decode, no queueing; :func:`trident.sched.core.standalone_latency`). The deadline is
put in the request itself, so every policy plans against, and is judged by, the same
deadline. Models, requests and policies are built by :mod:`trident.sim.scenario`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trident.cliformat import DefaultsHelpFormatter
from trident.errors import ConfigError
from trident.sched.cost import load_cost_model
from trident.sched.registry import POLICY_NAMES, parse_policy_options
from trident.sched.types import CostModel, ModelInfo, Policy
from trident.sim.bound import slo_attainment_bound
from trident.sim.engine import ClusterSpec, DeviceFault, SimConfig, SimResult, simulate
from trident.sim.metrics import Summary, summarize
from trident.sim.scenario import GPU_PROFILES, build_models, make_requests, make_sim_policy
from trident.sim.traces import ARRIVALS, TRACES, TraceError, load_trace, make_trace

__all__ = [
    "BenchConfig",
    "build_parser",
    "check_policy_options",
    "main",
    "policy_options",
    "run_bench",
    "run_policies",
]

DEFAULT_POLICIES = ("trident", "trident-np", "b1", "b4", "b6", "authors")


@dataclass(frozen=True)
class BenchConfig:
    trace: str | None = "flux"
    trace_file: str | None = None
    nodes: int = 16
    gpus_per_node: int = 8
    gpu: str = "l20"
    policies: tuple[str, ...] = DEFAULT_POLICIES
    slo_scale: float = 2.5
    rate: float | None = None
    duration_s: float = 1800.0
    seed: int = 0
    arrival: str = "constant"
    cv: float = 3.0
    noise: float = 0.0
    tick_s: float = 0.1
    max_time_s: float | None = None
    policy_options: tuple[tuple[str, Any], ...] = ()
    model_map: tuple[tuple[str, str], ...] = ()  # served name -> family
    profiles: tuple[str, ...] = ()
    faults: tuple[DeviceFault, ...] = ()
    bound: bool = True  # compute the LP upper bound on SLO attainment (trident.sim.bound)

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["policies"] = list(self.policies)
        d["policy_options"] = dict(self.policy_options)
        d["model_map"] = dict(self.model_map)
        d["profiles"] = list(self.profiles)
        d["faults"] = [
            {
                "time_s": f.time_s,
                "target": f.device_id or f.node_id,
                "restart_after_s": f.restart_after_s,
            }
            for f in self.faults
        ]
        return d


def _load_cost(profiles: Sequence[str]) -> CostModel:
    return load_cost_model(list(profiles))


# --------------------------------------------------------------------------- running


def run_policies(
    cfg: BenchConfig,
    cost: CostModel | None = None,
    *,
    policy_factory: Callable[..., Policy] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Summary], dict[str, Any]]:
    """Run every policy of ``cfg`` on the same trace; return summaries and run info."""
    cost = cost or _load_cost(cfg.profiles)
    if cfg.trace_file:
        trace = load_trace(cfg.trace_file)
    else:
        if cfg.trace is None:
            raise TraceError("give a trace name or a trace file")
        trace = make_trace(
            cfg.trace,
            rate=cfg.rate,
            duration_s=cfg.duration_s,
            seed=cfg.seed,
            arrival=cfg.arrival,  # type: ignore[arg-type]
            cv=cfg.cv,
        )
    if not trace:
        raise TraceError("the trace has no requests")
    gpu = GPU_PROFILES[cfg.gpu]
    models = build_models(cost, [r.model for r in trace], dict(cfg.model_map))
    requests = make_requests(trace, models, cost, cfg.slo_scale, cfg.gpus_per_node)
    cluster = ClusterSpec(
        cfg.nodes, cfg.gpus_per_node, memory_bytes=gpu.memory_bytes, speed=gpu.speed
    )
    sim_cfg = SimConfig(
        seed=cfg.seed,
        tick_s=cfg.tick_s,
        noise=cfg.noise,
        max_time_s=cfg.max_time_s,
        faults=cfg.faults,
    )
    if policy_factory is None:
        check_policy_options(cfg)
    factory = policy_factory or make_sim_policy
    out: dict[str, Summary] = {}
    info: dict[str, Any] = {"requests": len(requests), "runs": {}}
    if cfg.bound:
        t0 = time.perf_counter()
        bound = slo_attainment_bound(
            requests,
            models,
            cost,
            devices=cfg.nodes * cfg.gpus_per_node,
            gpus_per_node=cfg.gpus_per_node,
            speed=gpu.speed,
        )
        info["bound"] = {
            "slo_attainment": round(bound.bound, 4),
            "status": bound.status,
            "intervals": bound.intervals,
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        if log:
            log(f"  {'bound':<10} slo<={bound.bound:.3f} (LP, {bound.intervals} intervals)")
    for name in cfg.policies:
        t0 = time.perf_counter()
        # "LABEL=POLICY" runs POLICY under another name (ablations: nobatch=trident with
        # --policy-opt nobatch.max_batch=1); scoped options follow the label.
        label, eq, base = name.partition("=")
        policy = _build_policy(
            factory, base if eq else name, models, cost, policy_options(cfg, label)
        )
        res: SimResult = simulate(policy, cost, models, cluster, requests, sim_cfg)
        s = summarize(res)
        name = label
        out[name] = s
        info["runs"][name] = {
            "wall_s": round(time.perf_counter() - t0, 3),
            "stats": res.stats,
            "log_events": res.log_events,
        }
        if log:
            log(
                f"  {name:<10} slo={s.slo_attainment:.3f} mean={s.mean_latency_s:.1f}s "
                f"p95={s.p95_latency_s:.1f}s done={s.completed} failed={s.failed} "
                f"({time.perf_counter() - t0:.1f}s wall, policy {res.policy_cpu_seconds:.1f}s "
                f"CPU = {100 * s.policy_time_share:.2f}% of simulated time, "
                f"{res.policy_seconds:.1f}s wall)"
            )
    return out, info


def policy_options(cfg: BenchConfig, name: str) -> dict[str, Any]:
    """Options for the policy labelled ``name``: ``KEY=V`` applies to every policy,
    ``NAME.KEY=V`` only to ``NAME`` (and wins) where ``NAME`` is a label of the run or a
    registered policy; any other dotted key is a section option for every policy
    (``dispatch.max_nodes=100``). ``slo_scale`` defaults to the benchmark's. Names and
    values are checked by the policy's parser (:func:`check_policy_options`)."""
    scopes = _scopes(cfg)
    options: dict[str, Any] = {"slo_scale": cfg.slo_scale}
    scoped: dict[str, Any] = {}
    for key, value in cfg.policy_options:
        pol, dot, rest = key.partition(".")
        if not dot or pol not in scopes:
            options[key] = value
        elif pol == name:
            scoped[rest] = value
    options.update(scoped)
    return options


def _scopes(cfg: BenchConfig) -> set[str]:
    return {p.partition("=")[0] for p in cfg.policies} | set(POLICY_NAMES)


def check_policy_options(cfg: BenchConfig) -> None:
    """Parse every policy's options before anything runs (one parser:
    :func:`trident.sched.registry.parse_policy_options`), and those scoped to a
    registered policy that this run leaves out; ConfigError on the first bad one."""
    labels = set()
    for entry in cfg.policies:
        label, eq, base = entry.partition("=")
        labels.add(label)
        parse_policy_options(base if eq else label, policy_options(cfg, label))
    for key, value in cfg.policy_options:
        pol, dot, rest = key.partition(".")
        if dot and pol in POLICY_NAMES and pol not in labels:
            parse_policy_options(pol, {rest: value})


def _build_policy(
    factory: Callable[..., Policy],
    name: str,
    models: Mapping[str, ModelInfo],
    cost: CostModel,
    options: dict[str, Any],
) -> Policy:
    try:
        return factory(name, models, cost, **options)
    except TypeError as exc:
        # A policy that does not take slo_scale (the deadline is in each request anyway).
        if "slo_scale" in options and "slo_scale" in str(exc):
            rest = {k: v for k, v in options.items() if k != "slo_scale"}
            return factory(name, models, cost, **rest)
        raise


def _ratios(
    summaries: Mapping[str, Summary], base: str = "b1"
) -> dict[str, dict[str, float | None]]:
    """Per policy: SLO attainment / base's, and base's latency / the policy's (x lower)."""
    b = summaries.get(base)
    if b is None:
        return {}

    def div(x: float, y: float) -> float | None:
        if not (math.isfinite(x) and math.isfinite(y)) or y == 0:
            return None
        return round(x / y, 3)

    return {
        n: {
            "slo_attainment_x": div(s.slo_attainment, b.slo_attainment),
            "mean_latency_lower_x": div(b.mean_latency_s, s.mean_latency_s),
            "p95_latency_lower_x": div(b.p95_latency_s, s.p95_latency_s),
        }
        for n, s in summaries.items()
    }


def format_table(
    summaries: Mapping[str, Summary], base: str = "b1", bound: float | None = None
) -> str:
    ratios = _ratios(summaries, base)

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None or not math.isfinite(x) else format(x, fmt)

    head = (
        f"{'policy':<10} {'SLO':>6} {'mean s':>9} {'P95 s':>9} {'done':>6} {'failed':>6} "
        f"{'OOM':>5}  {'SLO x' + base:>8} {'mean /':>7} {'P95 /':>7} {'/bound':>7} "
        f"{'policy%':>8}"
    )
    lines = [head, "-" * len(head)]
    for n, s in summaries.items():
        r = ratios.get(n, {})
        lines.append(
            f"{n:<10} {f(s.slo_attainment, '.3f'):>6} {f(s.mean_latency_s, '.1f'):>9} "
            f"{f(s.p95_latency_s, '.1f'):>9} {s.completed:>6} {s.failed:>6} {s.oom:>5}  "
            f"{f(r.get('slo_attainment_x'), '.2f'):>8} {f(r.get('mean_latency_lower_x'), '.2f'):>7} "
            f"{f(r.get('p95_latency_lower_x'), '.2f'):>7} "
            f"{f(s.slo_attainment / bound if bound else None, '.2f'):>7} "
            f"{f(100 * s.policy_time_share, '.2f'):>8}"
        )
    if bound is not None:
        lines.append(f"{'bound':<10} {f(bound, '.3f'):>6}  (LP upper bound on SLO attainment)")
    if base in summaries:
        lines.append(
            f"(ratios against {base}: SLO x = attainment ratio; mean / and P95 / = times lower latency)"
        )
    return "\n".join(lines)


def _of_bound(summaries: Mapping[str, Summary], bound: float | None) -> dict[str, float | None]:
    """Each policy's SLO attainment as a fraction of the LP upper bound."""
    return {
        n: round(s.slo_attainment / bound, 4) if bound and math.isfinite(s.slo_attainment) else None
        for n, s in summaries.items()
    }


def _policy_json(s: Summary) -> dict[str, Any]:
    d = s.to_json()
    # The documented core keys first.
    keys = ("slo_attainment", "mean_latency_s", "p95_latency_s", "completed", "failed", "oom")
    return {**{k: d[k] for k in keys}, **{k: v for k, v in d.items() if k not in keys}}


def run_bench(
    cfg: BenchConfig,
    *,
    sweep: tuple[str, list[float]] | None = None,
    json_out: str | None = None,
    plot_out: str | None = None,
    cost: CostModel | None = None,
    policy_factory: Callable[..., Policy] | None = None,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    cost = cost or _load_cost(cfg.profiles)
    doc: dict[str, Any] = {"config": cfg.to_json()}
    t0 = time.perf_counter()
    if sweep is None:
        out(_describe(cfg))
        summaries, info = run_policies(cfg, cost, policy_factory=policy_factory, log=out)
        out("")
        bound = info.get("bound", {}).get("slo_attainment")
        out(format_table(summaries, bound=bound))
        doc["policies"] = {n: _policy_json(s) for n, s in summaries.items()}
        doc["ratios_vs_b1"] = _ratios(summaries)
        if "bound" in info:
            doc["bound"] = info["bound"]
            doc["fraction_of_bound"] = _of_bound(summaries, bound)
        doc["config"]["requests"] = info["requests"]
        doc["runs"] = info["runs"]
        if plot_out:
            from trident.sim.plots import plot_policies

            plot_policies(doc["policies"], plot_out, title=_title(cfg))
    else:
        param, values = sweep
        points = []
        for v in values:
            c = replace(cfg, rate=v) if param == "rate" else replace(cfg, slo_scale=v)
            out(f"== {param} = {v}: {_describe(c)}")
            summaries, info = run_policies(c, cost, policy_factory=policy_factory, log=out)
            bound = info.get("bound", {}).get("slo_attainment")
            out(format_table(summaries, bound=bound))
            out("")
            point = {
                "value": v,
                "requests": info["requests"],
                "policies": {n: _policy_json(s) for n, s in summaries.items()},
                "ratios_vs_b1": _ratios(summaries),
            }
            if "bound" in info:
                point["bound"] = info["bound"]
                point["fraction_of_bound"] = _of_bound(summaries, bound)
            points.append(point)
        doc["sweep"] = {"param": param, "points": points}
        # The last point also fills the top-level "policies" for tools expecting it.
        doc["policies"] = points[-1]["policies"] if points else {}
        if plot_out:
            from trident.sim.plots import plot_sweep

            plot_sweep(param, points, plot_out, title=_title(cfg))
    doc["wall_s"] = round(time.perf_counter() - t0, 2)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        out(f"wrote {json_out}")
    if plot_out:
        out(f"wrote {plot_out}")
    return doc


def _describe(cfg: BenchConfig) -> str:
    src = (
        f"trace file {cfg.trace_file}"
        if cfg.trace_file
        else (
            f"trace {cfg.trace} ({cfg.arrival}, rate {cfg.rate if cfg.rate is not None else TRACES[cfg.trace or 'flux'].rate} req/s, "
            f"{cfg.duration_s:g} s, seed {cfg.seed})"
        )
    )
    return (
        f"{src} on {cfg.nodes}x{cfg.gpus_per_node} {cfg.gpu}, slo_scale {cfg.slo_scale}, "
        f"noise {cfg.noise}"
    )


def _title(cfg: BenchConfig) -> str:
    name = Path(cfg.trace_file).name if cfg.trace_file else cfg.trace
    return f"{name} on {cfg.nodes}x{cfg.gpus_per_node} {cfg.gpu}, SLO scale {cfg.slo_scale}"


# --------------------------------------------------------------------------- CLI


def _parse_sweep(text: str) -> tuple[str, list[float]]:
    param, _, vals = text.partition("=")
    param = param.strip().replace("-", "_")
    if param not in ("rate", "slo_scale") or not vals:
        raise argparse.ArgumentTypeError("--sweep takes rate=V1,V2,... or slo_scale=V1,V2,...")
    try:
        values = [float(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep values must be numbers: {vals!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("--sweep values must be > 0")
    return param, values


def _parse_fault(text: str) -> DeviceFault:
    parts = text.split(",")
    try:
        if len(parts) not in (2, 3) or not parts[1]:
            raise ValueError
        t = float(parts[0])
        restart = float(parts[2]) if len(parts) == 3 and parts[2] else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--fault takes TIME,DEVICE_OR_NODE[,RESTART_S] (e.g. 300,n0/sim:3,30), got {text!r}"
        ) from None
    target = parts[1]
    if "/" in target:
        return DeviceFault(t, device_id=target, restart_after_s=restart)
    return DeviceFault(t, node_id=target, restart_after_s=restart)


def _parse_kv(text: str) -> tuple[str, Any]:
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(val)
    except json.JSONDecodeError:
        value = val
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trident bench sim",
        description="Run scheduling policies on a simulated cluster against the same trace.",
        formatter_class=DefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--trace", default=None, help=f"built-in trace: {', '.join(TRACES)} (default flux)"
    )
    src.add_argument(
        "--trace-file",
        default=None,
        help="JSON Lines trace file instead of --trace (see bench/sim.md; default: none)",
    )
    p.add_argument("--nodes", type=int, default=16, help="nodes in the simulated cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="simulated devices per node")
    p.add_argument("--gpu", default="l20", choices=sorted(GPU_PROFILES), help="simulated GPU model")
    p.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help="comma-separated: trident,b1,b4,b6,authors (and fifo); LABEL=POLICY runs a "
        "policy under another name, e.g. nobatch=trident --policy-opt nobatch.max_batch=1",
    )
    p.add_argument(
        "--slo-scale",
        type=float,
        default=2.5,
        help="deadline = this x a request's standalone latency",
    )
    p.add_argument("--rate", type=float, default=None, help="req/s (default: the trace's)")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of arrivals")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace and the noise")
    p.add_argument("--arrival", default="constant", choices=ARRIVALS, help="arrival process")
    p.add_argument("--cv", type=float, default=3.0, help="gap coefficient of variation (bursty)")
    p.add_argument("--noise", type=float, default=0.0, help="log-normal sigma on stage times")
    p.add_argument("--tick", type=float, default=0.1, help="Tick period, virtual seconds")
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="stop at this virtual time (default: when every request has ended)",
    )
    p.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the results to this file (default: none)",
    )
    p.add_argument(
        "--plot",
        dest="plot_out",
        default=None,
        metavar="OUT.png",
        help="draw the results to this PNG (default: none)",
    )
    p.add_argument(
        "--sweep",
        type=_parse_sweep,
        default=None,
        metavar="rate=..|slo_scale=..",
        help="run once per value, e.g. rate=1,2,4 or slo_scale=1.5,2.5 (default: one run)",
    )
    p.add_argument(
        "--policy-opt",
        type=_parse_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy option (docs/planner.md), e.g. max_batch=1 or dispatch.max_nodes=100; "
        "NAME.KEY=VALUE for one policy only, e.g. b1.degree=2 (repeatable; VALUE parsed as "
        "JSON when it can be); an unknown one is an error listing the valid ones "
        "(default: none)",
    )
    p.add_argument(
        "--model",
        type=_parse_kv,
        action="append",
        default=[],
        metavar="NAME=FAMILY",
        help="served model name in the trace -> family (repeatable; default: a name is its "
        "family, or the known family it starts with)",
    )
    p.add_argument(
        "--fault",
        type=_parse_fault,
        action="append",
        default=[],
        metavar="T,TARGET[,RESTART]",
        help="lose a device (n0/sim:3) or a node (n0) at virtual time T; back after RESTART s "
        "(repeatable; default: no faults)",
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="PATH",
        help="trident profile file(s) overriding the reference cost model (repeatable; "
        "default: none)",
    )
    p.add_argument(
        "--no-bound",
        action="store_true",
        help="skip the LP upper bound on SLO attainment (default: off, the bound is computed)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies:
        print("error: --policies is empty", file=sys.stderr)
        return 2
    for name, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            print(f"error: {name} must be >= 1", file=sys.stderr)
            return 2
    cfg = BenchConfig(
        trace=None if args.trace_file else (args.trace or "flux"),
        trace_file=args.trace_file,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu=args.gpu,
        policies=policies,
        slo_scale=args.slo_scale,
        rate=args.rate,
        duration_s=args.duration,
        seed=args.seed,
        arrival=args.arrival,
        cv=args.cv,
        noise=args.noise,
        tick_s=args.tick,
        max_time_s=args.max_time,
        policy_options=tuple(args.policy_opt),
        model_map=tuple((k, str(v)) for k, v in args.model),
        profiles=tuple(args.profile),
        faults=tuple(args.fault),
        bound=not args.no_bound,
    )
    try:
        run_bench(cfg, sweep=args.sweep, json_out=args.json_out, plot_out=args.plot_out)
    except (TraceError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
