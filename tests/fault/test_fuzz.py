"""Fuzz: 100,000 malformed messages at the client port, the node port and a worker's
data port of a live cluster; afterwards every daemon serves a valid request and the
scheduler's memory has not grown past 2x."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from tests.fault.util import rss_bytes, worker_peer_addrs
from trident import Client
from trident.runtime.cluster import LocalCluster, NodeSpec
from trident.runtime.fuzz import malformed_messages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TOTAL = 100_000


def _blast(addr: str, messages: list[list[bytes]], sockets: int = 4, read: bool = True) -> int:
    """Send every message from ``sockets`` DEALERs (random identities); read replies on
    some (a polite attacker) and never on others (their replies pile up and must be
    dropped, not wait). Returns the replies read."""
    ctx = zmq.Context()
    replies = 0
    try:
        socks = []
        for _ in range(sockets):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(addr)
            socks.append(s)
        for i, frames in enumerate(messages):
            s = socks[i % sockets]
            s.send_multipart(frames)
            if read and i % sockets == 0:
                while s.poll(0):
                    s.recv_multipart()
                    replies += 1
        time.sleep(1.0)
        for s in socks[::2] if read else []:
            while s.poll(200):
                s.recv_multipart()
                replies += 1
    finally:
        ctx.destroy(0)
    return replies


def test_a_hundred_thousand_malformed_messages_harm_nobody(tmp_path: Path) -> None:
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:2", node_id="a", time_scale=0.001)],
        log_dir=tmp_path / "logs",
    )
    with cluster:
        assert cluster.scheduler is not None and cluster.log_file is not None
        with Client(cluster.client_addr, timeout=30) as c:
            c.generate(model="flux", prompt="warm", height=256, width=256, num_inference_steps=2)
        rss_start = rss_bytes(cluster.scheduler.pid)
        [peer, *_] = worker_peer_addrs(cluster.log_file)
        messages = list(malformed_messages(seed=7, count=TOTAL))
        third = TOTAL // 3
        client_replies = _blast(cluster.client_addr, messages[:third])
        _blast(cluster.node_addr, messages[third : 2 * third], read=False)
        peer_replies = _blast(peer, messages[2 * third :])
        assert client_replies > 0 and peer_replies > 0  # they answered (errors), they did not hang
        # every daemon still serves: a valid request goes through all stages and workers
        with Client(cluster.client_addr, timeout=60) as c:
            pong = c.ping()
            assert len(pong["devices"]) == 2 and pong["ready"]
            for i in range(4):
                r = c.generate(
                    model="flux", prompt=f"after {i}", height=256, width=256, num_inference_steps=2
                )
                assert r.array.shape[-1] == 3
        assert cluster.scheduler.poll() is None
        assert rss_bytes(cluster.scheduler.pid) < 2 * rss_start
