"""Losing the scheduler or the only node never leaves a request hanging: a scheduler
restarted on its journal finishes what it had accepted; one that stays dead, or a
cluster with no device left, fails requests with a typed error quickly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import read_log, read_log_until
from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.errors import TridentError, UnavailableError

pytestmark = pytest.mark.timeout(180)

# flux 1024^2 x 10 steps: ~8.4 s of diffuse at scale 1; ~1.7 s here
SCALE = 0.2
MEDIUM = {"height": 1024, "width": 1024, "num_inference_steps": 10}


def _wait_started(cluster: LocalCluster, count: int) -> None:
    assert cluster.log_file is not None
    lines = read_log_until(
        cluster.log_file,
        lambda ls: sum(e.get("event") == "stage.started" for e in ls) >= count,
        timeout=30,
    )
    assert sum(e.get("event") == "stage.started" for e in lines) >= count


def test_a_killed_and_restarted_scheduler_finishes_every_accepted_request(tmp_path: Path) -> None:
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:2", node_id="a", time_scale=SCALE)],
        log_dir=tmp_path / "logs",
        scheduler_args=["--state-dir", str(tmp_path / "state")],
        policy="fifo",
    )
    with cluster:
        assert cluster.scheduler is not None and cluster.log_file is not None

        async def run() -> list[object]:
            async with AsyncClient(cluster.client_addr, timeout=120, scheduler_ttl=20) as c:
                await c.ping()
                jobs = [
                    asyncio.ensure_future(
                        c.generate(model="flux", prompt=f"job {i}", seed=i, **MEDIUM)
                    )
                    for i in range(6)
                ]
                await asyncio.get_running_loop().run_in_executor(None, _wait_started, cluster, 2)
                os.kill(cluster.scheduler.pid, signal.SIGKILL)  # type: ignore[union-attr]
                cluster.scheduler.wait()  # type: ignore[union-attr]
                await asyncio.sleep(0.5)
                cluster.restart_scheduler()
                return await asyncio.gather(*jobs, return_exceptions=True)

        results = asyncio.run(run())
        assert all(not isinstance(r, BaseException) for r in results), results
        assert len({r.request_id for r in results}) == 6  # type: ignore[attr-defined]
        recovered = [e for e in read_log(cluster.log_file) if e.get("event") == "request.recovered"]
        assert 1 <= len(recovered) <= 6


def test_a_scheduler_that_stays_dead_fails_requests_within_the_ttl(tmp_path: Path) -> None:
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:1", node_id="a", time_scale=SCALE)],
        log_dir=tmp_path / "logs",
    )
    with cluster:
        assert cluster.scheduler is not None

        async def run() -> tuple[BaseException | object, float]:
            async with AsyncClient(cluster.client_addr, timeout=120, scheduler_ttl=3) as c:
                await c.ping()
                job = asyncio.ensure_future(c.generate(model="flux", prompt="orphan", **MEDIUM))
                await asyncio.get_running_loop().run_in_executor(None, _wait_started, cluster, 1)
                os.kill(cluster.scheduler.pid, signal.SIGKILL)  # type: ignore[union-attr]
                t0 = time.monotonic()
                out = await asyncio.gather(job, return_exceptions=True)
                return out[0], time.monotonic() - t0

        outcome, waited = asyncio.run(run())
        assert isinstance(outcome, UnavailableError), outcome
        assert waited < 10


def test_losing_the_only_node_fails_in_flight_and_new_requests_unavailable(tmp_path: Path) -> None:
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:2", node_id="a", time_scale=SCALE)],
        log_dir=tmp_path / "logs",
        scheduler_args=["--worker-ttl-s", "3"],
    )
    with cluster:

        async def run() -> tuple[list[object], float, BaseException | None]:
            async with AsyncClient(cluster.client_addr, timeout=120) as c:
                await c.ping()
                jobs = [
                    asyncio.ensure_future(c.generate(model="flux", prompt=f"j{i}", **MEDIUM))
                    for i in range(4)
                ]
                await asyncio.get_running_loop().run_in_executor(None, _wait_started, cluster, 1)
                for p in cluster.node_procs:
                    os.killpg(p.pid, signal.SIGKILL)  # the node and its workers
                t0 = time.monotonic()
                out = await asyncio.gather(*jobs, return_exceptions=True)
                waited = time.monotonic() - t0
                try:
                    await c.generate(model="flux", prompt="after", height=256, width=256)
                    late: BaseException | None = None
                except TridentError as exc:
                    late = exc
                return out, waited, late

        outcomes, waited, late = asyncio.run(run())
        assert all(isinstance(o, UnavailableError) for o in outcomes), outcomes
        assert waited < 30  # TTL (3 s) + the core's grace (10 s), with room for a busy machine
        assert isinstance(late, UnavailableError)
