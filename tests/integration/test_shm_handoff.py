"""Same-node hand-off through shared memory, with the real daemons (issue #12 item 3).

``b6`` on three devices puts encode, diffuse and decode on three different workers
of one node, so every request hands its outputs over twice on the node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.pipelines.conftest import TinyModels
from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.runtime.shm import SHM_DIR, list_segments, node_prefix, pool_cap

from .conftest import read_log

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

REQUEST: dict[str, Any] = dict(
    prompt="a tiny flux test", height=32, width=32, num_inference_steps=2, seed=5
)


def _output_segments(node_id: str) -> list[str]:
    """The node's stage-output segments (not its stage weight files, ``...-w<digest>``:
    tests/integration/test_peer_weights.py)."""
    return [n for n in list_segments(node_prefix(node_id)) if n.rsplit("-", 1)[1][0] != "w"]


def _wait_no_segments(node_id: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = list_segments(node_prefix(node_id))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _run_tiny(
    tiny: Path, log_dir: Path, node_id: str, requests: int = 1
) -> tuple[np.ndarray, dict]:
    cluster = LocalCluster(
        [f"tiny-flux={tiny}"],
        [NodeSpec("cpu:3", node_id=node_id, threads=1)],
        policy="b6",
        log_dir=log_dir,
        startup_timeout=180,
    )
    with cluster:

        async def run() -> list[tuple[np.ndarray, dict]]:
            async with AsyncClient(cluster.client_addr, timeout=240) as c:
                out = []
                for _ in range(requests):  # one after the other: the later ones recycle
                    res = await c.generate(model="tiny-flux", **REQUEST)
                    out.append((res.array, dict(res.devices)))
                return out

        results = asyncio.run(run())
        # The requests are over: their kept outputs are released and their segments
        # back in their producers' pools (encode's and diffuse's workers), recycled by
        # each later request rather than made anew: at most one per producer remains,
        # within the pool cap, however many requests ran.
        time.sleep(0.5)
        left = _output_segments(node_id)
        assert len(left) <= 2, left
        assert sum((SHM_DIR / n).stat().st_size for n in left) <= 2 * pool_cap(), left
    # The workers stopped cleanly: they unlinked their pools.
    assert _wait_no_segments(node_id) == []
    for array, _ in results[1:]:
        assert array.tobytes() == results[0][0].tobytes()
    return results[0]


def test_tiny_flux_over_shared_memory_is_bit_identical_to_tcp_and_frees_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = TinyModels(tmp_path / "tiny")("flux")
    node = f"shm{os.getpid()}"
    shm_out, devices = _run_tiny(tiny, tmp_path / "shm", node, requests=2)
    assert len({d for group in devices.values() for d in group}) == 3, devices
    fetched = [
        e for e in read_log(tmp_path / "shm" / "trident.log") if e.get("event") == "input.fetched"
    ]
    # Each kept output was exported when its task finished; the scheduler passed the
    # reference on, and the consumer attached it with no fetch.
    assert {e["via"] for e in fetched} == {"shm_ref"} and len(fetched) == 4, fetched

    monkeypatch.setenv("TRIDENT_SHM_EAGER", "0")  # the segment made on a fetch(shm=True)
    lazy_out, _ = _run_tiny(tiny, tmp_path / "lazy", node + "l")
    fetched = [
        e for e in read_log(tmp_path / "lazy" / "trident.log") if e.get("event") == "input.fetched"
    ]
    assert {e["via"] for e in fetched} == {"shm"} and len(fetched) == 2, fetched
    assert lazy_out.tobytes() == shm_out.tobytes()

    monkeypatch.setenv("TRIDENT_SHM", "0")
    tcp_out, _ = _run_tiny(tiny, tmp_path / "tcp", node + "t")
    fetched = [
        e for e in read_log(tmp_path / "tcp" / "trident.log") if e.get("event") == "input.fetched"
    ]
    assert {e["via"] for e in fetched} == {"tcp"}, fetched
    assert shm_out.dtype == tcp_out.dtype and shm_out.shape == tcp_out.shape
    assert shm_out.tobytes() == tcp_out.tobytes()  # bit for bit


def test_a_sigkilled_workers_segments_are_unlinked_by_its_node(tmp_path: Path) -> None:
    node = f"kill{os.getpid()}"
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:3", node_id=node, time_scale=0.5)],
        policy="b6",
        log_dir=tmp_path,
    )
    with cluster:

        async def run() -> None:
            async with AsyncClient(cluster.client_addr, timeout=120) as c:
                job = asyncio.ensure_future(
                    c.generate(
                        model="flux",
                        prompt="p",
                        height=1024,
                        width=1024,
                        num_inference_steps=28,
                        seed=1,
                    )
                )
                # encode's output, kept on its worker and mapped by diffuse's, lies in
                # a segment until diffuse finishes.
                deadline = time.monotonic() + 60
                segs: list[str] = []
                while not segs and time.monotonic() < deadline:
                    segs = list_segments(node_prefix(node))
                    await asyncio.sleep(0.02)
                assert segs, "no segment appeared"
                pid = int(segs[0].rsplit("-", 3)[2])
                os.kill(pid, signal.SIGKILL)
                t0 = time.monotonic()
                while any((SHM_DIR / s).exists() for s in segs) and time.monotonic() - t0 < 10:
                    await asyncio.sleep(0.02)
                assert not any((SHM_DIR / s).exists() for s in segs), segs
                job.cancel()

        asyncio.run(run())
    log = read_log(tmp_path / "trident.log")
    assert any(e.get("event") == "shm.unlinked" for e in log)
    assert _wait_no_segments(node) == []
