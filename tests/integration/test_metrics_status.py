"""The scheduler's /metrics (``--metrics-addr``) and ``trident status`` against real
daemons: a scheduler and one node with two simulated GPUs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trident import Client
from trident.bench.cluster import LocalCluster, NodeSpec, free_port
from trident.runtime.protocol import ClusterStatus
from trident.status import render_text

pytestmark = pytest.mark.timeout(120)

FLUX = dict(model="flux", height=256, width=256, num_inference_steps=4)
# Long enough (on simulated GPUs at time scale 0.02) that 12 of them queue on 2 devices.
FLUX_SLOW = dict(model="flux", height=1024, width=1024, num_inference_steps=28)


class Cluster(LocalCluster):
    metrics_url: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    port = free_port()
    c = Cluster(
        ["flux"],
        [NodeSpec("sim:2", node_id="n0", time_scale=0.02)],
        log_dir=tmp_path_factory.mktemp("metrics-cluster"),
        scheduler_args=["--metrics-addr", f"127.0.0.1:{port}"],
    )
    c.metrics_url = f"http://127.0.0.1:{port}/metrics"
    with c:
        yield c


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url, timeout=5.0).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def get(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **kw: str
) -> float:
    return samples.get((name, frozenset(kw.items())), 0.0)


def test_scheduler_metrics_move_as_requests_run(cluster: Cluster) -> None:
    before = scrape(cluster.metrics_url)
    with Client(cluster.client_addr, timeout=60) as c:
        for seed in range(2):
            c.generate(prompt="a fox", seed=seed, **FLUX)
    completed = dict(model="flux", outcome="completed")
    deadline = time.monotonic() + 10
    while True:  # counters move at once; the gauges follow a snapshot at most 0.25 s old
        after = scrape(cluster.metrics_url)
        names = {n for n, _ in after}
        if {"trident_device_up", "trident_device_resident_stage"} <= names:
            break
        assert time.monotonic() < deadline, "no device gauges"
        time.sleep(0.1)
    assert get(after, "trident_requests_total", **completed) == (
        get(before, "trident_requests_total", **completed) + 2
    )
    count = "trident_request_latency_seconds_count"
    assert get(after, count, model="flux") == get(before, count, model="flux") + 2
    assert get(after, "trident_request_latency_seconds_sum", model="flux") > 0
    diffuse = dict(model="flux", phase="diffuse")
    assert get(after, "trident_stage_seconds_count", **diffuse) == (
        get(before, "trident_stage_seconds_count", **diffuse) + 2
    )
    assert get(after, "trident_slo_finished_total", model="flux") >= 2
    assert get(after, "trident_node_up", node="n0") == 1
    for dev in ("n0/sim:0", "n0/sim:1"):
        assert get(after, "trident_device_up", device=dev, node="n0") == 1
        assert (
            "trident_device_running_tasks",
            frozenset({"device": dev, "node": "n0"}.items()),
        ) in after
    assert sum(v for (n, _), v in after.items() if n == "trident_device_busy_seconds_total") > 0
    assert any(n == "trident_device_resident_stage" for n, _ in after)
    assert get(after, "trident_model_available", model="flux") == 1
    assert ("trident_queue_depth", frozenset({"model": "flux"}.items())) in after
    assert any(n == "trident_solver_seconds_count" for n, _ in after)


def test_an_unknown_model_counts_as_an_admission_rejection(cluster: Cluster) -> None:
    from trident.errors import UnknownModelError

    name = "trident_admission_rejections_total"
    labels = dict(model="unknown", reason="unknown_model")
    before = get(scrape(cluster.metrics_url), name, **labels)
    with Client(cluster.client_addr, timeout=30) as c, pytest.raises(UnknownModelError):
        c.generate(model="no-such-model", prompt="x")
    assert get(scrape(cluster.metrics_url), name, **labels) == before + 1


def test_status_shows_nodes_devices_holdings_and_a_models_queue(cluster: Cluster) -> None:
    errors: list[BaseException] = []

    def load() -> None:
        import asyncio

        from trident import AsyncClient

        async def run() -> None:
            async with AsyncClient(cluster.client_addr, timeout=90) as c:
                await asyncio.gather(
                    *(
                        c.generate(prompt="p", seed=i, allow_batching=False, **FLUX_SLOW)
                        for i in range(12)
                    )
                )

        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    seen: ClusterStatus | None = None
    try:
        with Client(cluster.client_addr) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and worker.is_alive():
                st = c.status()
                flux = next(m for m in st.models if m.name == "flux")
                if flux.queued > 0 and any(d.running for d in st.devices):
                    seen = st
                    break
                time.sleep(0.02)
    finally:
        worker.join(timeout=100)
    assert not errors, errors
    assert seen is not None, "never saw a queue while 12 requests ran on 2 devices"
    flux = next(m for m in seen.models if m.name == "flux")
    assert [n.node_id for n in seen.nodes] == ["n0"] and seen.nodes[0].up
    assert {d.device_id for d in seen.devices} == {"n0/sim:0", "n0/sim:1"}
    assert all(d.resident for d in seen.devices)  # flux's stages, loaded at start
    text = render_text(seen, width=200)
    assert "n0/sim:0" in text and "n0/sim:1" in text and "flux <" in text
    row = next(line for line in text.splitlines() if "flux" in line and "available" in line)
    assert f" {flux.queued} " in row

    # Once they are done (the snapshot may be a moment old): nothing queued or running,
    # and their SLO outcomes counted.
    with Client(cluster.client_addr) as c:
        deadline = time.monotonic() + 10
        while True:
            after = c.status()
            flux_after = next(m for m in after.models if m.name == "flux")
            if flux_after.running == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert flux_after.queued == 0 and flux_after.running == 0
    assert flux_after.recent_finished >= 12
    assert all(not d.running for d in after.devices)


def test_trident_status_command_prints_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trident.cli", "status", "--scheduler", cluster.client_addr],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", **_env()},
    )
    assert out.returncode == 0, out.stderr
    for text in ("Nodes", "n0", "Devices", "n0/sim:0", "n0/sim:1", "Models", "flux"):
        assert text in out.stdout


def test_trident_status_without_a_scheduler_fails_cleanly() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trident.cli",
            "status",
            "--scheduler",
            f"tcp://127.0.0.1:{free_port()}",
            "--timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert out.returncode == 1
    assert "trident status:" in out.stderr


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    with contextlib.suppress(KeyError):
        del env["COLUMNS"]
    return env


def _scheduler(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "trident.runtime.scheduler", "--model", "flux"]
    cmd += ["--client-addr", f"tcp://127.0.0.1:{free_port()}"]
    cmd += ["--node-addr", f"tcp://127.0.0.1:{free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())


def test_a_bad_metrics_address_is_a_usage_error() -> None:
    out = _scheduler("--metrics-addr", "no-port")
    assert out.returncode == 2 and "--metrics-addr" in out.stderr


def test_a_metrics_port_in_use_stops_the_scheduler_at_start() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = _scheduler("--metrics-addr", f"127.0.0.1:{taken.getsockname()[1]}")
    assert out.returncode == 1 and "trident-scheduler:" in out.stderr


def test_trident_status_watch_redraws_until_ctrl_c(cluster: Cluster) -> None:
    import signal

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trident.cli",
            "status",
            "--watch",
            "--interval",
            "0.2",
            "--scheduler",
            cluster.client_addr,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        time.sleep(3.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "n0/sim:0" in stdout and "flux" in stdout
