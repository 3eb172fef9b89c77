"""``trident report`` on a real scheduler log: requests refused at intake, a worker
SIGKILLed mid-task and its request re-run. The report's counts match what the client
saw and add up; merged tasks are drawn stage by stage; the death and the re-run are
marked on the timeline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.client import GenerateResult
from trident.errors import OverloadedError, RequestError
from trident.report import main as report_main
from trident.report import summarize

from .conftest import pid_alive, read_log, read_log_until

pytestmark = pytest.mark.timeout(120)


async def _send(addr: str, log_file: str, n: int) -> tuple[list[object], str]:
    async with AsyncClient(addr, timeout=60) as c:

        async def one(i: int) -> object:
            try:
                return await c.generate(
                    model="flux",
                    prompt="p",
                    height=1024,
                    width=1024,
                    num_inference_steps=28,
                    seed=i,
                )
            except RequestError as exc:
                return exc

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        # SIGKILL the worker that runs the first task, mid-task.
        victim = ""
        for _ in range(400):
            lines = read_log(log_file)
            started = [e for e in lines if e["event"] == "stage.started"]
            if started:
                victim = started[0]["device_id"]
                break
            await asyncio.sleep(0.025)
        assert victim, "no task started"
        await asyncio.sleep(0.2)
        pid = next(
            e["pid"]
            for e in read_log(log_file)
            if e["event"] == "worker.spawned" and e["device_id"] == victim
        )
        os.kill(pid, signal.SIGKILL)
        return list(await asyncio.gather(*tasks)), victim


def test_report_of_a_real_log_with_rejections_and_a_dead_worker(tmp_path: Path, capsys) -> None:
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:2", node_id="n0", time_scale=0.05)],
        log_dir=tmp_path,
        scheduler_args=["--max-queue", "4"],
    )
    with cluster:
        assert cluster.log_file is not None
        log_file = cluster.log_file
        results, victim = asyncio.run(_send(cluster.client_addr, log_file, 10))
        done = [r for r in results if isinstance(r, GenerateResult)]
        refused = [r for r in results if isinstance(r, OverloadedError)]
        assert len(done) + len(refused) == 10 and done and refused
        read_log_until(
            log_file,
            lambda lines: (
                sum(e["event"] in ("request.finished", "request.failed") for e in lines) >= 10
            ),
        )
        spawned = [e["pid"] for e in read_log(log_file) if e["event"] == "worker.spawned"]
    assert not [p for p in spawned if pid_alive(p)]

    s = summarize(log_file)
    assert s.finished == len(done) and sum(s.rejected.values()) == len(refused)
    assert s.requests == s.finished + sum(s.failed.values()) + s.cancelled + s.pending
    assert s.submitted == 10
    # merged tasks (enc+dif+dec on one device) are drawn one stage per bar
    finished = [b for b in s.bars if b.outcome == "finished"]
    assert {b.stage for b in finished} >= {"encode", "diffuse", "decode"}
    assert all("+" not in b.stage for b in finished)
    kinds = {(m.kind, m.device) for m in s.markers}
    assert ("worker_died", victim) in kinds
    assert ("rerun", victim) in kinds
    assert ("placement", None) in kinds

    png, out_json = tmp_path / "timeline.png", tmp_path / "summary.json"
    assert report_main([log_file, "--png", str(png), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"rejected at admission: {len(refused)} (overloaded {len(refused)})" in out
    assert "10 submitted in all" in out
    assert png.stat().st_size > 1000
    d = json.loads(out_json.read_text())
    assert d["completed"] == len(done) and d["rejected"] == {"overloaded": len(refused)}
