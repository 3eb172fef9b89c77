"""trident/runtime/metrics.py: the scheduler's and the gateway's Prometheus metrics,
the status messages on the client channel, and ``trident status``'s rendering."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from trident.errors import ProtocolError
from trident.runtime import protocol
from trident.runtime.metrics import (
    GATEWAY_METRICS,
    SCHEDULER_METRICS,
    GatewayMetrics,
    HttpMetricsMiddleware,
    RecentSlo,
    SchedulerMetrics,
    generate_latest,
    parse_metrics_addr,
    serve_metrics,
)
from trident.status import render_text

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the registry's exposition, parsed as Prometheus parses it."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry).get((name, frozenset(labels.items())), 0.0)


def make() -> SchedulerMetrics:
    return SchedulerMetrics(["flux", "wan"], process=False)


def test_a_finished_request_counts_its_outcome_latency_phases_and_slo() -> None:
    m = make()
    timings = {"queue": 0.5, "encode": 0.1, "diffuse": 2.0, "decode": 0.2, "load": 0.0}
    m.request_finished("flux", {**timings, "transfer": 0.01, "total": 2.81}, True, now=10.0)
    m.request_finished("flux", {"total": 40.0}, False, now=11.0)
    r = m.registry
    assert value(r, "trident_requests_total", model="flux", outcome="completed") == 2
    assert value(r, "trident_request_latency_seconds_count", model="flux") == 2
    assert value(r, "trident_request_latency_seconds_sum", model="flux") == pytest.approx(42.81)
    assert value(r, "trident_request_latency_seconds_bucket", model="flux", le="5.0") == 1
    for phase in ("queue", "encode", "diffuse", "decode", "transfer", "load"):
        assert value(r, "trident_stage_seconds_count", model="flux", phase=phase) == 1
    assert value(r, "trident_stage_seconds_sum", model="flux", phase="diffuse") == 2.0
    assert value(r, "trident_slo_finished_total", model="flux") == 2
    assert value(r, "trident_slo_on_time_total", model="flux") == 1
    assert m.recent.counts("flux", now=12.0) == (2, 1)


def test_a_request_without_deadline_is_not_in_slo_attainment() -> None:
    m = make()
    m.request_finished("wan", {"total": 1.0}, None, now=1.0)
    assert value(m.registry, "trident_requests_total", model="wan", outcome="completed") == 1
    assert value(m.registry, "trident_slo_finished_total", model="wan") == 0


def test_failures_and_admission_rejections_by_code_with_bounded_model_labels() -> None:
    m = make()
    m.request_failed("flux", "stage_failed")
    m.request_failed("flux", "overloaded", admission=True)
    m.request_failed("no-such-model-1", "unknown_model", admission=True)
    m.request_failed("no-such-model-2", "unknown_model", admission=True)
    r = m.registry
    assert value(r, "trident_requests_total", model="flux", outcome="stage_failed") == 1
    assert value(r, "trident_admission_rejections_total", model="flux", reason="overloaded") == 1
    assert value(r, "trident_admission_rejections_total", model="flux", reason="stage_failed") == 0
    # A client's made-up model names make no series of their own.
    assert (
        value(r, "trident_admission_rejections_total", model="unknown", reason="unknown_model") == 2
    )
    assert not any("no-such-model" in str(labels) for _, labels in samples(r))


def test_busy_seconds_and_worker_restarts_per_device() -> None:
    m = make()
    m.stage_finished({"a/sim:0": 1.5, "a/sim:1": 0.5})
    m.stage_finished({"a/sim:0": 0.25, "a/sim:1": 0.0})
    m.worker_restarted("a/sim:1")
    r = m.registry
    assert value(r, "trident_device_busy_seconds_total", device="a/sim:0") == 1.75
    assert m.busy_seconds == {"a/sim:0": 1.75, "a/sim:1": 0.5}
    assert value(r, "trident_worker_restarts_total", device="a/sim:1") == 1


def test_core_log_events_become_solver_placement_and_rerun_metrics() -> None:
    m = make()
    m.core_event("dispatch.solved", {"solver": "mip", "ms": 3.0, "reason": "optimal"})
    m.core_event("dispatch.solved", {"solver": "greedy", "ms": 1.0, "reason": "node_limit"})
    m.core_event("dispatch.solved", {"solver": "greedy", "ms": 0.0, "reason": "trivial"})
    m.core_event("placement.changed", {"solver": "mip", "solve_ms": 20.0, "reason": "x"})
    m.core_event("placement.kept", {"solver": "proportional", "solve_ms": 5.0})
    m.core_event("placement.rehomed", {"policy": "trident"})
    m.core_event("stage.rerun", {"request_id": "r1", "reason": "lost"}, model="wan")
    m.core_event("stage.retry", {"request_id": "r2"}, model="flux")
    m.core_event("model.available", {"model": "flux"})  # carries no metric
    r = m.registry
    assert value(r, "trident_solver_seconds_count", problem="dispatch", solver="mip") == 1
    assert value(r, "trident_solver_seconds_sum", problem="dispatch", solver="mip") == 0.003
    assert value(r, "trident_solver_seconds_count", problem="dispatch", solver="greedy") == 2
    assert value(r, "trident_solver_fallbacks_total", problem="dispatch", reason="node_limit") == 1
    assert value(r, "trident_solver_fallbacks_total", problem="dispatch", reason="trivial") == 0
    assert value(r, "trident_solver_seconds_count", problem="placement", solver="mip") == 1
    assert (
        value(r, "trident_solver_fallbacks_total", problem="placement", reason="proportional") == 1
    )
    assert value(r, "trident_placement_changes_total", kind="changed") == 1
    assert value(r, "trident_placement_changes_total", kind="rehomed") == 1
    assert value(r, "trident_stage_reruns_total", model="wan", kind="rerun") == 1
    assert value(r, "trident_stage_reruns_total", model="flux", kind="retry") == 1


def cluster(queued: int = 3) -> protocol.ClusterStatus:
    return protocol.ClusterStatus(
        nodes=[protocol.NodeStatus(node_id="a", up=True, devices=["a/sim:0", "a/sim:1"])],
        devices=[
            protocol.DeviceStatus(
                device_id="a/sim:0",
                node_id="a",
                kind="sim",
                up=True,
                memory_bytes=80 << 30,
                resident=[
                    protocol.ResidentStage(model="flux", stage="diffuse"),
                    protocol.ResidentStage(model="flux", stage="encode"),
                ],
                resident_bytes=24 << 30,
                running=[
                    protocol.RunningTask(
                        task_id="t1",
                        request_id="r1",
                        model="flux",
                        stages=["diffuse"],
                        started=True,
                    )
                ],
                busy_s=12.5,
            ),
            protocol.DeviceStatus(
                device_id="a/sim:1", node_id="a", kind="sim", up=False, memory_bytes=80 << 30
            ),
        ],
        models=[
            protocol.ModelStatus(
                name="flux", queued=queued, running=1, recent_finished=10, recent_on_time=9
            ),
            protocol.ModelStatus(name="wan", available=False),
        ],
        policy="trident",
        uptime_s=75.0,
        ready=True,
        slo_window_s=300.0,
    )


def test_cluster_gauges_come_from_the_latest_snapshot() -> None:
    m = make()
    assert not any(n.startswith("trident_queue_depth") for n, _ in samples(m.registry))
    m.set_cluster(cluster(queued=3))
    r = m.registry
    assert value(r, "trident_queue_depth", model="flux") == 3
    assert value(r, "trident_requests_running", model="flux") == 1
    assert value(r, "trident_model_available", model="wan") == 0
    assert value(r, "trident_node_up", node="a") == 1
    assert value(r, "trident_device_up", device="a/sim:1", node="a") == 0
    assert value(r, "trident_device_running_tasks", device="a/sim:0", node="a") == 1
    assert value(r, "trident_device_resident_weight_bytes", device="a/sim:0", node="a") == 24 << 30
    assert (
        value(r, "trident_device_resident_stage", device="a/sim:0", model="flux", stage="encode")
        == 1
    )
    m.set_cluster(cluster(queued=0))
    assert value(r, "trident_queue_depth", model="flux") == 0


def test_recent_slo_forgets_outcomes_older_than_its_window() -> None:
    w = RecentSlo(window_s=60.0, max_per_model=3)
    w.add("flux", True, now=0.0)
    w.add("flux", False, now=30.0)
    assert w.counts("flux", now=59.0) == (2, 1)
    assert w.counts("flux", now=61.0) == (1, 0)
    for t in range(5):
        w.add("flux", True, now=70.0 + t)
    assert w.counts("flux", now=75.0) == (3, 3)  # bounded per model
    assert w.counts("wan", now=75.0) == (0, 0)


def test_every_metric_is_exposed_under_its_documented_name() -> None:
    m = make()
    m.request_finished("flux", {"total": 1.0, "queue": 0.1}, True, now=1.0)
    m.request_failed("flux", "overloaded", admission=True)
    m.stage_finished({"a/sim:0": 1.0})
    m.worker_restarted("a/sim:0")
    m.core_event("dispatch.solved", {"solver": "greedy", "ms": 1.0, "reason": "error"})
    m.core_event("placement.changed", {"solver": "mip", "solve_ms": 1.0})
    m.core_event("stage.rerun", {}, model="flux")
    m.set_cluster(cluster())
    families = {
        f.name: f.type for f in text_string_to_metric_families(generate_latest(m.registry).decode())
    }
    for name, (kind, _, _) in SCHEDULER_METRICS.items():
        assert families.get(name) == kind, name


def test_metrics_server_serves_the_registry_on_its_own_thread() -> None:
    m = make()
    m.request_failed("flux", "timeout")
    server = serve_metrics("127.0.0.1:0", m.registry)
    try:
        r = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5.0)
        assert r.status_code == 200
        assert 'trident_requests_total{model="flux",outcome="timeout"} 1.0' in r.text
    finally:
        server.close()
    assert not server.thread.is_alive()


@pytest.mark.parametrize("bad", ["9090", "host:", "host:port", "h:70000"])
def test_a_bad_metrics_address_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_metrics_addr(bad)


def test_metrics_address_forms() -> None:
    assert parse_metrics_addr("0.0.0.0:9090") == ("0.0.0.0", 9090)
    assert parse_metrics_addr(":9090") == ("0.0.0.0", 9090)
    assert parse_metrics_addr("[::1]:9090") == ("::1", 9090)


def test_http_middleware_counts_by_route_template_and_status() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    metrics = GatewayMetrics(process=False)
    app = FastAPI()
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)

    @app.get("/v1/videos/{video_id}")
    async def video(video_id: str) -> dict[str, str]:
        return {"id": video_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v1/videos/a").status_code == 200
        assert client.get("/v1/videos/b").status_code == 200
        assert client.get("/nowhere").status_code == 404
        assert client.get("/boom").status_code == 500
    r = metrics.registry
    name = "trident_gateway_http_requests_total"
    assert value(r, name, route="/v1/videos/{video_id}", method="GET", status="200") == 2
    assert value(r, name, route="unmatched", method="GET", status="404") == 1
    assert value(r, name, route="/boom", method="GET", status="500") == 1
    assert (
        value(
            r,
            "trident_gateway_http_request_seconds_count",
            route="/v1/videos/{video_id}",
            method="GET",
        )
        == 2
    )


# ---------------------------------------------------------------------- wire and rendering


def test_status_query_and_cluster_status_ride_their_channels_only() -> None:
    query = protocol.encode(protocol.StatusQuery(nonce=7))
    msg, _ = protocol.decode([query], protocol.CLIENT_TO_SCHEDULER)
    assert msg == protocol.StatusQuery(nonce=7)
    status = protocol.encode(msgspec.structs.replace(cluster(), nonce=7))
    back, _ = protocol.decode([status], protocol.SCHEDULER_TO_CLIENT)
    assert back == msgspec.structs.replace(cluster(), nonce=7)
    with pytest.raises(ProtocolError):
        protocol.decode([status], protocol.CLIENT_TO_SCHEDULER)
    with pytest.raises(ProtocolError):
        protocol.decode([query], protocol.SCHEDULER_TO_CLIENT)


def test_a_malformed_cluster_status_is_refused_at_the_edge() -> None:
    raw = msgspec.msgpack.encode(
        {"t": "cluster_status", "nodes": [], "devices": [{"device_id": ""}], "models": []}
    )
    with pytest.raises(ProtocolError):
        protocol.decode([raw], protocol.SCHEDULER_TO_CLIENT)


def test_render_shows_nodes_devices_holdings_tasks_queues_and_slo() -> None:
    text = render_text(cluster(queued=3), width=160)
    assert "policy trident" in text and "ready" in text and "1/1 nodes, 1/2 devices" in text
    assert re.search(r"a\s.*up\s.*2", text)  # the node, up, with its 2 devices
    assert "a/sim:0" in text and "a/sim:1" in text and "lost" in text
    assert "flux <ED>" in text  # resident stages, in E D C order
    assert "24.0 GiB" in text and "flux:diffuse" in text and "12.5s" in text
    flux_row = next(line for line in text.splitlines() if "flux" in line and "available" in line)
    assert re.search(r"available\s*\S\s*3\s*\S\s*1\s", flux_row)  # queued 3, running 1
    assert "90% (9/10)" in flux_row
    assert "unavailable" in text  # wan


# ---------------------------------------------------------------------- docs and dashboard


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"\btrident_[a-z_]+", text))


def _base(name: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_docs_list_every_metric_with_its_labels() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for name, (kind, labels, _) in {**SCHEDULER_METRICS, **GATEWAY_METRICS}.items():
        exposed = f"{name}_total" if kind == "counter" else name
        line = next((ln for ln in doc.splitlines() if f"`{exposed}`" in ln), None)
        assert line is not None, f"docs/metrics.md does not list {exposed}"
        for label in labels:
            assert f"`{label}`" in line, f"{exposed}: label {label} undocumented"


def test_the_grafana_dashboard_charts_exactly_the_defined_metrics() -> None:
    import json

    dash = json.loads((ROOT / "deploy" / "grafana" / "trident.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t] + [
        v["definition"] for v in dash["templating"]["list"] if "definition" in v
    ]
    used = {_base(n) for e in exprs for n in _names_in(e)}
    defined = set(SCHEDULER_METRICS) | set(GATEWAY_METRICS)
    assert used <= defined, f"undefined metrics in the dashboard: {sorted(used - defined)}"
    assert defined <= used, f"metrics no panel shows: {sorted(defined - used)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
