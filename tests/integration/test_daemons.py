"""The real scheduler and node daemons, with simulated GPUs, under load and abuse."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import msgpack
import numpy as np
import pytest
import zmq

from trident import AsyncClient, Client
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.errors import (
    InvalidRequestError,
    OverloadedError,
    RequestError,
    RequestTimeoutError,
    UnknownModelError,
)
from trident.runtime import protocol

from .conftest import pid_alive, read_log, read_log_until

pytestmark = pytest.mark.timeout(120)


def test_hundreds_of_mixed_requests_each_end_in_result_or_typed_error(
    sim_cluster: LocalCluster,
) -> None:
    rng = random.Random(7)
    jobs: list[dict] = []
    for _ in range(150):
        kind = rng.random()
        if kind < 0.55:
            side = rng.choice([256, 512, 1024])
            jobs.append(
                dict(
                    model="flux",
                    height=side,
                    width=side,
                    num_inference_steps=rng.choice([4, 8]),
                    want="ok",
                )
            )
        elif kind < 0.8:
            jobs.append(
                dict(
                    model="wan",
                    height=480,
                    width=832,
                    num_frames=rng.choice([17, 33]),
                    num_inference_steps=4,
                    want="ok",
                )
            )
        elif kind < 0.9:
            jobs.append(dict(model="no-such-model", want="unknown"))
        else:
            jobs.append(dict(model="flux", height=-64, width=512, want="invalid"))

    async def run() -> list[object]:
        async with AsyncClient(sim_cluster.client_addr, timeout=60) as c:

            async def one(i: int, job: dict) -> object:
                args = {k: v for k, v in job.items() if k != "want"}
                try:
                    return await c.generate(prompt=f"prompt {i}", seed=i, **args)
                except RequestError as exc:
                    return exc

            return await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))

    results = asyncio.run(run())
    assert len(results) == len(jobs)
    for job, res in zip(jobs, results, strict=True):
        if job["want"] == "ok":
            assert not isinstance(res, Exception), res
            assert res.array.dtype == np.float32
            assert set(res.devices) == {"encode", "diffuse", "decode"}
            assert res.timings["total"] > 0
            if job["model"] == "wan":
                assert res.array.ndim == 4
        elif job["want"] == "unknown":
            assert isinstance(res, UnknownModelError)
        else:
            assert isinstance(res, InvalidRequestError) and "height" in str(res)
    # the log alone rebuilds every request's timeline
    ok_count = sum(1 for j in jobs if j["want"] == "ok")
    log = read_log_until(
        sim_cluster.log_file,
        lambda lines: sum(e["event"] == "request.finished" for e in lines) >= ok_count,
    )
    finished = {e["request_id"] for e in log if e["event"] == "request.finished"}
    dispatched = [e for e in log if e["event"] == "stage.dispatched"]
    assert len(finished) >= ok_count
    # every finished request's stages appear in its dispatch lines (merged or not)
    covered: dict[str, list[str]] = {}
    for e in dispatched:
        covered.setdefault(e["request_id"], []).extend(e["stages"])
    for rid in finished:
        assert sorted(set(covered[rid])) == ["decode", "diffuse", "encode"], rid


def test_bad_sizes_get_clear_typed_errors(sim_cluster: LocalCluster) -> None:
    with Client(sim_cluster.client_addr, timeout=30) as c:
        with pytest.raises(UnknownModelError, match="served"):
            c.generate(model="sdxl", prompt="x")
        for bad in (
            dict(height=0),
            dict(width=100_000),
            dict(height=500),
            dict(num_inference_steps=0),
        ):
            with pytest.raises(InvalidRequestError):
                c.generate(model="flux", prompt="x", **bad)
        with pytest.raises(InvalidRequestError, match="num_frames"):
            c.generate(model="flux", prompt="x", num_frames=5)
        with pytest.raises(InvalidRequestError, match="prompt"):
            c.generate(model="flux", prompt=123)  # type: ignore[arg-type]
        # and the cluster still serves
        r = c.generate(model="flux", prompt="x", height=256, width=256, num_inference_steps=2)
        assert r.array.shape[-1] == 3


def test_malformed_frames_and_wrong_versions_harm_nobody(sim_cluster: LocalCluster) -> None:
    ctx = zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(sim_cluster.client_addr)
        garbage = [
            [b"\xff\x00garbage"],
            [msgpack.packb({"t": "no_such_type"})],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"t": "submit", "id": "x"})],  # missing fields
            [
                protocol.encode(
                    protocol.Submit(id="y", model="flux", params=protocol.SubmitParams(prompt="x"))
                ),
                b"unexpected frame",
            ],
        ]
        for frames in garbage:
            raw.send_multipart(frames)
            assert raw.poll(5000), f"no error reply to {frames!r}"
            header = msgpack.unpackb(raw.recv_multipart()[0])
            assert header["t"] == "error" and header["code"] == "protocol"
        # a node speaking another protocol version is rejected with a reason
        node = ctx.socket(zmq.DEALER)
        node.setsockopt(zmq.LINGER, 0)
        node.setsockopt(zmq.IDENTITY, b"node:intruder")
        node.connect(sim_cluster.node_addr)
        node.send_multipart(
            [
                msgpack.packb(
                    {"t": "node_hello", "version": 999, "node_id": "intruder", "devices": []}
                )
            ]
        )
        assert node.poll(5000)
        header = msgpack.unpackb(node.recv_multipart()[0])
        assert header["t"] == "reject" and "version" in header["reason"]
        # garbage on the node channel too
        node.send_multipart([b"\x00\x01"])
        assert node.poll(5000)
        assert msgpack.unpackb(node.recv_multipart()[0])["t"] == "error"
    finally:
        ctx.destroy(0)
    with Client(sim_cluster.client_addr, timeout=30) as c:
        assert c.generate(
            model="flux", prompt="still fine", height=256, width=256, num_inference_steps=2
        ).array.size


@pytest.mark.timeout(90)
def test_bounded_queue_answers_overloaded_not_a_hang(tmp_path) -> None:
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:1", time_scale=0.002)],
        log_dir=tmp_path,
        scheduler_args=["--max-queue", "3"],
    )
    with cluster:

        async def run() -> list[object]:
            async with AsyncClient(cluster.client_addr, timeout=60) as c:

                async def one(i: int) -> object:
                    try:
                        return await c.generate(
                            model="flux",
                            prompt="x",
                            height=1024,
                            width=1024,
                            num_inference_steps=28,
                        )
                    except RequestError as exc:
                        return exc

                return await asyncio.gather(*(one(i) for i in range(12)))

        results = asyncio.run(run())
    overloaded = [r for r in results if isinstance(r, OverloadedError)]
    done = [r for r in results if not isinstance(r, Exception)]
    assert overloaded, "past the bound, clients must hear 'overloaded'"
    assert len(done) >= 3
    assert len(done) + len(overloaded) == 12


@pytest.mark.timeout(120)
def test_killed_worker_is_restarted_and_its_request_still_completes(tmp_path) -> None:
    cluster = LocalCluster(
        ["flux"], [NodeSpec("sim:2", node_id="k", time_scale=0.05)], log_dir=tmp_path
    )
    with cluster:
        log = read_log(cluster.log_file)
        pids = {e["device_id"]: e["pid"] for e in log if e["event"] == "worker.spawned"}
        assert len(pids) == 2

        async def run() -> list[object]:
            async with AsyncClient(cluster.client_addr, timeout=90) as c:

                async def one(i: int) -> object:
                    try:
                        return await c.generate(
                            model="flux",
                            prompt="x",
                            height=512,
                            width=512,
                            num_inference_steps=28,
                            seed=i,
                        )
                    except RequestError as exc:
                        return exc

                tasks = [asyncio.create_task(one(i)) for i in range(4)]
                await asyncio.sleep(0.6)  # requests are mid-diffuse now (each ~0.3 s of sim time)
                os.kill(pids["k/sim:0"], signal.SIGKILL)
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert all(not isinstance(r, Exception) for r in results), results
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = read_log(cluster.log_file)
            joined = [
                e
                for e in log
                if e["event"] == "worker.joined"
                and e["component"] == "scheduler"
                and e["device_id"] == "k/sim:0"
            ]
            if len(joined) >= 2:
                break
            time.sleep(0.2)
        assert len(joined) >= 2, "the node must restart the killed worker and it must rejoin"
        assert joined[-1]["pid"] != pids["k/sim:0"]
        assert any(e["event"] == "worker.died" for e in log)
        # the restarted worker serves again
        with Client(cluster.client_addr, timeout=60) as c:
            cluster.wait_ready(2)
            for i in range(4):
                c.generate(
                    model="flux",
                    prompt="again",
                    height=256,
                    width=256,
                    num_inference_steps=2,
                    seed=i,
                )
    all_pids = [e["pid"] for e in read_log(cluster.log_file) if e["event"] == "worker.spawned"]
    assert not [p for p in all_pids if pid_alive(p)], "no worker may outlive the cluster"


def test_report_rebuilds_slo_and_latency_from_the_log_alone(
    sim_cluster: LocalCluster, tmp_path
) -> None:
    from trident.report import main as report_main
    from trident.report import summarize

    with Client(sim_cluster.client_addr, timeout=30) as c:
        results = [
            c.generate(
                model="flux", prompt="r", height=256, width=256, num_inference_steps=2, seed=i
            )
            for i in range(5)
        ]
    want = {round(r.timings["total"], 9) for r in results}
    read_log_until(
        sim_cluster.log_file,
        lambda lines: (
            want
            <= {round(e["timings"]["total"], 9) for e in lines if e["event"] == "request.finished"}
        ),
    )
    summary = summarize(sim_cluster.log_file)
    assert summary.finished >= 5
    # the log's latencies are the ones the clients saw
    for r in results:
        assert any(abs(lat - r.timings["total"]) < 1e-6 for lat in summary.latencies)
    png = tmp_path / "timeline.png"
    assert report_main([sim_cluster.log_file, "--png", str(png)]) == 0
    assert png.stat().st_size > 1000


@pytest.mark.timeout(60)
def test_client_timeout_cancels_the_request_in_the_scheduler(tmp_path) -> None:
    cluster = LocalCluster(
        ["flux"], [NodeSpec("sim:1", time_scale=0.05)], log_dir=tmp_path, policy="fifo"
    )
    with cluster, Client(cluster.client_addr) as c:
        # 2048x2048 x 28 steps is ~130 s simulated: ~6.5 s here; give up after 0.5 s
        with pytest.raises(RequestTimeoutError):
            c.generate(
                model="flux",
                prompt="slow",
                height=2048,
                width=2048,
                num_inference_steps=28,
                timeout=0.5,
            )
        log = read_log_until(
            cluster.log_file,
            lambda lines: any(
                e["event"] == "request.failed" and e.get("error") == "cancelled" for e in lines
            ),
            timeout=30,
        )
        assert any(e["event"] == "request.failed" and e.get("error") == "cancelled" for e in log)
        # the device is free again for the next request
        r = c.generate(
            model="flux", prompt="fast", height=256, width=256, num_inference_steps=2, timeout=30
        )
        assert r.array.size


def test_a_booting_node_is_placed_once_not_once_per_worker(sim_cluster: LocalCluster) -> None:
    """Workers say hello one by one; the planner must see each node's devices together,
    or every hello re-plans the node and reloads weights (a boot-time load storm)."""
    log = read_log(sim_cluster.log_file)
    joined = [e for e in log if e["event"] == "worker.joined" and e["component"] == "scheduler"]
    assert len(joined) >= 8
    plans = [
        e for e in log if e["event"] == "placement.changed" and e.get("reason") == "devices joined"
    ]
    assert 1 <= len(plans) <= 2, [p.get("reason") for p in plans]  # one per node at most
