"""``trident report LOGFILE [--png OUT] [--json OUT]``: what happened, from the logs alone.

Reads the scheduler's JSON lines and prints SLO attainment, latency percentiles, the
per-stage time breakdown (overall and per model) and failures by error code; ``--png``
draws a timeline: one row per device, one bar per stage task.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LogSummary", "main", "summarize"]

STAGE_COLORS = {"encode": "#4C72B0", "diffuse": "#DD8452", "decode": "#55A868"}


@dataclass
class LogSummary:
    arrived: int = 0
    finished: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    met_slo: int = 0
    with_slo: int = 0
    latencies: list[float] = field(default_factory=list)
    stage_totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    by_model: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    bars: list[tuple[str, float, float, str, str]] = field(
        default_factory=list
    )  # device, t0, t1, stage, request

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
        return xs[i]

    def as_dict(self) -> dict[str, Any]:
        n = max(1, self.finished)
        return {
            "requests": self.arrived,
            "completed": self.finished,
            "failed": dict(self.failed),
            "slo_attainment": self.met_slo / self.arrived if self.arrived else None,
            "mean_latency_s": sum(self.latencies) / n if self.latencies else None,
            "p50_latency_s": self.percentile(50),
            "p95_latency_s": self.percentile(95),
            "p99_latency_s": self.percentile(99),
            "mean_stage_s": {k: v / n for k, v in self.stage_totals.items()},
        }


def _events(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def summarize(path: str | Path) -> LogSummary:
    s = LogSummary()
    models: dict[str, str] = {}
    dispatched: dict[str, dict[str, Any]] = {}
    started: dict[str, float] = {}
    for e in _events(Path(path)):
        if e.get("component") != "scheduler":
            continue
        ev = e.get("event")
        if ev == "request.arrived":
            s.arrived += 1
            models[e["request_id"]] = e.get("model", "?")
        elif ev == "request.finished":
            s.finished += 1
            t = e.get("timings", {})
            total = float(t.get("total", 0.0))
            s.latencies.append(total)
            s.by_model[models.get(e["request_id"], "?")].append(total)
            for k in ("queue", "encode", "diffuse", "decode", "transfer", "load"):
                s.stage_totals[k] += float(t.get(k, 0.0))
            if e.get("met_slo") is not None:
                s.with_slo += 1
                s.met_slo += bool(e["met_slo"])
        elif ev == "request.failed":
            s.failed[str(e.get("error"))] += 1
        elif ev == "stage.dispatched":
            dispatched[e["task_id"]] = e
        elif ev == "stage.started":
            started[e["task_id"]] = float(e["ts"])
        elif ev == "stage.finished":
            d = dispatched.get(e.get("task_id", ""))
            t0 = started.get(e.get("task_id", ""))
            if d is None or t0 is None:
                continue
            stage = "+".join(d.get("stages", []))
            for dev in d.get("devices", []):
                s.bars.append((dev, t0, float(e["ts"]), stage, str(d.get("request_id"))))
    return s


def _timeline(s: LogSummary, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({b[0] for b in s.bars})
    if not devices:
        return
    t_min = min(b[1] for b in s.bars)
    row = {d: i for i, d in enumerate(devices)}
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(devices) + 1.5))
    for dev, t0, t1, stage, _ in s.bars:
        color = STAGE_COLORS.get(stage.split("+")[0], "#8172B3")
        ax.barh(
            row[dev],
            max(t1 - t0, 1e-3),
            left=t0 - t_min,
            color=color,
            edgecolor="black",
            linewidth=0.2,
        )
    ax.set_yticks(range(len(devices)), devices, fontsize=7)
    ax.set_xlabel("seconds since first stage")
    ax.set_title("Trident timeline (one bar per stage task)")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=c, label=k) for k, c in STAGE_COLORS.items()],
        loc="upper right",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trident report", description=__doc__.splitlines()[0])
    p.add_argument("logfile")
    p.add_argument("--png", help="write a timeline picture here")
    p.add_argument("--json", help="write the summary as JSON here")
    args = p.parse_args(argv)
    if not Path(args.logfile).exists():
        print(f"trident report: {args.logfile} does not exist", file=sys.stderr)
        return 2
    s = summarize(args.logfile)
    d = s.as_dict()
    print(
        f"requests: {s.arrived}  completed: {s.finished}  failed: {sum(s.failed.values())} {dict(s.failed) or ''}"
    )
    if d["slo_attainment"] is not None:
        print(f"SLO attainment: {d['slo_attainment']:.1%} ({s.met_slo}/{s.arrived})")
    if s.latencies:
        print(
            f"latency: mean {d['mean_latency_s']:.3f}s  p50 {d['p50_latency_s']:.3f}s  "
            f"p95 {d['p95_latency_s']:.3f}s  p99 {d['p99_latency_s']:.3f}s"
        )
        print(
            "mean per request: " + "  ".join(f"{k} {v:.3f}s" for k, v in d["mean_stage_s"].items())
        )
        for model, lat in sorted(s.by_model.items()):
            print(f"  {model}: {len(lat)} done, mean {sum(lat) / len(lat):.3f}s")
    if args.png:
        _timeline(s, args.png)
        print(f"timeline: {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
