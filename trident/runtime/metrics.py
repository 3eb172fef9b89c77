"""Prometheus metrics of the scheduler daemon and the HTTP gateway: every metric name
lives here (docs/metrics.md lists them; deploy/grafana/trident.json charts them).

The scheduler calls :class:`SchedulerMetrics` at the points where it already logs an
event (``request.finished``, ``stage.finished``, ``worker.died``, the core's
``placement.changed`` and ``dispatch.solved``, ...). Each call is a few counter or
histogram updates (a lock and an add): nothing slow runs on the event loop. Gauges of
the cluster's state (queues, running tasks, resident weights) are not kept up to date
one change at a time: the daemon hands over a :class:`~trident.runtime.protocol.ClusterStatus`
snapshot now and then (:meth:`SchedulerMetrics.set_cluster`) and a collector reads the
latest one when Prometheus scrapes, on the HTTP server's thread.

Label values are bounded: ``model`` is a served model's name (anything else is
``"unknown"``), ``outcome`` / ``reason`` a Trident error code, ``device`` a device id
the cluster announced. A client cannot make new series.

:func:`serve_metrics` runs prometheus_client's HTTP server on a thread of its own
(``trident-scheduler --metrics-addr HOST:PORT``); :class:`GatewayMetrics` and
:class:`HttpMetricsMiddleware` count the gateway's HTTP requests by route and status.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from trident.runtime.protocol import ClusterStatus

__all__ = [
    "CONTENT_TYPE_LATEST",
    "GATEWAY_METRICS",
    "LATENCY_BUCKETS_S",
    "PHASES",
    "SCHEDULER_METRICS",
    "SOLVER_BUCKETS_S",
    "GatewayMetrics",
    "HttpMetricsMiddleware",
    "MetricsServer",
    "RecentSlo",
    "SchedulerMetrics",
    "generate_latest",
    "parse_metrics_addr",
    "serve_metrics",
]

# Images take seconds, videos minutes: buckets from 50 ms to 20 min.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
PHASE_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Solver budgets are node counts, not seconds; a round usually takes milliseconds.
SOLVER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
HTTP_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# A request's time split as its result's ``timings`` split it (``total`` aside).
PHASES = ("queue", "encode", "diffuse", "decode", "transfer", "load")
UNKNOWN = "unknown"
# Dispatch answers from the greedy plan for one of these reasons when the MIP could not
# (the others, "trivial", "configured", "empty", are not fallbacks).
_DISPATCH_FALLBACKS = frozenset({"no_solver", "error", "node_limit"})
_PLACEMENT_KINDS = {
    "placement.changed": "changed",
    "placement.rehomed": "rehomed",
    "placement.adjusted": "adjusted",
}
_RERUN_KINDS = {"stage.rerun": "rerun", "stage.retry": "retry"}

# name (as exposed, without _total / _bucket suffixes) -> (type, labels, help)
SCHEDULER_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "trident_requests": (
        "counter",
        ("model", "outcome"),
        "Requests that ended, by outcome: completed or the error code",
    ),
    "trident_request_latency_seconds": (
        "histogram",
        ("model",),
        "End-to-end latency of completed requests (arrival to result)",
    ),
    "trident_stage_seconds": (
        "histogram",
        ("model", "phase"),
        "Completed requests' time per phase: queue, encode, diffuse, decode, transfer, load",
    ),
    "trident_slo_finished": (
        "counter",
        ("model",),
        "Completed requests that had a deadline (SLO attainment's denominator)",
    ),
    "trident_slo_on_time": (
        "counter",
        ("model",),
        "Completed requests that met their deadline (SLO attainment's numerator)",
    ),
    "trident_admission_rejections": (
        "counter",
        ("model", "reason"),
        "Requests refused before any stage ran (overloaded, unavailable, invalid_request, ...)",
    ),
    "trident_stage_reruns": (
        "counter",
        ("model", "kind"),
        "Stages run again: rerun (a device or kept output was lost) or retry (retryable failure)",
    ),
    "trident_placement_changes": (
        "counter",
        ("kind",),
        "Placement plans applied: changed (orchestrator), rehomed (idle device), adjusted",
    ),
    "trident_worker_restarts": (
        "counter",
        ("device",),
        "Worker processes that exited (their node restarts them)",
    ),
    "trident_device_busy_seconds": (
        "counter",
        ("device",),
        "Seconds of stage work a device finished",
    ),
    "trident_solver_seconds": (
        "histogram",
        ("problem", "solver"),
        "Solver time per round: problem dispatch or placement; solver mip, greedy, proportional",
    ),
    "trident_solver_fallbacks": (
        "counter",
        ("problem", "reason"),
        "Rounds answered by the fallback heuristic instead of the MIP",
    ),
    "trident_queue_depth": (
        "gauge",
        ("model",),
        "Admitted requests waiting for their next stage (none of their stages on a device)",
    ),
    "trident_requests_running": (
        "gauge",
        ("model",),
        "Admitted requests with a stage sent to a device",
    ),
    "trident_model_available": (
        "gauge",
        ("model",),
        "1 while some live device can serve the model, else 0",
    ),
    "trident_node_up": ("gauge", ("node",), "1 while the node is connected, else 0"),
    "trident_device_up": ("gauge", ("device", "node"), "1 while the device's worker is up"),
    "trident_device_running_tasks": (
        "gauge",
        ("device", "node"),
        "Tasks sent to the device and not ended (running or in its worker's queue)",
    ),
    "trident_device_resident_weight_bytes": (
        "gauge",
        ("device", "node"),
        "Weight bytes of the stages resident on the device",
    ),
    "trident_device_resident_stage": (
        "gauge",
        ("device", "model", "stage"),
        "1 for each model stage whose weights are resident on the device",
    ),
}

GATEWAY_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "trident_gateway_http_requests": (
        "counter",
        ("route", "method", "status"),
        "HTTP requests answered, by route template, method and status code",
    ),
    "trident_gateway_http_request_seconds": (
        "histogram",
        ("route", "method"),
        "HTTP request duration, by route template and method",
    ),
}


def _counter(registry: CollectorRegistry, name: str) -> Counter:
    kind, labels, doc = SCHEDULER_METRICS.get(name) or GATEWAY_METRICS[name]
    assert kind == "counter"
    return Counter(name, doc, labels, registry=registry)


def _histogram(registry: CollectorRegistry, name: str, buckets: Iterable[float]) -> Histogram:
    kind, labels, doc = SCHEDULER_METRICS.get(name) or GATEWAY_METRICS[name]
    assert kind == "histogram"
    return Histogram(name, doc, labels, registry=registry, buckets=tuple(buckets))


class RecentSlo:
    """SLO outcomes of the requests completed in the last ``window_s`` seconds, per
    model (``trident status``'s "recent SLO"); at most ``max_per_model`` kept each."""

    def __init__(self, window_s: float = 300.0, max_per_model: int = 10_000) -> None:
        self.window_s = window_s
        self.max_per_model = max_per_model
        self._outcomes: dict[str, deque[tuple[float, bool]]] = {}

    def add(self, model: str, met: bool, now: float) -> None:
        q = self._outcomes.setdefault(model, deque(maxlen=self.max_per_model))
        q.append((now, met))
        self._expire(q, now)

    def _expire(self, q: deque[tuple[float, bool]], now: float) -> None:
        while q and q[0][0] < now - self.window_s:
            q.popleft()

    def counts(self, model: str, now: float) -> tuple[int, int]:
        """(finished, on time) within the window."""
        q = self._outcomes.get(model)
        if not q:
            return 0, 0
        self._expire(q, now)
        return len(q), sum(1 for _, met in q if met)


class _ClusterCollector(Collector):
    """The gauges, read from the latest snapshot at scrape time (on the server's
    thread: the snapshot is replaced whole, never edited, so there is no race)."""

    def __init__(self) -> None:
        self.status: ClusterStatus | None = None

    def describe(self) -> list[Metric]:
        return []  # no describe-time collect: the registry must not call collect early

    def collect(self) -> Iterator[Metric]:
        st = self.status
        if st is None:
            return

        def family(name: str) -> GaugeMetricFamily:
            _, labels, doc = SCHEDULER_METRICS[name]
            return GaugeMetricFamily(name, doc, labels=list(labels))

        queue, running = family("trident_queue_depth"), family("trident_requests_running")
        available = family("trident_model_available")
        for m in st.models:
            queue.add_metric([m.name], m.queued)
            running.add_metric([m.name], m.running)
            available.add_metric([m.name], 1.0 if m.available else 0.0)
        node_up = family("trident_node_up")
        for n in st.nodes:
            node_up.add_metric([n.node_id], 1.0 if n.up else 0.0)
        dev_up, tasks = family("trident_device_up"), family("trident_device_running_tasks")
        weights = family("trident_device_resident_weight_bytes")
        stages = family("trident_device_resident_stage")
        for d in st.devices:
            dev_up.add_metric([d.device_id, d.node_id], 1.0 if d.up else 0.0)
            tasks.add_metric([d.device_id, d.node_id], len(d.running))
            weights.add_metric([d.device_id, d.node_id], d.resident_bytes)
            for r in d.resident:
                stages.add_metric([d.device_id, r.model, r.stage], 1.0)
        yield from (queue, running, available, node_up, dev_up, tasks, weights, stages)


class SchedulerMetrics:
    """The scheduler's metrics, on a registry of its own (several daemons or tests in
    one process do not collide). ``models``: the served names (the ``model`` label's
    values; anything else is ``"unknown"``)."""

    def __init__(
        self,
        models: Iterable[str],
        registry: CollectorRegistry | None = None,
        *,
        slo_window_s: float = 300.0,
        process: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.models = frozenset(models)
        r = self.registry
        self.requests = _counter(r, "trident_requests")
        self.latency = _histogram(r, "trident_request_latency_seconds", LATENCY_BUCKETS_S)
        self.phases = _histogram(r, "trident_stage_seconds", PHASE_BUCKETS_S)
        self.slo_finished = _counter(r, "trident_slo_finished")
        self.slo_on_time = _counter(r, "trident_slo_on_time")
        self.admission = _counter(r, "trident_admission_rejections")
        self.reruns = _counter(r, "trident_stage_reruns")
        self.placements = _counter(r, "trident_placement_changes")
        self.restarts = _counter(r, "trident_worker_restarts")
        self.busy = _counter(r, "trident_device_busy_seconds")
        self.solver = _histogram(r, "trident_solver_seconds", SOLVER_BUCKETS_S)
        self.fallbacks = _counter(r, "trident_solver_fallbacks")
        self._cluster = _ClusterCollector()
        r.register(self._cluster)
        if process:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, memory, fds
        self.recent = RecentSlo(slo_window_s)
        # Busy seconds per device, readable without the registry (ClusterStatus.busy_s).
        self.busy_seconds: dict[str, float] = {}

    def model_label(self, model: str | None) -> str:
        return model if model is not None and model in self.models else UNKNOWN

    # ------------------------------------------------------------------ requests

    def request_finished(
        self, model: str, timings: Mapping[str, float], met_slo: bool | None, now: float
    ) -> None:
        """A request completed (``request.finished``): its latency, its time per phase,
        and its SLO outcome when it had a deadline."""
        label = self.model_label(model)
        self.requests.labels(label, "completed").inc()
        total = timings.get("total")
        if total is not None:
            self.latency.labels(label).observe(max(0.0, float(total)))
        for phase in PHASES:
            seconds = timings.get(phase)
            if seconds is not None:
                self.phases.labels(label, phase).observe(max(0.0, float(seconds)))
        if met_slo is not None:
            self.slo_finished.labels(label).inc()
            if met_slo:
                self.slo_on_time.labels(label).inc()
            self.recent.add(label, met_slo, now)

    def request_failed(self, model: str | None, code: str, *, admission: bool = False) -> None:
        """A request ended with error ``code`` (``request.failed``); ``admission``: it
        was refused before any of its stages ran."""
        label = self.model_label(model)
        self.requests.labels(label, code).inc()
        if admission:
            self.admission.labels(label, code).inc()

    # ------------------------------------------------------------------ devices

    def stage_finished(self, device_seconds: Mapping[str, float]) -> None:
        """A task finished (``stage.finished``): each of its devices' busy seconds."""
        for device, seconds in device_seconds.items():
            if seconds > 0:
                self.busy.labels(device).inc(seconds)
                self.busy_seconds[device] = self.busy_seconds.get(device, 0.0) + seconds

    def worker_restarted(self, device_id: str) -> None:
        """A worker process exited (``worker.died``); its node starts a new one."""
        self.restarts.labels(device_id).inc()

    def set_cluster(self, status: ClusterStatus) -> None:
        """The latest cluster snapshot, for the gauges."""
        self._cluster.status = status

    # ------------------------------------------------------------------ the core's log

    def core_event(self, event: str, fields: Mapping[str, Any], model: str | None = None) -> None:
        """One of the core's ``LogEvent`` lines; ``model``: its request's model, when it
        names a request. Events that carry no metric are ignored."""
        if event == "dispatch.solved":
            self.solver_ran("dispatch", str(fields.get("solver", UNKNOWN)), fields.get("ms"))
            reason = str(fields.get("reason", ""))
            if fields.get("solver") == "greedy" and reason in _DISPATCH_FALLBACKS:
                self.fallbacks.labels("dispatch", reason).inc()
        elif event in _PLACEMENT_KINDS or event == "placement.kept":
            if event != "placement.kept":
                self.placements.labels(_PLACEMENT_KINDS[event]).inc()
            if "solve_ms" in fields:  # a round of the orchestrator (not a re-home)
                solver = str(fields.get("solver", UNKNOWN))
                self.solver_ran("placement", solver, fields.get("solve_ms"))
                if solver == "proportional":  # the orchestrator's MIP gave no plan
                    self.fallbacks.labels("placement", "proportional").inc()
        elif event in _RERUN_KINDS:
            self.reruns.labels(self.model_label(model), _RERUN_KINDS[event]).inc()

    def solver_ran(self, problem: str, solver: str, ms: object) -> None:
        if isinstance(ms, int | float) and ms >= 0:
            self.solver.labels(problem, solver).observe(float(ms) / 1e3)


# ---------------------------------------------------------------------- HTTP server


def parse_metrics_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9090`` for IPv6; port 0: any free one) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-addr {addr!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class MetricsServer:
    """prometheus_client's HTTP server, serving ``/metrics`` on a daemon thread."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    def close(self) -> None:
        """Stop serving (blocks up to the server's 0.5 s poll: call it off the loop)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


def serve_metrics(addr: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` at ``http://addr/metrics`` on a thread of its own (the event
    loop never waits on a scrape). Raises OSError when the address cannot be bound."""
    host, port = parse_metrics_addr(addr)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread, host, int(server.server_address[1]))


# ---------------------------------------------------------------------- gateway

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class GatewayMetrics:
    """The gateway's HTTP metrics, on a registry of its own (one per app)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = _counter(self.registry, "trident_gateway_http_requests")
        self.seconds = _histogram(
            self.registry, "trident_gateway_http_request_seconds", HTTP_BUCKETS_S
        )
        if process:
            ProcessCollector(registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.seconds.labels(route, method).observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """ASGI middleware: counts each HTTP request by its route's template
    (``/v1/videos/{video_id}``, never the raw path, so ids make no new series), method
    and status. A request no route matched (404, or refused before routing) counts
    as route ``"unmatched"``."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers when the app raises before responding
        t0 = time.perf_counter()

        async def watched(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            method = method if method in _METHODS else "other"
            self.metrics.observe(route, method, status, time.perf_counter() - t0)
