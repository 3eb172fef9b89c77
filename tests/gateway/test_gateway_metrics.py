"""The gateway's ``GET /metrics``: HTTP requests counted by route template, method and
status. None of these requests needs the scheduler, so none is running."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trident.bench.cluster import free_port

pytestmark = pytest.mark.timeout(60)


def http_counts(url: str) -> dict[tuple[str, str, str], float]:
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    return {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "trident_gateway_http_requests"
        for s in fam.samples
        if s.name == "trident_gateway_http_requests_total"
    }


def test_gateway_metrics_count_requests_by_route_and_status(gateway_factory: Any) -> None:
    gw = gateway_factory(f"tcp://127.0.0.1:{free_port()}", "--max-body-bytes", "1000")
    base = gw.url
    health_before = http_counts(base).get(("/health", "GET", "200"), 0)  # start() polled it
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/v1/videos/video_nope").status_code == 404
    assert httpx.get(f"{base}/v1/videos/video_other").status_code == 404
    assert httpx.get(f"{base}/no/such/route").status_code == 404
    bad = httpx.post(
        f"{base}/v1/images/generations",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400

    counts = http_counts(base)
    assert counts[("/health", "GET", "200")] == health_before + 2
    # By the route's template: two video ids are one series.
    assert counts[("/v1/videos/{video_id}", "GET", "404")] == 2
    assert counts[("unmatched", "GET", "404")] == 1
    assert counts[("/metrics", "GET", "200")] == 1  # the baseline scrape
    assert counts[("/v1/images/generations", "POST", "400")] == 1
    assert not any("video_nope" in route for route, _, _ in counts)

    # The scrape itself is counted (from the next one on); the histogram too.
    again = httpx.get(f"{base}/metrics", timeout=5.0)
    assert again.headers["content-type"].startswith("text/plain")
    assert http_counts(base)[("/metrics", "GET", "200")] == 3
    families = {f.name for f in text_string_to_metric_families(again.text)}
    assert "trident_gateway_http_request_seconds" in families
