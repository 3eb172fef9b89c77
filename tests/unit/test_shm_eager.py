"""The eager same-node hand-off (docs/runtime.md, "Same-node hand-off"): a worker that
keeps an output writes it into its shared-memory pool before ``task_finished``, the
scheduler passes the reference on in the consumer's ``InputAddr.shm``, and a consumer
on the holder's node attaches it with no fetch. In process: real PeerServer /
PeerClient sockets on loopback, no daemons."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zmq.asyncio

from trident.config import SchedulerConfig
from trident.runtime import protocol, shm
from trident.runtime.dataplane import PeerClient, PeerServer
from trident.runtime.devices import TaskResult
from trident.runtime.shm import ShmStore, segment_prefix
from trident.runtime.worker import InputLost, Worker, WorkerArgs, _Task
from trident.sched.core import FifoPolicy

pytestmark = pytest.mark.timeout(60)


def _outputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "latents": rng.standard_normal((3, 64, 64)).astype(np.float32),
        "ids": np.arange(37, dtype=np.int64),
        "empty": np.zeros((0, 2), np.float16),
    }


class _Pair:
    """A holder worker (node ``n``, index 0) with its PeerServer and pool, and a
    consumer worker on ``consumer_node`` with a PeerClient that counts its fetches."""

    def __init__(self, tmp_path: Path, consumer_node: str = "n") -> None:
        self.ctx = zmq.asyncio.Context()
        pid = os.getpid()
        self.holder = Worker(WorkerArgs("tcp://127.0.0.1:1", "n", "sim", 0, 0, 1 << 30))
        self.holder.shm = ShmStore(segment_prefix("n", 0, pid), tmp_path, pool_bytes=1 << 26)
        self.holder.server = PeerServer(
            self.ctx, "127.0.0.1", self.holder.outputs, shm=self.holder.shm
        )
        self.holder.eager_shm = True
        self.reports: list[Any] = []

        async def send(msg: Any, frames: Any = None) -> None:
            # Through the wire codec, as the scheduler would receive it.
            decoded, _ = protocol.decode(
                [protocol.encode(msg), *(frames or [])], protocol.CLUSTER_TO_SCHEDULER
            )
            self.reports.append(decoded)

        self.holder._send = send  # type: ignore[method-assign]
        self.consumer = Worker(WorkerArgs("tcp://127.0.0.1:1", consumer_node, "sim", 1, 1, 1 << 30))
        self.consumer.shm = ShmStore(segment_prefix(consumer_node, 1, pid), tmp_path)
        self.consumer.peers = PeerClient(self.ctx)
        self.consumer.peer_addr = "tcp://127.0.0.1:9"  # not the holder's
        self.fetches: list[bool] = []
        real = self.consumer.peers.fetch_via

        async def counting(addr: str, key: str, **kw: Any) -> Any:
            self.fetches.append(bool(kw.get("shm")))
            return await real(addr, key, **kw)

        self.consumer.peers.fetch_via = counting  # type: ignore[method-assign]

    async def keep(self, key: str, outputs: dict[str, Any]) -> protocol.TaskFinished:
        result = TaskResult(outputs=outputs, stage_seconds={"encode": 0.0})
        assert await self.holder._finished(key, False, result, 0.0)
        report = self.reports.pop()
        assert isinstance(report, protocol.TaskFinished) and report.task_id == key
        return report

    def addr(self, key: str, ref: protocol.ShmOutput | None) -> protocol.InputAddr:
        assert self.holder.server is not None
        return protocol.InputAddr(
            key=key, device_id="n/sim:0", addr=self.holder.server.address, shm=ref
        )

    async def fetch(self, *inputs: protocol.InputAddr) -> dict[str, Any]:
        task = _Task(msg=SimpleNamespace(task_id="next", inputs=list(inputs)))
        return await self.consumer._fetch_inputs(task)

    def run(self, body: Callable[[_Pair], Awaitable[None]]) -> None:
        async def main() -> None:
            assert self.holder.server is not None
            serve = asyncio.create_task(self.holder.server.serve())
            try:
                await body(self)
            finally:
                serve.cancel()

        try:
            asyncio.run(main())
        finally:
            assert self.consumer.peers is not None and self.holder.server is not None
            self.consumer.peers.close()
            self.holder.server.close()
            for w in (self.holder, self.consumer):
                assert w.shm is not None
                w.shm.close()
                w.pool.shutdown(wait=False)
                w.ctx.term()
            self.ctx.term()


@pytest.fixture(autouse=True)
def _shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)  # where attach looks (the default)


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes()


def test_a_kept_output_is_exported_and_attached_bit_identical_to_tcp_with_no_fetch(
    tmp_path: Path,
) -> None:
    async def body(p: _Pair) -> None:
        src = _outputs()
        report = await p.keep("enc", src)
        ref = report.kept_shm
        assert ref is not None and report.tensors is None
        assert ref.name.startswith(segment_prefix("n", 0, os.getpid()))
        assert p.holder.shm is not None and p.holder.shm.get("enc") is not None
        got = await p.fetch(p.addr("enc", ref))
        assert p.fetches == []  # no request to the holder at all
        assert p.consumer.peers is not None
        tcp, _ = await p.consumer.peers.fetch(p.addr("enc", None).addr, "enc")
        _same(got, tcp)
        _same(got, src)
        # a final output rides with task_finished: no segment, no reference
        final = TaskResult(outputs={"output": np.ones(4, np.float32)}, stage_seconds={})
        assert await p.holder._finished("dec", True, final, 0.0)
        assert p.reports.pop().kept_shm is None and p.holder.shm.get("dec") is None

    _Pair(tmp_path).run(body)


def test_a_stale_reference_to_a_recycled_segment_falls_back_and_never_reads_the_wrong_output(
    tmp_path: Path,
) -> None:
    async def body(p: _Pair) -> None:
        assert p.holder.shm is not None
        src = _outputs()
        ref = (await p.keep("enc", src)).kept_shm
        assert ref is not None
        # The segment goes back to the pool and is rewritten with another output of
        # its size (generation + 1) while "enc" itself is still kept (over tcp only).
        p.holder.shm.release("enc")
        other = {k: (v + 1 if v.dtype.kind == "f" else v * 3) for k, v in src.items()}
        ref2 = (await p.keep("other", other)).kept_shm
        assert ref2 is not None and ref2.name.split(".")[0] == ref.name.split(".")[0]
        assert ref2.name != ref.name and p.holder.shm.reused == 1
        got = await p.fetch(p.addr("enc", ref))
        assert p.fetches == [True]  # the stale ref was refused: fetched (shm, then tcp)
        _same(got, src)
        # released for good: the stale ref still never reads "other"'s bytes
        p.holder.outputs.pop("enc")
        with pytest.raises(InputLost):
            await p.fetch(p.addr("enc", ref))
        # a ref whose file is gone (its holder died and was cleaned up) falls back too
        gone = protocol.ShmOutput(
            name=segment_prefix("n", 0, os.getpid()) + "999.1",
            size=ref2.size,
            offsets=ref2.offsets,
            tensors=ref2.tensors,
        )
        _same(await p.fetch(p.addr("other", gone)), other)

    _Pair(tmp_path).run(body)


def test_a_consumer_on_another_node_ignores_the_reference(tmp_path: Path) -> None:
    async def body(p: _Pair) -> None:
        src = _outputs()
        await p.keep("enc", src)
        decoy = (await p.keep("decoy", {k: v * 0 for k, v in src.items()})).kept_shm
        assert decoy is not None
        # A reference that would attach fine (another kept output's live segment): a
        # consumer elsewhere never opens it, it fetches over tcp.
        got = await p.fetch(p.addr("enc", decoy))
        assert p.fetches == [False]
        _same(got, src)

    _Pair(tmp_path, consumer_node="m").run(body)


def test_a_consumer_without_shared_memory_ignores_the_reference(tmp_path: Path) -> None:
    async def body(p: _Pair) -> None:
        src = _outputs()
        ref = (await p.keep("enc", src)).kept_shm
        assert p.consumer.shm is not None
        p.consumer.shm.close()
        p.consumer.shm = None  # TRIDENT_SHM=0 on the consumer's side
        _same(await p.fetch(p.addr("enc", ref)), src)
        assert p.fetches == [False]
        p.consumer.shm = ShmStore(segment_prefix("n", 1, os.getpid()), tmp_path)

    _Pair(tmp_path).run(body)


def test_no_eager_export_when_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIDENT_SHM_EAGER", "0")
    assert not shm.eager_export_enabled()
    monkeypatch.setenv("TRIDENT_SHM_EAGER", "1")
    monkeypatch.setenv("TRIDENT_SHM", "0")
    assert not shm.eager_export_enabled()

    async def body(p: _Pair) -> None:
        p.holder.eager_shm = False
        src = _outputs()
        assert (await p.keep("enc", src)).kept_shm is None
        _same(await p.fetch(p.addr("enc", None)), src)
        assert p.fetches == [True]  # today's fetch(shm=True)

    _Pair(tmp_path).run(body)


# --------------------------------------------------------------------------- scheduler


def test_the_scheduler_passes_the_reference_on_and_drops_it_on_release() -> None:
    """In process, no sockets: task_finished.kept_shm -> the consumer's InputAddr.shm."""
    from trident.runtime.scheduler import SchedulerDaemon, _WorkerConn
    from trident.sched.types import DeviceInfo, InputRef, ReleaseOutput, RunTask

    daemon = SchedulerDaemon(SchedulerConfig(), {}, core=FifoPolicy({}))
    try:
        for i in (0, 1):
            dev = f"n/sim:{i}"
            daemon.workers[dev] = _WorkerConn(
                ident=f"dev:{dev}".encode(),
                info=DeviceInfo(dev, "n", "sim", i, 1 << 30),
                peer_addr=f"tcp://127.0.0.1:{7000 + i}",
                pid=100 + i,
                last_seen=0.0,
            )
            daemon.worker_by_ident[f"dev:{dev}".encode()] = dev
        tensors = [protocol.TensorDesc(name="x", dtype="float32", shape=[4])]

        def ref(prefix: str) -> protocol.ShmOutput:
            return protocol.ShmOutput(name=f"{prefix}0.1", size=80, offsets=[64], tensors=tensors)

        own = ref(segment_prefix("n", 0, 100))

        def finish(task_id: str, kept: protocol.ShmOutput, final: bool = False) -> None:
            daemon.task_info[task_id] = RunTask(
                task_id, "r", "flux", ("encode",), ("n/sim:0",), final=final
            )
            daemon._on_worker(
                b"dev:n/sim:0",
                protocol.TaskFinished(task_id=task_id, stage_seconds={}, kept_shm=kept),
                [],
            )

        finish("r.enc", own)
        finish("r.bad", ref(segment_prefix("n", 1, 101)))  # another worker's segment
        finish("r.fin", own, final=True)  # a final output is not kept
        assert daemon.workers["n/sim:0"].shm_refs == {"r.enc": own}

        daemon._execute(
            RunTask(
                "r.dif",
                "r",
                "flux",
                ("diffuse",),
                ("n/sim:1",),
                (InputRef("r.enc", "n/sim:0"), InputRef("r.bad", "n/sim:0")),
            )
        )
        _, frames = daemon.out.pop()
        header, _ = protocol.decode(frames[1:], protocol.SCHEDULER_TO_WORKER)
        assert [i.shm for i in header.inputs] == [own, None]

        daemon._execute(ReleaseOutput("n/sim:0", "r.enc"))
        assert daemon.workers["n/sim:0"].shm_refs == {}
        finish("r.enc2", own)
        daemon._worker_lost("n/sim:0", "test")
        assert daemon.workers["n/sim:0"].shm_refs == {}
    finally:
        daemon.ctx.term()
