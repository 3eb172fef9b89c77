"""``trident bench chaos``: the reliability scenarios, run against real daemons on
loopback, with the figures they produce.

- ``overload``: far past capacity for a while. Outcomes by kind, "overloaded" answer
  latency (p50 / p99), workers and nodes declared lost (all of them falsely: nothing
  is killed), the scheduler's memory before and after, service afterwards.
- ``fuzz``: malformed messages (:mod:`trident.runtime.fuzz`) at the client port, the
  node port and a worker's data port; memory, and whether every daemon still serves.
- ``chaos``: steady load while workers are SIGKILLed and SIGSTOPped, a node is
  SIGKILLed (and restarted, as its supervisor would), and the scheduler is SIGKILLed
  and restarted on its journal. Outcomes by kind; hangs (no answer within the
  client's timeout) and silent losses must be 0.
- ``only-node``: the only node SIGKILLed under load: seconds from the kill to each
  in-flight request's typed error.

Each scenario is a function returning a JSON-able dict (the fault tests call them
too); ``main`` runs the ones asked for and writes them to ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq

from trident.bench.cluster import LocalCluster, NodeSpec
from trident.client import AsyncClient, Client
from trident.cliformat import DefaultsHelpFormatter
from trident.errors import OverloadedError, RequestTimeoutError, TridentError
from trident.runtime.fuzz import malformed_messages
from trident.runtime.security import client_keys, generate_keys
from trident.runtime.transport import CurveKeys

__all__ = [
    "build_parser",
    "chaos",
    "fuzz",
    "main",
    "only_node",
    "overload",
    "rss_bytes",
    "worker_peer_addrs",
]

SMALL: dict[str, Any] = {"height": 256, "width": 256, "num_inference_steps": 4}


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker_peer_addrs(cluster: LocalCluster) -> list[str]:
    """The data-plane addresses of the workers that joined (from the scheduler's log)."""
    return [
        str(e["peer_addr"])
        for e in _log(cluster)
        if e.get("event") == "worker.joined" and e.get("component") == "scheduler"
    ]


def _log(cluster: LocalCluster) -> list[dict[str, Any]]:
    out = []
    if cluster.log_file and Path(cluster.log_file).exists():
        for line in Path(cluster.log_file).read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
    return out


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _lost(lines: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "workers_lost": sum(e.get("event") == "worker.lost" for e in lines),
        "nodes_lost": sum(e.get("event") == "node.lost" for e in lines),
    }


async def _load(
    addr: str,
    rate: float,
    seconds: float,
    *,
    timeout: float,
    params: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Counter[str], list[float]]:
    """Submit at ``rate`` for ``seconds``: outcomes by kind, "overloaded" latencies."""
    outcomes: Counter[str] = Counter()
    overloaded_s: list[float] = []
    params = params or SMALL
    async with AsyncClient(addr, timeout=timeout) as c:
        await c.ping()

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                await c.generate(
                    model="flux", prompt=f"load {i}", seed=seed * 1_000_000 + i, **params
                )
                outcomes["result"] += 1
            except OverloadedError:
                overloaded_s.append(time.perf_counter() - t0)
                outcomes["OverloadedError"] += 1
            except RequestTimeoutError:
                outcomes["hang"] += 1  # nothing heard within the timeout
            except TridentError as exc:
                outcomes[type(exc).__name__] += 1

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    return outcomes, overloaded_s


def _served_after(addr: str, n: int = 3, curve_dir: str | None = None) -> bool:
    """``n`` requests in a row come back complete (image and SLO verdict)."""
    try:
        with Client(addr, timeout=60, curve_dir=curve_dir) as c:
            for i in range(n):
                r = c.generate(model="flux", prompt=f"after {i}", **SMALL)
                if r.array.shape[-1] != 3 or r.met_slo is None:
                    return False
    except TridentError:
        return False
    return True


def overload(
    *,
    rate: float = 100.0,
    seconds: float = 30.0,
    devices: int = 4,
    max_queue: int = 256,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """``rate`` req/s at ``devices`` simulated GPUs (~7 req/s of capacity at 4)."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(
            ["flux"],
            [NodeSpec(f"sim:{devices}", node_id="a", time_scale=1.0)],
            log_dir=log_dir or tmp,
            scheduler_args=["--max-queue", str(max_queue)],
        )
        with cluster:
            assert cluster.scheduler is not None
            rss0 = rss_bytes(cluster.scheduler.pid)
            t0 = time.monotonic()
            outcomes, over_s = asyncio.run(_load(cluster.client_addr, rate, seconds, timeout=180))
            elapsed = time.monotonic() - t0
            rss1 = rss_bytes(cluster.scheduler.pid)
            after = _served_after(cluster.client_addr)
            lines = _log(cluster)
    p50, p99 = _quantile(over_s, 0.5), _quantile(over_s, 0.99)
    return {
        "scenario": "overload",
        "offered_rate": rate,
        "seconds": seconds,
        "devices": devices,
        "max_queue": max_queue,
        "requests": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "served_rate": round(outcomes["result"] / elapsed, 2),
        "overloaded_ms_p50": None if p50 is None else round(p50 * 1e3, 2),
        "overloaded_ms_p99": None if p99 is None else round(p99 * 1e3, 2),
        **_lost(lines),  # nothing was killed: every one of these would be false
        "scheduler_rss_mb_before": round(rss0 / 2**20, 1),
        "scheduler_rss_mb_after": round(rss1 / 2**20, 1),
        "served_after": after,
    }


def _blast(
    addr: str,
    messages: list[list[bytes]],
    *,
    sockets: int = 4,
    read: bool = True,
    curve: CurveKeys | None = None,
) -> int:
    ctx = zmq.Context()
    replies = 0
    try:
        socks = []
        for _ in range(sockets):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 200_000)
            if curve is not None:  # a client's key pair: admitted on the client port only
                s.curve_secretkey = curve.secret
                s.curve_publickey = curve.public
                s.curve_serverkey = curve.server_public
            s.connect(addr)
            socks.append(s)
        for i, frames in enumerate(messages):
            s = socks[i % sockets]
            try:  # never wait: a socket whose handshake was refused has no peer to send to
                s.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                continue
            if read and i % sockets == 0:
                while s.poll(0):
                    s.recv_multipart()
                    replies += 1
        time.sleep(1.0)
        # the odd sockets never read: their replies must be dropped, never waited on
        for s in socks[::2] if read else []:
            while s.poll(200):
                s.recv_multipart()
                replies += 1
    finally:
        ctx.destroy(0)
    return replies


def fuzz(
    *, count: int = 100_000, seed: int = 7, log_dir: str | None = None, curve: bool = False
) -> dict[str, Any]:
    """``count`` malformed messages split over the client, node and data ports.

    ``curve``: the cluster runs CurveZMQ with roles and the messages come from sockets
    holding a *client* key: decoded (and refused) on the client port, refused at the
    handshake on the node and data ports (``auth.denied``)."""
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = generate_keys(Path(tmp) / "keys", ("client", "fuzzer")) if curve else None
        fuzzer = client_keys(keys_dir / "clients" / "fuzzer", "fuzzer") if keys_dir else None
        keys = str(keys_dir) if keys_dir else None
        cluster = LocalCluster(
            ["flux"],
            [NodeSpec("sim:2", node_id="a", time_scale=0.001)],
            log_dir=log_dir or tmp,
            curve_dir=keys,
        )
        with cluster:
            assert cluster.scheduler is not None
            ok_before = _served_after(cluster.client_addr, 1, keys)
            rss0 = rss_bytes(cluster.scheduler.pid)
            peers = worker_peer_addrs(cluster)
            messages = list(malformed_messages(seed=seed, count=count))
            third = count // 3
            t0 = time.monotonic()
            replies = {
                "client": _blast(cluster.client_addr, messages[:third], curve=fuzzer),
                "node": _blast(
                    cluster.node_addr, messages[third : 2 * third], read=False, curve=fuzzer
                ),
                "data": _blast(peers[0], messages[2 * third :], curve=fuzzer),
            }
            seconds = time.monotonic() - t0
            after = _served_after(cluster.client_addr, 4, keys)
            with Client(cluster.client_addr, timeout=30, curve_dir=keys) as c:
                pong = c.ping()
            rss1 = rss_bytes(cluster.scheduler.pid)
            alive = cluster.scheduler.poll() is None
            lines = _log(cluster)
    return {
        "scenario": "fuzz-curve" if curve else "fuzz",
        "messages": count,
        "seconds": round(seconds, 1),
        "replies_read": replies,
        "protocol_rejected_lines": sum(e.get("event") == "protocol.rejected" for e in lines),
        "protocol_rejected_suppressed": sum(
            int(e.get("suppressed", 0)) for e in lines if e.get("event") == "protocol.rejected"
        ),
        "auth_denied_lines": sum(e.get("event") == "auth.denied" for e in lines),
        "handler_failures": sum(e.get("event") == "handler.failed" for e in lines),
        "crashed_tasks": sum(e.get("event") == "task.crashed" for e in lines),
        "served_before": ok_before,
        "served_after": after,
        "devices_after": len(pong["devices"]),
        "ready_after": pong["ready"],
        "scheduler_alive": alive,
        "scheduler_rss_mb_before": round(rss0 / 2**20, 1),
        "scheduler_rss_mb_after": round(rss1 / 2**20, 1),
        **_lost(lines),
    }


def _worker_pids(cluster: LocalCluster) -> dict[str, int]:
    """device id -> pid of its latest worker process that is still alive."""
    pids: dict[str, int] = {}
    for e in _log(cluster):
        if e.get("event") == "worker.joined" and e.get("component") == "scheduler" and e.get("pid"):
            pids[str(e["device_id"])] = int(e["pid"])
    alive = {}
    for dev, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] not in ("Z", "X"):
                    alive[dev] = pid
        except OSError:
            pass
    return alive


def chaos(
    *,
    seconds: float = 40.0,
    rate: float = 3.0,
    seed: int = 0,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """Load while faults are injected at fixed fractions of ``seconds``."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(log_dir or tmp)
        nodes = [
            NodeSpec("sim:3", node_id="a", time_scale=0.5),
            NodeSpec("sim:3", node_id="b", time_scale=0.5),
        ]
        cluster = LocalCluster(
            ["flux"],
            nodes,
            log_dir=base,
            scheduler_args=["--state-dir", str(base / "state"), "--worker-ttl-s", "3"],
        )
        faults: list[dict[str, Any]] = []
        with cluster:

            def inject() -> None:
                start = time.monotonic()

                def at(frac: float) -> None:
                    time.sleep(max(0.0, start + frac * seconds - time.monotonic()))

                def pick_worker(node: str | None = None) -> tuple[str, int] | None:
                    pids = {
                        d: p
                        for d, p in _worker_pids(cluster).items()
                        if node is None or d.startswith(node)
                    }
                    if not pids:
                        return None
                    dev = rng.choice(sorted(pids))
                    return dev, pids[dev]

                def signal_worker(sig: signal.Signals, node: str | None = None) -> None:
                    w = pick_worker(node)
                    if w is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w[1], sig)
                        faults.append(
                            {
                                "t": round(time.monotonic() - start, 1),
                                "fault": sig.name,
                                "device": w[0],
                            }
                        )

                at(0.12)
                signal_worker(signal.SIGKILL)
                at(0.22)
                signal_worker(signal.SIGSTOP, "a/")  # hung: the node must kill and restart it
                at(0.34)
                victim = cluster.node_procs[1]
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                faults.append(
                    {"t": round(time.monotonic() - start, 1), "fault": "SIGKILL node", "node": "b"}
                )
                at(0.44)
                cluster.start_node(nodes[1], 1)  # its supervisor restarts it
                faults.append(
                    {
                        "t": round(time.monotonic() - start, 1),
                        "fault": "node restarted",
                        "node": "b",
                    }
                )
                at(0.55)
                assert cluster.scheduler is not None
                os.kill(cluster.scheduler.pid, signal.SIGKILL)
                cluster.scheduler.wait()
                faults.append(
                    {"t": round(time.monotonic() - start, 1), "fault": "SIGKILL scheduler"}
                )
                time.sleep(1.0)
                cluster.restart_scheduler()
                faults.append(
                    {"t": round(time.monotonic() - start, 1), "fault": "scheduler restarted"}
                )
                at(0.7)
                signal_worker(signal.SIGKILL)

            async def run() -> tuple[Counter[str], list[float]]:
                loop = asyncio.get_running_loop()
                injector = loop.run_in_executor(None, inject)
                load = await _load(
                    cluster.client_addr, rate, seconds, timeout=180, params=SMALL, seed=seed
                )
                await injector
                return load

            outcomes, _ = asyncio.run(run())
            after = _served_after(cluster.client_addr)
            lines = _log(cluster)
    requests = int(rate * seconds)
    return {
        "scenario": "chaos",
        "seconds": seconds,
        "rate": rate,
        "requests": requests,
        "outcomes": dict(outcomes),
        "hangs": outcomes.get("hang", 0),
        "silent_losses": requests - sum(outcomes.values()),
        "faults": faults,
        "stage_reruns": sum(e.get("event") in ("stage.rerun", "stage.retry") for e in lines),
        "recovered_after_restart": sum(e.get("event") == "request.recovered" for e in lines),
        "workers_killed_by_node": sum(e.get("event") == "worker.killing" for e in lines),
        "served_after": after,
    }


def only_node(*, log_dir: str | None = None) -> dict[str, Any]:
    """The only node SIGKILLed with requests in flight: time to each typed error."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(
            ["flux"],
            [NodeSpec("sim:2", node_id="a", time_scale=0.5)],
            log_dir=log_dir or tmp,
            scheduler_args=["--worker-ttl-s", "3"],
        )
        with cluster:

            async def run() -> dict[str, Any]:
                async with AsyncClient(cluster.client_addr, timeout=120) as c:
                    await c.ping()
                    medium: dict[str, Any] = {
                        "height": 1024,
                        "width": 1024,
                        "num_inference_steps": 20,
                    }
                    kinds: Counter[str] = Counter()
                    waits: list[float] = []
                    killed_at: list[float] = []

                    async def one(i: int) -> None:
                        try:
                            await c.generate(model="flux", prompt=f"in flight {i}", **medium)
                            kinds["result"] += 1
                        except TridentError as exc:
                            kinds[type(exc).__name__] += 1
                            if killed_at:
                                waits.append(time.monotonic() - killed_at[0])

                    jobs = [asyncio.ensure_future(one(i)) for i in range(6)]
                    await asyncio.sleep(2.0)
                    killed_at.append(time.monotonic())
                    for p in cluster.node_procs:
                        os.killpg(p.pid, signal.SIGKILL)
                    await asyncio.gather(*jobs)
                    t0 = time.monotonic()
                    try:
                        await c.generate(model="flux", prompt="new", **SMALL)
                        new = "result"
                    except TridentError as exc:
                        new = type(exc).__name__
                    return {
                        "in_flight": dict(kinds),
                        "seconds_to_error_max": round(max(waits), 2) if waits else None,
                        "seconds_to_error_min": round(min(waits), 2) if waits else None,
                        "new_request": new,
                        "new_request_ms": round((time.monotonic() - t0) * 1e3, 1),
                    }

            out = asyncio.run(run())
    return {"scenario": "only-node", **out}


SCENARIOS = ("overload", "fuzz", "fuzz-curve", "chaos", "only-node")


def build_parser() -> argparse.ArgumentParser:
    """``trident bench chaos``'s command line."""
    p = argparse.ArgumentParser(
        prog="trident bench chaos",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated scenarios to run"
    )
    p.add_argument("--json", help="write the figures to this file (default: none, stdout only)")
    p.add_argument(
        "--fuzz-count", type=int, default=100_000, help="fuzz: malformed messages to send"
    )
    p.add_argument(
        "--overload-rate", type=float, default=100.0, help="overload: requests per second"
    )
    p.add_argument(
        "--overload-seconds", type=float, default=30.0, help="overload: seconds of overload"
    )
    p.add_argument(
        "--chaos-seconds", type=float, default=40.0, help="chaos: seconds of load under faults"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="chaos: seed of the fault schedule and the requests"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    results = []
    for name in a.scenarios.split(","):
        name = name.strip()
        if name not in SCENARIOS:
            p.error(f"unknown scenario {name!r}; choose from {sorted(SCENARIOS)}")
        t0 = time.monotonic()
        if name == "overload":
            r = overload(rate=a.overload_rate, seconds=a.overload_seconds)
        elif name in ("fuzz", "fuzz-curve"):
            r = fuzz(count=a.fuzz_count, curve=name == "fuzz-curve")
        elif name == "chaos":
            r = chaos(seconds=a.chaos_seconds, seed=a.seed)
        else:
            r = only_node()
        r["wall_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(r))
        results.append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
