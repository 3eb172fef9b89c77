"""Peer weight copies on CPU (issue #12 item 4): a stage a same-node device holds loads
from that device's shared-memory copy instead of the model directory, gives the same
pixels, and its files live exactly as long as some live device holds the stage.

The first tests drive two or three executors in one process (as three devices of a
node: the names carry device index and pid); the last runs the real daemons and
SIGKILLs a worker.
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
from trident.report import summarize
from trident.runtime.devices import TorchExecutor
from trident.runtime.peerweights import PeerWeights, WeightKey
from trident.runtime.shm import SHM_DIR, list_segments, node_prefix

from .conftest import read_log

pytestmark = pytest.mark.timeout(300)

PARAMS: dict[str, Any] = dict(
    prompt="a tiny flux test", height=32, width=32, num_inference_steps=2, seed=5
)
STAGES = ("encode", "diffuse", "decode")


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return TinyModels(tmp_path_factory.mktemp("tiny"))("flux")


def _executor(flux: Path, index: int, shm: Path, dtype: str = "float32") -> TorchExecutor:
    models = {"f": {"family": "flux", "path": str(flux), "dtype": dtype}}
    return TorchExecutor(models, "cpu", threads=1, peers=PeerWeights("n", index, os.getpid(), shm))


def _weight_files(shm: Path) -> list[str]:
    return [n for n in list_segments(node_prefix("n"), shm) if n.rsplit("-", 1)[1][0] == "w"]


def _image(ex: TorchExecutor) -> np.ndarray:
    out = ex.run("f", STAGES, {}, PARAMS, {})
    return np.asarray(out.outputs["output"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stage_loaded_from_a_peer_gives_the_same_pixels_without_a_second_copy(
    flux: Path, tmp_path: Path, dtype: str
) -> None:
    a, b = _executor(flux, 0, tmp_path, dtype), _executor(flux, 1, tmp_path, dtype)
    try:
        for stage in STAGES:
            assert a.load("f", stage, "disk")[1] == "disk"
        a.flush()  # the copies are written in the background
        # One file per stage, named for device 0.
        assert len(_weight_files(tmp_path)) == 3
        for stage in STAGES:
            assert b.load("f", stage, "peer")[1] == "peer"
        assert b.load("f", "diffuse", "peer")[1] == "resident"
        # Device 1 linked each file under its own name: same files, two names each.
        files = _weight_files(tmp_path)
        assert len(files) == 6
        assert {os.stat(tmp_path / n).st_nlink for n in files} == {2}
        # The peer's modules hold the shared tensors, not copies of them.
        pa, pb = a.pipes["f"], b.pipes["f"]
        wa = pa._pipes["diffuse"].transformer.proj_out.weight
        wb = pb._pipes["diffuse"].transformer.proj_out.weight
        assert str(wb.dtype) == f"torch.{dtype}"
        assert torch_equal(wa, wb)
        assert _image(a).tobytes() == _image(b).tobytes()
    finally:
        a.close()
        b.close()
    assert _weight_files(tmp_path) == []


def test_shared_copies_keep_the_directory_loads_alignment_and_its_exact_pixels(
    flux: Path, tmp_path: Path
) -> None:
    """A directory load leaves tensors where the safetensors file put them (not on 64
    bytes); AVX-512 kernels round differently with a weight's alignment. The publisher's
    switch to the shared copy and a peer's load keep each tensor's address modulo 64,
    and so the pixels of a plain directory load, bit for bit."""
    plain = TorchExecutor({"f": {"family": "flux", "path": str(flux)}}, "cpu", threads=1)
    a, b = _executor(flux, 0, tmp_path), _executor(flux, 1, tmp_path)
    try:
        for stage in STAGES:
            plain.load("f", stage, "disk")
            a.load("f", stage, "disk")
        a.flush()  # a now runs over its shared copy
        for stage in STAGES:
            assert b.load("f", stage, "peer")[1] == "peer"

        def where(ex: TorchExecutor) -> list[int]:
            t = ex.pipes["f"]._pipes["diffuse"].transformer
            return [p.data_ptr() % 64 for p in t.parameters()]

        assert where(a) == where(b) == where(plain)
        want = _image(plain).tobytes()
        assert _image(a).tobytes() == want
        assert _image(b).tobytes() == want
    finally:
        for ex in (plain, a, b):
            ex.close()


def torch_equal(x: Any, y: Any) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_the_copy_lives_while_any_device_holds_the_stage(flux: Path, tmp_path: Path) -> None:
    a, b, c = (_executor(flux, i, tmp_path) for i in range(3))
    try:
        assert a.load("f", "diffuse", "disk")[1] == "disk"
        a.flush()
        assert b.load("f", "diffuse", "peer")[1] == "peer"
        a.unload("f", "diffuse")  # the publisher lets go: device 1 still has a name
        assert [n.split("-")[2] for n in _weight_files(tmp_path)] == ["1"]
        assert c.load("f", "diffuse", "peer")[1] == "peer"
        b.close()
        c.unload("f", "diffuse")
        assert _weight_files(tmp_path) == []
        # Nobody holds it now: "peer" falls back to the model directory, said so, and
        # that load publishes a copy again.
        assert a.load("f", "diffuse", "peer")[1] == "node-cache"
        a.flush()
        assert len(_weight_files(tmp_path)) == 1
    finally:
        for ex in (a, b, c):
            ex.close()
    assert _weight_files(tmp_path) == []


def test_a_damaged_peer_file_falls_back_to_disk(flux: Path, tmp_path: Path) -> None:
    a, b = _executor(flux, 0, tmp_path), _executor(flux, 1, tmp_path)
    try:
        a.load("f", "encode", "disk")
        a.flush()
        (name,) = _weight_files(tmp_path)
        with open(tmp_path / name, "r+b") as f:
            f.write(b"garbage!")
        assert b.load("f", "encode", "peer")[1] == "node-cache"
        assert b.pipes["f"].loaded() == {"encode"}
        assert not b.peers or not b.peers.holds(WeightKey("f", "encode", "float32"))
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_daemons_load_from_a_peer_and_a_killed_peer_leaves_no_files(
    flux: Path, tmp_path: Path
) -> None:
    node = f"pw{os.getpid()}"
    cluster = LocalCluster(
        [f"tiny-flux={flux}"],
        [NodeSpec("cpu:2", node_id=node, threads=1)],
        policy="fifo",
        scheduler_args=["--policy-option", "preload=false"],
        log_dir=tmp_path,
        startup_timeout=180,
    )

    def weight_files() -> list[str]:
        return [n for n in list_segments(node_prefix(node)) if n.rsplit("-", 1)[1][0] == "w"]

    with cluster:

        async def run() -> tuple[np.ndarray, list[np.ndarray]]:
            async with AsyncClient(cluster.client_addr, timeout=240) as c:
                first = await c.generate(model="tiny-flux", **PARAMS)
                # Device 0 writes the node's copies of its stages in the background.
                deadline = time.monotonic() + 30
                while len(weight_files()) < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                # Device 0 holds every stage now; two at once: the second goes to
                # device 1, which loads from device 0's copy.
                both = await asyncio.gather(
                    *(c.generate(model="tiny-flux", **PARAMS) for _ in range(2))
                )
                return first.array, [r.array for r in both]

        first, both = asyncio.run(run())
        for arr in both:
            assert arr.tobytes() == first.tobytes()
        log = read_log(cluster.log_file or "")
        loads = [e for e in log if e["event"] == "stage.loaded" and e["component"] == "scheduler"]
        peer = [e for e in loads if e.get("source") == "peer"]
        assert peer, [(e.get("device_id"), e.get("stage"), e.get("source")) for e in loads]
        # `trident report` sums load seconds by source.
        by_source = summarize(cluster.log_file or "").load_summary()
        assert by_source["peer"]["loads"] == len(peer)
        assert by_source["disk"]["loads"] >= 3
        assert len(weight_files()) >= 3
        # SIGKILL device 0's worker: the node unlinks its names; device 1's stay.
        spawned = {e["device_id"]: e["pid"] for e in log if e["event"] == "worker.spawned"}
        victim = spawned[f"{node}/0"] if f"{node}/0" in spawned else sorted(spawned.values())[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(f"-{victim}-" in n for n in weight_files()):
            time.sleep(0.1)
        assert not [n for n in weight_files() if f"-{victim}-" in n]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and weight_files():
        time.sleep(0.1)
    assert weight_files() == [], "a clean stop unlinks every weight file"
    assert SHM_DIR.exists()
