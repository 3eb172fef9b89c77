"""Video jobs across processes: DELETE really cancels a running job and frees its
device; jobs survive a gateway restart (clean stop, and SIGKILL with its lease left to
lapse); the job store's limits (429, time limit, content before completion).
One simulated GPU, so a device held by a cancelled job would be seen."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import GatewayProc, wait_job
from tests.integration.conftest import read_log, read_log_until
from trident.bench.cluster import LocalCluster, NodeSpec

pytestmark = pytest.mark.timeout(120)

SCALE = 0.02  # wan 832x480x33: ~0.2 s per denoising step
LONG = {"size": "832x480", "num_frames": 33, "num_inference_steps": 40}  # ~8 s
MEDIUM = {"size": "832x480", "num_frames": 33, "num_inference_steps": 8}  # ~1.6 s
SHORT = {"size": "256x256", "num_frames": 5, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(
        ["wan=sim:wan"],
        [NodeSpec("sim:1", node_id="a", time_scale=SCALE)],
        log_dir=tmp_path_factory.mktemp("cluster"),
        scheduler_args=["--client-ttl-s", "2"],
    ) as c:
        yield c


def _create(gw: GatewayProc, prompt: str, shape: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(
        f"{gw.url}/v1/videos", json={"model": "wan", "prompt": prompt, **shape}, timeout=30
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def _running(job: dict[str, Any]) -> bool:
    return job["status"] == "in_progress" and job["progress"] > 0


def test_delete_cancels_a_running_job_and_frees_its_device(
    cluster: LocalCluster, gateway_factory: Any
) -> None:
    gw = gateway_factory(cluster.client_addr)
    assert cluster.log_file is not None
    since = len(read_log(cluster.log_file))
    long = _create(gw, "long", LONG)
    wait_job(gw, long["id"], _running, timeout=30)
    t0 = time.monotonic()
    r = httpx.delete(f"{gw.url}/v1/videos/{long['id']}")
    assert r.status_code == 200 and r.json()["deleted"] and r.json()["status"] == "cancelled"
    job = httpx.get(f"{gw.url}/v1/videos/{long['id']}").json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    # the request is cancelled in the scheduler, and the worker stops at its next step
    lines = read_log_until(
        cluster.log_file,
        lambda ls: any(
            e.get("event") == "stage.cancelled" and e.get("where") == "running" for e in ls[since:]
        ),
        timeout=10,
    )
    new = lines[since:]
    assert any(e.get("event") == "stage.cancelling" for e in new)
    assert any(e.get("event") == "stage.cancelled" and e.get("where") == "running" for e in new)
    # ... so the one device takes the next job at once, not after the long one's ~6 s
    short = _create(gw, "short", SHORT)
    wait_job(gw, short["id"], lambda j: j["status"] == "completed", timeout=30)
    assert time.monotonic() - t0 < 4.0
    r = httpx.get(f"{gw.url}/v1/videos/{long['id']}/content")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"
    # a second DELETE removes the cancelled job's record
    assert httpx.delete(f"{gw.url}/v1/videos/{long['id']}").json()["status"] == "deleted"
    assert httpx.get(f"{gw.url}/v1/videos/{long['id']}").status_code == 404


def test_jobs_survive_a_gateway_restart(
    cluster: LocalCluster, gateway_factory: Any, tmp_path: Path
) -> None:
    state = tmp_path / "shared-state"
    first = gateway_factory(cluster.client_addr, state_dir=state)
    done = _create(first, "finished before", SHORT)
    wait_job(first, done["id"], lambda j: j["status"] == "completed")
    running = _create(first, "running at the restart", MEDIUM)
    wait_job(first, running["id"], _running)
    assert first.stop(signal.SIGTERM) == 0  # hands the running job back to the store
    second = gateway_factory(cluster.client_addr, state_dir=state)
    again = httpx.get(f"{second.url}/v1/videos/{done['id']}").json()
    assert again["status"] == "completed" and again["trident"]["timings"]["total"] > 0
    content = httpx.get(f"{second.url}/v1/videos/{done['id']}/content")
    assert content.status_code == 200 and content.content[4:8] == b"ftyp"
    job = wait_job(second, running["id"], lambda j: j["status"] == "completed", timeout=60)
    assert job["trident"]["attempts"] == 2  # run again from the start by the new gateway
    assert [v["id"] for v in httpx.get(f"{second.url}/v1/videos").json()["data"]][:2] == [
        running["id"],
        done["id"],
    ]


def test_a_killed_gateways_jobs_are_taken_up_when_its_lease_lapses(
    cluster: LocalCluster, gateway_factory: Any, tmp_path: Path
) -> None:
    state = tmp_path / "crash-state"
    lease = ("--lease-s", "1")
    first = gateway_factory(cluster.client_addr, *lease, state_dir=state)
    job = _create(first, "orphaned", MEDIUM)
    wait_job(first, job["id"], _running)
    first.stop(signal.SIGKILL)  # no clean hand-back: the lease must lapse
    second = gateway_factory(cluster.client_addr, *lease, state_dir=state)
    done = wait_job(second, job["id"], lambda j: j["status"] == "completed", timeout=60)
    assert done["trident"]["attempts"] == 2


def test_job_limits_429_and_time_limit(cluster: LocalCluster, gateway_factory: Any) -> None:
    gw = gateway_factory(cluster.client_addr, "--max-queued-jobs", "1", "--job-timeout-s", "1.5")
    first = _create(gw, "too slow", LONG)
    r = httpx.post(f"{gw.url}/v1/videos", json={"model": "wan", "prompt": "one more", **SHORT})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    r = httpx.get(f"{gw.url}/v1/videos/{first['id']}/content")
    assert r.status_code == 409
    failed = wait_job(gw, first["id"], lambda j: j["status"] == "failed", timeout=30)
    assert failed["error"]["code"] == "timeout" and failed["completed_at"] is not None
    assert _create(gw, "room again", SHORT)["status"] == "queued"
