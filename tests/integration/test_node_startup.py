"""A node started before its scheduler joins once the scheduler answers; a node told
to give up does so with exit code 3."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from trident import Client
from trident.bench.cluster import LocalCluster, NodeSpec, free_port

from .conftest import read_log

pytestmark = pytest.mark.timeout(120)


def test_a_node_started_before_its_scheduler_joins_when_it_comes_up(tmp_path: Path) -> None:
    cluster = LocalCluster(["flux"], [], log_dir=tmp_path, policy="fifo")
    try:
        node = cluster.start_node(NodeSpec("sim:2", node_id="early", time_scale=0.02), 0)
        # The node says hello to nobody meanwhile, past its first 15 s of silence, when
        # it gives up that connection and dials the scheduler again on a fresh one.
        time.sleep(16.5)
        assert node.poll() is None, "the node gave up before its scheduler came up"
        cluster.start()  # the scheduler now (no nodes of its own to start)
        cluster.wait_ready(2)
        with Client(cluster.client_addr) as c:
            res = c.generate("flux", "a lighthouse", height=256, width=256, num_inference_steps=2)
        assert len(res.images) == 1
    finally:
        cluster.stop()
    events = [e["event"] for e in read_log(cluster.log_file or "")]
    assert "node.waiting_for_scheduler" in events and "node.joined" in events
    assert events.index("node.waiting_for_scheduler") < events.index("node.joined")


def test_a_node_with_a_handshake_timeout_gives_up_with_exit_code_3(tmp_path: Path) -> None:
    nobody = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trident.runtime.node", "--scheduler", nobody,
         "--devices", "sim:1", "--node-id", "lonely", "--handshake-timeout-s", "1"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3
    assert b"no answer from scheduler" in proc.stderr
    assert time.monotonic() - t0 < 30
