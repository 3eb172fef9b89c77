"""``trident report LOGFILE [--png OUT] [--json OUT]``: what happened, from the logs alone.

Reads the scheduler's JSON lines and prints the request counts, SLO attainment, latency
percentiles, the per-stage time breakdown (overall and per model), failures by error
code and the faults and plan changes seen; ``--png`` draws a timeline: one row per device, one bar per
stage (a task that ran merged stages is drawn stage by stage), with markers for worker
deaths and restarts, failed stages, re-runs and placement changes.

The counts add up: every submitted request is either *rejected* at admission (refused
before it was queued: overloaded, unknown model, invalid, no device can serve it) or
one of the *requests*, and ``requests = completed + failed + cancelled + pending``
(pending: still unfinished when the log ends). SLO attainment is over everything
submitted: a rejected, failed, cancelled or unfinished request missed its SLO.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trident.cliformat import DefaultsHelpFormatter

__all__ = [
    "ADMISSION_ERRORS",
    "Bar",
    "LogSummary",
    "Marker",
    "NotATridentLogError",
    "build_parser",
    "main",
    "summarize",
]

STAGE_COLORS = {"encode": "#4C72B0", "diffuse": "#DD8452", "decode": "#55A868"}
LOAD_COLOR = "#BBBBBB"  # a stage's weights loading inside a task
OTHER_STAGE_COLOR = "#8172B3"

# Error codes that refuse a request at admission (before anything of it ran).
ADMISSION_ERRORS = frozenset({"overloaded", "unknown_model", "invalid_request", "unavailable"})

UNKNOWN_STAGE_COLOR = "#E8E8E8"  # a merged task cut short: which stage it was in is unknown

# The timeline's markers: kind -> (matplotlib marker, colour, legend label, y offset in
# its row: faults above the bars, what the scheduler did about them below).
MARKER_STYLES: dict[str, tuple[str, str, str, float]] = {
    "worker_died": ("X", "#C00000", "worker died / lost", 0.42),
    "node_lost": ("X", "#7F0000", "node lost", 0.42),
    "stage_failed": ("v", "#FF7F0E", "stage failed", 0.42),
    "worker_restarted": ("^", "#2CA02C", "worker rejoined", -0.42),
    "rerun": ("o", "#9467BD", "re-run / retry", -0.42),
    "placement": ("D", "#17BECF", "placement change", -0.42),
    "scheduler_restart": ("*", "#000000", "scheduler restart", 0.0),
}

# Events only Trident writes: a file holding none of them is not a Trident log.
_COMPONENTS = frozenset({"scheduler", "node", "worker", "gateway", "client", "serve"})


class NotATridentLogError(ValueError):
    """The file is missing, empty, or holds no Trident scheduler events."""


@dataclass
class Bar:
    """One stage (or a task's weight load) on one device, in log time (epoch seconds)."""

    device: str
    t0: float
    t1: float
    stage: str  # encode | diffuse | decode | load
    request_id: str
    task_id: str
    outcome: str = "finished"  # finished | failed | lost | unfinished


@dataclass
class Marker:
    """A fault or a plan change; ``device`` None: it concerns the whole cluster."""

    t: float
    device: str | None
    kind: str  # a key of MARKER_STYLES
    label: str


@dataclass
class _Req:
    request_id: str
    model: str = "?"
    status: str = "pending"  # pending | completed | failed | cancelled | rejected
    error: str | None = None
    dispatched: bool = False


@dataclass
class _Task:
    request_id: str
    stages: list[str]
    devices: list[str]
    started: float | None = None


@dataclass
class LogSummary:
    finished: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # admitted, then failed (not cancelled)
    cancelled: int = 0
    pending: int = 0  # admitted, not ended when the log ends
    rejected: Counter[str] = field(default_factory=Counter)  # refused at admission, by code
    met_slo: int = 0
    with_slo: int = 0
    latencies: list[float] = field(default_factory=list)
    stage_totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    by_model: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    bars: list[Bar] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    event_counts: Counter[str] = field(default_factory=Counter)  # marker kind -> count
    # "model:stage" -> (measured, planned) activation peak bytes of each task.memory
    # (docs/runtime.md "Memory truth"); either may be None.
    memory: dict[str, list[tuple[int | None, int | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # Weight-load seconds by where they came from (``stage.loaded``'s source: "peer",
    # "node-cache", "disk"; docs/runtime.md "Peer weight copies").
    loads: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def requests(self) -> int:
        """Admitted requests: completed + failed + cancelled + pending."""
        return self.finished + sum(self.failed.values()) + self.cancelled + self.pending

    @property
    def submitted(self) -> int:
        """Everything clients sent: the requests and the rejections."""
        return self.requests + sum(self.rejected.values())

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
        return xs[i]

    def as_dict(self) -> dict[str, Any]:
        n = max(1, self.finished)
        return {
            "submitted": self.submitted,
            "rejected": dict(self.rejected),
            "requests": self.requests,
            "completed": self.finished,
            "failed": dict(self.failed),
            "cancelled": self.cancelled,
            "pending": self.pending,
            "met_slo": self.met_slo,
            "slo_attainment": self.met_slo / self.submitted if self.submitted else None,
            "mean_latency_s": sum(self.latencies) / n if self.latencies else None,
            "p50_latency_s": self.percentile(50),
            "p95_latency_s": self.percentile(95),
            "p99_latency_s": self.percentile(99),
            "mean_stage_s": {k: v / n for k, v in self.stage_totals.items()},
            "timeline_events": dict(self.event_counts),
            "memory": self.memory_summary(),
            "loads": self.load_summary(),
        }

    def load_summary(self) -> dict[str, dict[str, Any]]:
        """Per load source: loads, total and mean seconds."""
        return {
            src: {
                "loads": len(xs),
                "total_s": round(sum(xs), 4),
                "mean_s": round(sum(xs) / len(xs), 4),
            }
            for src, xs in sorted(self.loads.items())
            if xs
        }

    def memory_summary(self) -> dict[str, dict[str, Any]]:
        """Per model:stage, from ``task.memory``: tasks, and the largest measured and
        planned activation peaks (bytes) with their ratio."""
        out: dict[str, dict[str, Any]] = {}
        for key, pairs in sorted(self.memory.items()):
            measured = [m for m, _ in pairs if m is not None]
            planned = [p for _, p in pairs if p is not None]
            mx, px = max(measured, default=None), max(planned, default=None)
            out[key] = {
                "tasks": len(pairs),
                "max_measured_peak_bytes": mx,
                "max_planned_peak_bytes": px,
                "measured_over_planned": round(mx / px, 4) if mx is not None and px else None,
            }
        return out


def _read(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict):
                yield e


def _events(path: Path) -> list[dict[str, Any]]:
    """The scheduler's events in ``path``; NotATridentLogError says why there are none."""
    if not path.exists():
        raise NotATridentLogError(f"{path}: no such file")
    if path.is_dir():
        raise NotATridentLogError(
            f"{path} is a directory: pass the log file in it (e.g. {path / 'trident.log'})"
        )
    if path.stat().st_size == 0:
        raise NotATridentLogError(f"{path} is empty: not a Trident log")
    n_json = 0
    components: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    for e in _read(path):
        n_json += 1
        comp = e.get("component")
        if isinstance(comp, str) and isinstance(e.get("event"), str) and comp in _COMPONENTS:
            components[comp] += 1
            if comp == "scheduler" and isinstance(e.get("ts"), int | float):
                out.append(e)
    if not n_json:
        raise NotATridentLogError(
            f"{path} is not a Trident log: it holds no JSON lines (Trident logs one JSON "
            "object per line; see the daemons' --log-file)"
        )
    if not components:
        raise NotATridentLogError(
            f"{path} is not a Trident log: {n_json} JSON lines, none of them a Trident event "
            "(an object with 'component' and 'event')"
        )
    if not out:
        seen = ", ".join(sorted(components))
        raise NotATridentLogError(
            f"{path} holds Trident events from {seen} but none from the scheduler: "
            "pass the scheduler's log (trident-scheduler --log-file)"
        )
    return out


def _segments(task: _Task, t1: float, seconds: dict[str, float], load_s: float) -> list[Bar]:
    """Split one task's span [started, t1] into its load and its stages, in order, using
    the per-stage seconds the worker reported (a task of merged stages runs them one
    after another on its devices)."""
    assert task.started is not None
    t0 = task.started
    span = max(0.0, t1 - t0)
    parts: list[tuple[str, float]] = []
    if load_s > 0:
        parts.append(("load", load_s))
    for st in task.stages:
        parts.append((st, max(0.0, float(seconds.get(st, 0.0)))))
    total = sum(d for _, d in parts)
    if total <= 0:
        parts = [(st, span / max(1, len(task.stages))) for st in task.stages]
    elif total > span:
        parts = [(st, d * span / total) for st, d in parts]  # clocks disagree a little: fit
    bars = []
    for dev in task.devices:
        t = t0
        for st, d in parts:
            bars.append(Bar(dev, t, t + d, st, task.request_id, "", "finished"))
            t += d
    return bars


def summarize(path: str | Path) -> LogSummary:
    """Everything ``trident report`` prints, from the scheduler's events in ``path``.

    Raises NotATridentLogError when the file is missing, empty or not a Trident log.
    """
    events = _events(Path(path))
    s = LogSummary()
    reqs: list[_Req] = []
    open_reqs: dict[str, _Req] = {}
    tasks: dict[str, _Task] = {}
    last_task_of: dict[str, str] = {}
    joined: set[str] = set()
    schedulers = 0

    def ended(rid: str) -> _Req:
        rec = open_reqs.pop(rid, None)
        if rec is None:  # its arrival is not in this log (it starts mid-run)
            rec = _Req(rid)
            reqs.append(rec)
        return rec

    def mark(t: float, device: str | None, kind: str, label: str) -> None:
        s.markers.append(Marker(t, device, kind, label))
        s.event_counts[kind] += 1

    def close_tasks_on(device: str, t: float) -> None:
        """A lost device ends the tasks it was running: drawn up to the loss."""
        for tid, task in list(tasks.items()):
            if task.started is not None and device in task.devices:
                for dev in task.devices:
                    s.bars.append(
                        Bar(dev, task.started, t, "+".join(task.stages), task.request_id, tid)
                    )
                    s.bars[-1].outcome = "lost"
                del tasks[tid]

    for e in events:
        ev = e["event"]
        ts = float(e["ts"])
        rid = str(e.get("request_id", ""))
        if ev == "scheduler.started":
            schedulers += 1
            if schedulers > 1:
                mark(ts, None, "scheduler_restart", "scheduler restarted")
        elif ev in ("request.arrived", "request.recovered"):
            if ev == "request.recovered" and rid in open_reqs:
                continue  # its arrival is earlier in this log
            rec = _Req(rid, str(e.get("model", "?")))
            reqs.append(rec)
            open_reqs[rid] = rec
        elif ev == "request.finished":
            rec = ended(rid)
            rec.status = "completed"
            t = e.get("timings") or {}
            total = float(t.get("total", 0.0))
            s.latencies.append(total)
            s.by_model[rec.model].append(total)
            for k in ("queue", "encode", "diffuse", "decode", "transfer", "load"):
                s.stage_totals[k] += float(t.get(k, 0.0))
            if e.get("met_slo") is not None:
                s.with_slo += 1
                s.met_slo += bool(e["met_slo"])
        elif ev == "request.failed":
            code = str(e.get("error"))
            duplicate = "already in flight" in str(e.get("message", ""))
            if e.get("admission") or duplicate or rid not in open_reqs:
                # Refused at intake, before it was queued (a duplicate id is refused
                # without touching the request already in flight under that id).
                reqs.append(_Req(rid, status="rejected", error=code))
                continue
            rec = ended(rid)
            rec.error = code
            if code == "cancelled":
                rec.status = "cancelled"
            elif code in ADMISSION_ERRORS and not rec.dispatched:
                rec.status = "rejected"
            else:
                rec.status = "failed"
        elif ev == "request.unrecoverable":
            rec = ended(rid)
            rec.status, rec.error = "failed", "unrecoverable"
        elif ev == "stage.dispatched":
            if rid in open_reqs:
                open_reqs[rid].dispatched = True
            tid = str(e.get("task_id", ""))
            tasks[tid] = _Task(rid, list(e.get("stages") or []), list(e.get("devices") or []))
            last_task_of[rid] = tid
        elif ev == "stage.started":
            task = tasks.get(str(e.get("task_id", "")))
            if task is not None and task.started is None:
                task.started = ts
        elif ev == "stage.finished":
            tid = str(e.get("task_id", ""))
            task = tasks.pop(tid, None)
            if task is None or task.started is None:
                continue
            seconds = {str(k): float(v) for k, v in (e.get("seconds") or {}).items()}
            for b in _segments(task, ts, seconds, float(e.get("load_s") or 0.0)):
                b.task_id = tid
                s.bars.append(b)
        elif ev == "stage.failed":
            tid = str(e.get("task_id", ""))
            task = tasks.pop(tid, None)
            dev = str(e.get("device_id", ""))
            if task is not None and task.started is not None:
                stage = str(e.get("stage") or "+".join(task.stages))
                for d in task.devices:
                    s.bars.append(Bar(d, task.started, ts, stage, task.request_id, tid, "failed"))
            if e.get("error") != "cancelled":
                mark(ts, dev or None, "stage_failed", f"{e.get('stage') or 'stage'} failed")
        elif ev in ("stage.retry", "stage.rerun"):
            task = tasks.get(str(e.get("task_id", ""))) or tasks.get(last_task_of.get(rid, ""))
            if task is None and last_task_of.get(rid):
                task = _last_known_task(s, last_task_of[rid])
            rerun_devs: list[str | None] = list(task.devices) if task is not None else [None]
            for rd in rerun_devs:
                mark(ts, rd, "rerun", "re-run" if ev == "stage.rerun" else "retry")
        elif ev in ("worker.died", "worker.lost"):
            dev = str(e.get("device_id", ""))
            # One death is often logged twice (the node's report, then the loss).
            if not any(
                m.kind == "worker_died" and m.device == dev and abs(m.t - ts) < 1.0
                for m in s.markers[-4:]
            ):
                mark(ts, dev, "worker_died", ev.replace("worker.", "worker "))
            close_tasks_on(dev, ts)
        elif ev == "worker.joined":
            dev = str(e.get("device_id", ""))
            if dev in joined:
                mark(ts, dev, "worker_restarted", "worker rejoined")
            joined.add(dev)
        elif ev == "node.lost":
            if e.get("reason") == "node shut down":
                continue  # an orderly stop, not a fault
            node = str(e.get("node_id", ""))
            node_devs: list[str | None] = [None]
            node_devs = [*sorted(d for d in joined if d.split("/")[0] == node)] or node_devs
            for nd in node_devs:
                mark(ts, nd, "node_lost", f"node {node} lost")
                if nd is not None:
                    close_tasks_on(nd, ts)
        elif ev == "stage.loaded":
            # The scheduler logs every load it hears of; the worker's own line (same
            # load, in a shared log) is not counted twice.
            secs = e.get("seconds")
            if e.get("component") != "worker" and isinstance(secs, int | float):
                s.loads[str(e.get("source") or "?")].append(float(secs))
        elif ev == "task.memory":
            measured = e.get("measured_stage_peak_bytes") or {}
            for stage, planned in (e.get("planned_stage_peak_bytes") or {}).items():
                got = measured.get(stage)
                s.memory[f"{e.get('model', '?')}:{stage}"].append(
                    (int(got) if got is not None else None, int(planned))
                )
        elif ev == "placement.changed":
            mark(ts, None, "placement", "placement changed")
        elif ev in ("placement.adjusted", "placement.rehomed"):
            devs = e.get("devices") or ([e["device"]] if e.get("device") else [])
            for d in devs or [None]:
                mark(ts, d, "placement", ev.replace("placement.", "placement "))

    end = float(events[-1]["ts"])
    for tid, task in tasks.items():
        if task.started is not None:
            for d in task.devices:
                s.bars.append(
                    Bar(d, task.started, end, "+".join(task.stages), task.request_id, tid)
                )
                s.bars[-1].outcome = "unfinished"
    for rec in reqs:
        if rec.status == "completed":
            s.finished += 1
        elif rec.status == "failed":
            s.failed[rec.error or "?"] += 1
        elif rec.status == "cancelled":
            s.cancelled += 1
        elif rec.status == "rejected":
            s.rejected[rec.error or "?"] += 1
        else:
            s.pending += 1
    return s


def _last_known_task(s: LogSummary, task_id: str) -> _Task | None:
    """A task already drawn (e.g. ended by its device's loss), rebuilt from its bars."""
    devs = sorted({b.device for b in s.bars if b.task_id == task_id})
    if not devs:
        return None
    return _Task(request_id="", stages=[], devices=devs)


def _timeline(s: LogSummary, out: str) -> bool:
    """Draw the timeline PNG; False when the log has nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    devices = sorted({b.device for b in s.bars} | {m.device for m in s.markers if m.device})
    if not devices:
        return False
    times = [b.t0 for b in s.bars] + [m.t for m in s.markers]
    t_min = min(times)
    row = {d: i for i, d in enumerate(devices)}
    fig, ax = plt.subplots(figsize=(12, 0.4 * len(devices) + 2.0))
    for b in s.bars:
        if b.stage == "load":
            color = LOAD_COLOR
        elif "+" in b.stage:
            color = UNKNOWN_STAGE_COLOR
        else:
            color = STAGE_COLORS.get(b.stage, OTHER_STAGE_COLOR)
        ax.barh(
            row[b.device],
            max(b.t1 - b.t0, 1e-3),
            left=b.t0 - t_min,
            color=color,
            edgecolor="black" if b.outcome == "finished" else "#C00000",
            linewidth=0.2 if b.outcome == "finished" else 0.8,
            hatch=None if b.outcome == "finished" else "//",
            height=0.7,
        )
    used: set[str] = set()
    for m in s.markers:
        style, color, _, dy = MARKER_STYLES[m.kind]
        used.add(m.kind)
        x = m.t - t_min
        if m.device is None:
            ax.axvline(x, color=color, linestyle=":", linewidth=1.0)
            ax.plot([x], [len(devices) - 0.45], marker=style, color=color, markersize=7)
        else:
            ax.plot(
                [x],
                [row[m.device] + dy],
                marker=style,
                color=color,
                markersize=8,
                markeredgecolor="black",
                markeredgewidth=0.4,
                linestyle="none",
            )
    ax.set_yticks(range(len(devices)), devices, fontsize=7)
    ax.set_ylim(-0.7, len(devices) - 0.2)
    ax.set_xlabel("seconds since the first event drawn")
    ax.set_title("Trident timeline (one bar per stage; hatched: failed, lost or unfinished)")
    stages_seen = {b.stage for b in s.bars}
    handles: list[Any] = [Patch(color=c, label=k) for k, c in STAGE_COLORS.items()]
    if "load" in stages_seen:
        handles.append(Patch(color=LOAD_COLOR, label="load"))
    if any("+" in st for st in stages_seen):
        handles.append(Patch(color=UNKNOWN_STAGE_COLOR, label="merged task cut short"))
    if {st for st in stages_seen if "+" not in st} - set(STAGE_COLORS) - {"load"}:
        handles.append(Patch(color=OTHER_STAGE_COLOR, label="other stage"))
    if any(b.outcome != "finished" for b in s.bars):
        handles.append(
            Patch(
                facecolor="white", edgecolor="#C00000", hatch="//", label="failed/lost/unfinished"
            )
        )
    for kind in MARKER_STYLES:
        if kind in used:
            style, color, label, _ = MARKER_STYLES[kind]
            handles.append(Line2D([], [], marker=style, color=color, linestyle="none", label=label))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trident report",
        description="What happened, from the scheduler's log alone: request counts, SLO "
        "attainment, latency, failures and (--png) a timeline per device.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("logfile", help="the scheduler's JSON-lines log (its --log-file)")
    p.add_argument(
        "--png", default=None, help="write the timeline picture to this file (default: none)"
    )
    p.add_argument(
        "--json", default=None, help="write the summary as JSON to this file (default: none)"
    )
    return p


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.2f} GiB"


def _codes(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.most_common())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = summarize(args.logfile)
    except NotATridentLogError as exc:
        print(f"trident report: error: {exc}", file=sys.stderr)
        return 2
    d = s.as_dict()
    n_failed = sum(s.failed.values())
    print(
        f"requests: {s.requests} = completed {s.finished} + failed {n_failed}"
        + (f" ({_codes(s.failed)})" if n_failed else "")
        + f" + cancelled {s.cancelled} + pending at log end {s.pending}"
    )
    n_rej = sum(s.rejected.values())
    print(
        f"rejected at admission: {n_rej}"
        + (f" ({_codes(s.rejected)})" if n_rej else "")
        + f"; {s.submitted} submitted in all"
    )
    if s.submitted:
        print(
            f"SLO attainment: {d['slo_attainment']:.1%} ({s.met_slo} met / {s.submitted} "
            "submitted; rejected, failed, cancelled and pending requests count as misses)"
        )
    if s.latencies:
        print(
            f"latency (completed): mean {d['mean_latency_s']:.3f}s  p50 {d['p50_latency_s']:.3f}s  "
            f"p95 {d['p95_latency_s']:.3f}s  p99 {d['p99_latency_s']:.3f}s"
        )
        print(
            "mean per request: " + "  ".join(f"{k} {v:.3f}s" for k, v in d["mean_stage_s"].items())
        )
        for model, lat in sorted(s.by_model.items()):
            print(f"  {model}: {len(lat)} done, mean {sum(lat) / len(lat):.3f}s")
    for key, m in d["memory"].items():
        ratio = m["measured_over_planned"]
        print(
            f"memory {key}: {m['tasks']} tasks, peak measured "
            f"{_gib(m['max_measured_peak_bytes'])} / planned {_gib(m['max_planned_peak_bytes'])}"
            + (f" ({ratio:.2f}x)" if ratio is not None else "")
        )
    if d["loads"]:
        print(
            "weight loads: "
            + ", ".join(
                f"{src} {m['loads']} (mean {m['mean_s']:.3f}s)" for src, m in d["loads"].items()
            )
        )
    if s.event_counts:
        print(
            "events: "
            + ", ".join(f"{MARKER_STYLES[k][2]} {v}" for k, v in sorted(s.event_counts.items()))
        )
    if args.png:
        if _timeline(s, args.png):
            print(f"timeline: {args.png}")
        else:
            print("timeline: nothing to draw (no stage ran in this log)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
