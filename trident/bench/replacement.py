"""Dynamic re-placement against a frozen plan on a shifting workload (issue #6).

A step trace — image-heavy for ``phase_s`` seconds, then video-heavy for as long — on a
simulated cluster, run with ``trident`` (monitor + trigger + re-placement) and
``trident-static`` (same dispatcher; placement planned for the first window, then
frozen). Reports SLO attainment per phase, writes a JSON file and a PNG timeline of
placement changes (devices x time, coloured by model, shaded by placement type).

    python -m trident.bench.replacement --nodes 4 --gpus-per-node 8 \\
        --json bench/results/replacement_4x8.json --plot bench/results/replacement_4x8.png
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trident.cliformat import DefaultsHelpFormatter
from trident.sched.cost import load_cost_model
from trident.sched.graph import placement_type
from trident.sched.types import Command, Event, LogEvent, Policy
from trident.sim.engine import ClusterSpec, SimConfig, SimResult, simulate
from trident.sim.scenario import GPU_PROFILES, build_models, make_requests, make_sim_policy
from trident.sim.traces import FAMILY_SHAPES, TraceRequest

__all__ = [
    "DEFAULT_PHASE1",
    "DEFAULT_PHASE2",
    "PlacementRecorder",
    "build_parser",
    "main",
    "phase_stats",
    "plot_timeline",
    "run_replacement",
    "step_trace",
]

# req/s per family. Phase 1 ~ 25 device-s/s of work, ~90% image; phase 2 ~ 17, ~94% video
# (reference cost model, L20; flux ~39, sd3 ~4.6, cogvideox ~635 device-s per request).
DEFAULT_PHASE1: dict[str, float] = {"flux": 0.5, "sd3": 0.8, "cogvideox": 0.004}
DEFAULT_PHASE2: dict[str, float] = {"flux": 0.03, "sd3": 0.05, "cogvideox": 0.025}


def step_trace(
    phase_s: float,
    phase1: Mapping[str, float],
    phase2: Mapping[str, float],
    seed: int = 0,
) -> list[TraceRequest]:
    """Poisson arrivals per family at ``phase1`` rates for ``phase_s`` seconds, then at
    ``phase2`` rates for as long; shapes drawn uniformly from the family's trace shapes.
    Deterministic for a seed."""
    rng = random.Random(f"replacement:{seed}")
    out: list[tuple[float, str, tuple[int, int, int, int]]] = []
    for start, rates in ((0.0, phase1), (phase_s, phase2)):
        for fam in sorted(rates):
            r = rates[fam]
            if r <= 0:
                continue
            t = start + rng.expovariate(r)
            while t < start + phase_s:
                out.append((t, fam, rng.choice(FAMILY_SHAPES[fam])))
                t += rng.expovariate(r)
    out.sort(key=lambda x: (x[0], x[1]))
    return [
        TraceRequest(
            arrival_s=round(t, 6),
            model=fam,
            height=h,
            width=w,
            num_frames=f,
            num_inference_steps=steps,
            request_id=f"r{i:06d}",
        )
        for i, (t, fam, (h, w, f, steps)) in enumerate(out)
    ]


@dataclass
class PlacementRecorder:
    """Wraps a placed policy: after every event that changed the plan (a
    ``placement.*`` LogEvent), records the whole plan (device -> {model: type})."""

    inner: Policy
    changes: list[dict[str, Any]] = field(default_factory=list)
    plans: list[tuple[float, dict[str, dict[str, str]]]] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.inner.name

    def handle(self, event: Event, now: float) -> list[Command]:
        out = self.inner.handle(event, now)
        logs = [c for c in out if isinstance(c, LogEvent) and c.event.startswith("placement.")]
        if logs:
            for c in logs:
                f = dict(c.fields)
                rec: dict[str, Any] = {"time": round(now, 3), "event": c.event}
                for k in ("reason", "devices_changed", "ratio_before", "ratio_after", "trigger"):
                    if k in f:
                        rec[k] = f[k]
                if c.event == "placement.adjusted":
                    rec.update(
                        {k: f[k] for k in ("model", "stage", "devices", "evicted") if k in f}
                    )
                self.changes.append(rec)
            self.plans.append((now, self._plan()))
        return out

    def _plan(self) -> dict[str, dict[str, str]]:
        graph = getattr(self.inner, "graph", None)
        if graph is None:
            return {}
        return {
            info.device_id: {
                m: placement_type(st) for m, st in graph.placement(info.device_id).items() if st
            }
            for info in graph.devices(up_only=False)
        }


def phase_stats(res: SimResult, phase_s: float) -> dict[str, dict[str, Any]]:
    """SLO attainment, latency and counts per phase (by arrival) and overall."""
    out: dict[str, dict[str, Any]] = {}
    for name, lo, hi in (
        ("phase1", -math.inf, phase_s),
        ("phase2", phase_s, math.inf),
        ("all", -math.inf, math.inf),
    ):
        recs = [r for r in res.records if lo <= r.arrival < hi]
        done = [r for r in recs if r.status == "completed"]
        lat = sorted(r.latency for r in done if r.latency is not None)
        per_model: dict[str, list[int]] = {}
        for r in recs:
            v = per_model.setdefault(r.model, [0, 0])
            v[0] += 1
            v[1] += int(r.met_slo)
        out[name] = {
            "requests": len(recs),
            "completed": len(done),
            "failed": sum(1 for r in recs if r.status == "failed"),
            "unfinished": sum(1 for r in recs if r.status == "unfinished"),
            "slo_attainment": round(sum(r.met_slo for r in recs) / len(recs), 4) if recs else None,
            "mean_latency_s": round(sum(lat) / len(lat), 2) if lat else None,
            "p95_latency_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2)
            if lat
            else None,
            "slo_by_model": {
                m: round(met / n, 4) if n else None for m, (n, met) in sorted(per_model.items())
            },
        }
    return out


def run_replacement(
    *,
    nodes: int = 4,
    gpus_per_node: int = 8,
    gpu: str = "l20",
    phase_s: float = 600.0,
    phase1: Mapping[str, float] | None = None,
    phase2: Mapping[str, float] | None = None,
    policies: Sequence[str] = ("trident", "trident-static"),
    slo_scale: float = 2.5,
    seed: int = 0,
    noise: float = 0.0,
    policy_options: Mapping[str, Any] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run each policy on the step trace; the document written as JSON."""
    p1 = dict(DEFAULT_PHASE1 if phase1 is None else phase1)
    p2 = dict(DEFAULT_PHASE2 if phase2 is None else phase2)
    cost = load_cost_model([])
    trace = step_trace(phase_s, p1, p2, seed)
    models = build_models(cost, sorted({r.model for r in trace} | set(p1) | set(p2)))
    requests = make_requests(trace, models, cost, slo_scale, gpus_per_node)
    prof = GPU_PROFILES[gpu]
    cluster = ClusterSpec(nodes, gpus_per_node, memory_bytes=prof.memory_bytes, speed=prof.speed)
    sim_cfg = SimConfig(seed=seed, tick_s=0.1, noise=noise)
    doc: dict[str, Any] = {
        "config": {
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "gpu": gpu,
            "phase_s": phase_s,
            "phase1_rates": p1,
            "phase2_rates": p2,
            "slo_scale": slo_scale,
            "seed": seed,
            "noise": noise,
            "policy_options": dict(policy_options or {}),
            "requests": len(requests),
            "requests_by_phase": {
                "phase1": sum(1 for r in requests if r.arrival < phase_s),
                "phase2": sum(1 for r in requests if r.arrival >= phase_s),
            },
        },
        "policies": {},
    }
    for name in policies:
        t0 = time.perf_counter()
        opts = {"slo_scale": slo_scale, **dict(policy_options or {})}
        rec = PlacementRecorder(make_sim_policy(name, models, cost, **opts))
        res = simulate(rec, cost, models, cluster, requests, sim_cfg)
        stats = phase_stats(res, phase_s)
        doc["policies"][name] = {
            **stats,
            "wall_s": round(time.perf_counter() - t0, 2),
            "policy_s": round(res.policy_seconds, 2),
            "end_time_s": round(res.end_time, 1),
            "log_events": res.log_events,
            "placement_changes": rec.changes,
            "plans": [{"time": round(t, 3), "plan": p} for t, p in rec.plans],
        }
        s1, s2, sa = stats["phase1"], stats["phase2"], stats["all"]
        log(
            f"  {name:<15} phase1 SLO {s1['slo_attainment']}  phase2 SLO {s2['slo_attainment']}  "
            f"all {sa['slo_attainment']}  failed {sa['failed']}  "
            f"changes {sum(1 for c in rec.changes if c['event'] == 'placement.changed')}  "
            f"({time.perf_counter() - t0:.0f}s wall)"
        )
    return doc


def format_table(doc: Mapping[str, Any]) -> str:
    head = (
        f"{'policy':<15} {'SLO ph1':>8} {'SLO ph2':>8} {'SLO all':>8} {'mean ph2 s':>11} "
        f"{'P95 ph2 s':>10} {'failed':>7} {'re-plans':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, p in doc["policies"].items():
        n = sum(
            1
            for c in p["placement_changes"]
            if c["event"] == "placement.changed" and c.get("trigger")
        )
        lines.append(
            f"{name:<15} {p['phase1']['slo_attainment']!s:>8} {p['phase2']['slo_attainment']!s:>8} "
            f"{p['all']['slo_attainment']!s:>8} {p['phase2']['mean_latency_s']!s:>11} "
            f"{p['phase2']['p95_latency_s']!s:>10} {p['all']['failed']:>7} {n:>9}"
        )
    return "\n".join(lines)


def plot_timeline(doc: Mapping[str, Any], path: str | Path) -> None:
    """One panel per policy: devices (rows) x time, coloured by model, shaded by
    placement type; a dashed line at the phase shift; ticks for re-plans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pols = list(doc["policies"])
    phase_s = float(doc["config"]["phase_s"])
    end = max(float(p["end_time_s"]) for p in doc["policies"].values())
    models = sorted(
        {
            m
            for p in doc["policies"].values()
            for pl in p["plans"]
            for held in pl["plan"].values()
            for m in held
        }
    )
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    alpha = {"EDC": 1.0, "DC": 0.8, "ED": 0.8, "D": 0.65, "E": 0.35, "C": 0.35}
    fig, axes = plt.subplots(len(pols), 1, figsize=(13, 2.2 + 0.16 * 32 * len(pols)), squeeze=False)
    for ax, name in zip(axes[:, 0], pols, strict=True):
        plans = doc["policies"][name]["plans"]
        devs = sorted({d for pl in plans for d in pl["plan"]}, key=_dev_key)
        row = {d: i for i, d in enumerate(devs)}
        for j, pl in enumerate(plans):
            t0 = float(pl["time"])
            t1 = float(plans[j + 1]["time"]) if j + 1 < len(plans) else end
            if t1 <= t0:
                continue
            for d, held in pl["plan"].items():
                items = sorted(held.items())
                if not items:
                    continue
                h = 0.8 / len(items)
                for k, (m, t) in enumerate(items):
                    ax.broken_barh(
                        [(t0, t1 - t0)],
                        (row[d] - 0.4 + k * h, h),
                        facecolors=colors[m],
                        alpha=alpha.get(t, 0.5),
                        linewidth=0,
                    )
        for c in doc["policies"][name]["placement_changes"]:
            if c["event"] == "placement.changed":
                ax.axvline(float(c["time"]), color="k", lw=0.6, alpha=0.5)
        ax.axvline(phase_s, color="red", ls="--", lw=1.2)
        ph = doc["policies"][name]
        ax.set_title(
            f"{name}: SLO phase 1 {ph['phase1']['slo_attainment']}, "
            f"phase 2 {ph['phase2']['slo_attainment']} (red: mix shift; black: re-plan)",
            fontsize=10,
        )
        ax.set_yticks(range(len(devs)))
        ax.set_yticklabels(devs, fontsize=5)
        ax.set_xlim(0, min(end, 3 * phase_s))  # the drain after the trace can be long
        ax.set_ylim(-0.6, len(devs) - 0.4)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("time (s)")
    handles = [Patch(color=colors[m], label=m) for m in models]
    handles += [
        Patch(color="grey", alpha=alpha[t], label=f"<{t}>") for t in ("EDC", "DC", "D", "E")
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _dev_key(d: str) -> tuple[str, int]:
    node, _, rest = d.partition("/")
    idx = rest.rpartition(":")[2]
    return node, int(idx) if idx.isdigit() else 0


def _rates(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if not k.strip() or not v:
            raise argparse.ArgumentTypeError(f"expected FAMILY=RATE,..., got {text!r}")
        out[k.strip()] = float(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trident bench replacement",
        description="Dynamic re-placement (trident) vs a frozen plan (trident-static) on a "
        "step trace: image-heavy, then video-heavy.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=4, help="nodes in the simulated cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="simulated devices per node")
    p.add_argument("--gpu", default="l20", choices=sorted(GPU_PROFILES), help="simulated GPU model")
    p.add_argument("--phase", type=float, default=600.0, help="seconds per phase")
    p.add_argument(
        "--phase1",
        type=_rates,
        default=None,
        metavar="FAM=RATE,...",
        help="phase 1 arrival rates, req/s per family "
        f"(default: {','.join(f'{k}={v:g}' for k, v in DEFAULT_PHASE1.items())})",
    )
    p.add_argument(
        "--phase2",
        type=_rates,
        default=None,
        metavar="FAM=RATE,...",
        help="phase 2 arrival rates, req/s per family "
        f"(default: {','.join(f'{k}={v:g}' for k, v in DEFAULT_PHASE2.items())})",
    )
    p.add_argument(
        "--policies", default="trident,trident-static", help="comma-separated policies to run"
    )
    p.add_argument(
        "--slo-scale",
        type=float,
        default=2.5,
        help="deadline = this x a request's standalone latency",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the trace")
    p.add_argument(
        "--noise", type=float, default=0.0, help="log-normal sigma on simulated stage times"
    )
    p.add_argument(
        "--policy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy option passed to make_policy (repeatable; default: none)",
    )
    p.add_argument(
        "--json",
        dest="json_out",
        default=None,
        help="write the results to this file (default: none)",
    )
    p.add_argument(
        "--plot",
        dest="plot_out",
        default=None,
        help="draw the placement timeline to this PNG (default: none)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts: dict[str, Any] = {}
    for kv in args.policy_opt:
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    print(
        f"step trace: {args.phase:g} s at {args.phase1 or DEFAULT_PHASE1} req/s, then "
        f"{args.phase:g} s at {args.phase2 or DEFAULT_PHASE2} req/s; "
        f"{args.nodes}x{args.gpus_per_node} {args.gpu}, slo_scale {args.slo_scale}, seed {args.seed}"
    )
    doc = run_replacement(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu=args.gpu,
        phase_s=args.phase,
        phase1=args.phase1,
        phase2=args.phase2,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        slo_scale=args.slo_scale,
        seed=args.seed,
        noise=args.noise,
        policy_options=opts,
    )
    print()
    print(format_table(doc))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json_out}")
    if args.plot_out:
        plot_timeline(doc, args.plot_out)
        print(f"wrote {args.plot_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
