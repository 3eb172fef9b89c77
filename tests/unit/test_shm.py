"""The shared-memory store (trident/runtime/shm.py) without processes or sockets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trident.errors import ProtocolError
from trident.runtime import protocol
from trident.runtime.serial import pack_tensors, unpack_tensors
from trident.runtime.shm import (
    ShmError,
    ShmStore,
    attach,
    cuda_ipc_export,
    detach,
    in_segment,
    list_segments,
    node_prefix,
    pool_cap,
    segment_prefix,
    size_class,
    split_ref,
    sweep_dead,
    unlink_segments,
)

pytestmark = pytest.mark.timeout(60)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "latents": rng.standard_normal((2, 3, 5, 7)).astype(np.float32),
        "ids": np.arange(13, dtype=np.int64),
        "mask": rng.random(9) > 0.5,
        "empty": np.zeros((0, 4), np.float16),
    }


def test_round_trip_is_bit_identical_to_the_tcp_encoding(tmp_path: Path) -> None:
    store = ShmStore(segment_prefix("n", 0, os.getpid()), tmp_path)
    src = _tensors()
    seg = store.export("task-1", src)
    got = attach(seg.ref, seg.size, seg.meta, seg.offsets, directory=tmp_path)
    meta, frames = pack_tensors(src)
    tcp = unpack_tensors(meta, [bytes(f) for f in frames])
    assert set(got) == set(src) == set(tcp)
    for k in src:
        assert got[k].dtype == tcp[k].dtype and got[k].shape == tcp[k].shape
        assert got[k].tobytes() == tcp[k].tobytes() == src[k].tobytes()
        assert not got[k].size or not got[k].flags.writeable  # like tensors over frames
    assert all(off % 64 == 0 for off in seg.offsets)
    assert store.export("task-1", src) is seg  # one segment per kept output


def test_torch_tensors_and_bfloat16_round_trip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    store = ShmStore(segment_prefix("n", 0, os.getpid()), tmp_path)
    src = {"a": torch.randn(4, 5, dtype=torch.bfloat16), "b": torch.arange(6)}
    seg = store.export("k", src)
    got = attach(seg.name, seg.size, seg.meta, seg.offsets, directory=tmp_path)
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], src["a"])
    assert torch.equal(got["b"], src["b"])
    assert cuda_ipc_export(src) is None  # CPU tensors never take the CUDA path


def test_release_unlinks_without_a_pool_and_a_mapping_outlives_the_unlink(
    tmp_path: Path,
) -> None:
    store = ShmStore(segment_prefix("n", 1, os.getpid()), tmp_path, pool_bytes=0)
    seg = store.export("k", {"x": np.full(1000, 7.0, np.float32)})
    got = attach(seg.ref, seg.size, seg.meta, seg.offsets, directory=tmp_path)
    assert (tmp_path / seg.name).exists()
    assert store.release("k") and not store.release("k")
    assert not (tmp_path / seg.name).exists() and len(store) == 0
    assert float(got["x"].sum()) == 7000.0  # still mapped: the kernel frees it later
    with pytest.raises(ShmError):
        attach(seg.ref, seg.size, seg.meta, seg.offsets, directory=tmp_path)


def test_a_released_segment_is_recycled_under_a_new_generation(tmp_path: Path) -> None:
    store = ShmStore(segment_prefix("n", 1, os.getpid()), tmp_path, pool_bytes=1 << 24)
    a = store.export("k1", {"x": np.full(1000, 1.0, np.float32)})
    got_a = attach(a.ref, a.size, a.meta, a.offsets, directory=tmp_path)
    ptr = got_a["x"].ctypes.data
    del got_a
    assert store.release("k1") and store.pooled() == [a.name]
    assert (tmp_path / a.name).exists()  # kept for reuse, not unlinked
    b = store.export("k2", {"x": np.full(900, 2.0, np.float32)})  # the same size class
    assert (b.name, b.gen, a.gen) == (a.name, 2, 1) and store.reused == 1
    assert store.pooled() == [] and split_ref(b.ref) == (b.name, 2)
    got_b = attach(b.ref, b.size, b.meta, b.offsets, directory=tmp_path)
    assert float(got_b["x"].sum()) == 1800.0
    assert got_b["x"].ctypes.data == ptr  # the consumer's cached mapping, not a new one
    with pytest.raises(ShmError, match="generation"):  # the old reference is stale
        attach(a.ref, a.size, a.meta, a.offsets, directory=tmp_path)
    c = store.export("k3", {"x": np.ones(1 << 16, np.float32)})  # another class: new file
    assert c.name != a.name and c.gen == 1
    store.close()
    assert list_segments(store.prefix, tmp_path) == []


def test_the_pool_is_capped_and_trimmed_least_recently_used_first(tmp_path: Path) -> None:
    cls = size_class(4000)
    store = ShmStore(segment_prefix("n", 2, os.getpid()), tmp_path, pool_bytes=2 * cls)
    segs = [store.export(f"k{i}", {"x": np.ones(1000, np.float32)}) for i in range(3)]
    assert len(list_segments(store.prefix, tmp_path)) == 3
    for i in range(3):
        store.release(f"k{i}")
    # the first released went: the pool holds the two most recent, within its cap
    assert store.pooled() == [segs[1].name, segs[2].name] and store.free_bytes == 2 * cls
    assert list_segments(store.prefix, tmp_path) == sorted(store.pooled())
    big = store.export("big", {"x": np.ones(3 * cls // 4, np.float32)})  # over the cap
    store.release("big")
    assert not (tmp_path / big.name).exists() and store.free_bytes <= 2 * cls
    store.close()
    assert list_segments(store.prefix, tmp_path) == []


def test_pool_cap_defaults_to_a_bounded_share_of_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRIDENT_SHM_POOL_BYTES", raising=False)
    st = os.statvfs(tmp_path)
    assert 0 < pool_cap(tmp_path) <= min(2 << 30, st.f_bavail * st.f_frsize)
    monkeypatch.setenv("TRIDENT_SHM_POOL_BYTES", "0")
    assert pool_cap(tmp_path) == 0
    assert size_class(1) == size_class(1 << 16) == 1 << 16
    assert size_class((1 << 16) + 1) == 1 << 17


def test_an_output_aliasing_its_input_survives_the_producer_recycling_the_segment(
    tmp_path: Path,
) -> None:
    # A consumer stage passes an input tensor, which lies in the producer's segment,
    # straight into its output (a resumed diffuse chunk does, with the prompt
    # embeddings); the worker keeps that output past the task, and the producer then
    # recycles the segment for another output. detach must have copied it out.
    store = ShmStore(segment_prefix("n", 3, os.getpid()), tmp_path, pool_bytes=1 << 24)
    seg = store.export("enc", {"emb": np.full(1000, 3.0, np.float32)})
    inputs = attach(seg.ref, seg.size, seg.meta, seg.offsets, directory=tmp_path)
    output = {"emb": inputs["emb"], "latents": np.zeros(4, np.float32)}
    kept = detach(output)
    assert in_segment(output["emb"]) and not in_segment(kept["emb"])
    assert kept["latents"] is output["latents"]  # only aliases are copied
    store.release("enc")
    again = store.export("enc2", {"emb": np.full(1000, -1.0, np.float32)})
    assert again.name == seg.name  # recycled: the bytes under the alias changed
    assert float(output["emb"][0]) == -1.0  # what the kept output would read without it
    assert float(kept["emb"].sum()) == 3000.0 and kept["emb"].flags.writeable
    store.close()


def test_detach_copies_torch_tensors_over_a_segment(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    store = ShmStore(segment_prefix("n", 4, os.getpid()), tmp_path, pool_bytes=1 << 24)
    seg = store.export("k", {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4)})
    got = attach(seg.ref, seg.size, seg.meta, seg.offsets, directory=tmp_path, as_torch=True)
    view = got["a"][:, 1:]  # a strided view still lies in the mapping
    kept = detach({"v": view, "own": torch.ones(2)})
    assert in_segment(view) and not in_segment(kept["v"]) and torch.equal(kept["v"], view)
    assert not in_segment(kept["own"])
    store.close()


def test_close_and_clear_unlink_everything_of_the_worker(tmp_path: Path) -> None:
    prefix = segment_prefix("n", 2, os.getpid())
    store = ShmStore(prefix, tmp_path, pool_bytes=1 << 24)
    for i in range(3):
        store.export(f"k{i}", {"x": np.ones(10)})
    orphan = store.create({"x": np.ones(3)})  # made, never adopted
    assert len(list_segments(prefix, tmp_path)) == 4
    store.clear()  # the kept ones go back to the pool
    assert len(store) == 0 and len(store.pooled()) == 3
    assert list_segments(prefix, tmp_path) == sorted([orphan.name, *store.pooled()])
    store.close()
    assert list_segments(prefix, tmp_path) == []


def test_adopt_keeps_the_first_segment_of_a_key(tmp_path: Path) -> None:
    store = ShmStore(segment_prefix("n", 0, os.getpid()), tmp_path, pool_bytes=0)
    a = store.adopt("k", store.create({"x": np.ones(2)}))
    b = store.create({"x": np.ones(2)})
    assert store.adopt("k", b) is a
    assert not (tmp_path / b.name).exists()


def test_names_carry_node_device_and_pid() -> None:
    assert segment_prefix("host-1", 3, 42) == "trident-host_1-3-42-"
    assert segment_prefix("a b", 0, 1).startswith(node_prefix("a b"))
    # a pid prefix does not match a longer pid
    assert not "trident-n-0-1234-0".startswith(segment_prefix("n", 0, 123))


def test_node_cleanup_unlinks_a_dead_workers_segments_only(tmp_path: Path) -> None:
    # A child process makes a segment and dies without cleaning up.
    code = (
        "import os, sys, numpy as np\n"
        "from pathlib import Path\n"
        "from trident.runtime.shm import ShmStore, segment_prefix\n"
        "s = ShmStore(segment_prefix('n', 0, os.getpid()), Path(sys.argv[1]))\n"
        "s.export('k', {'x': np.ones(100)})\n"
        "print(os.getpid(), flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    dead = int(out.stdout.strip())
    live = ShmStore(segment_prefix("n", 1, os.getpid()), tmp_path)
    live.export("k", {"x": np.ones(3)})
    other = ShmStore(segment_prefix("n-2", 0, dead), tmp_path)  # another node's id
    other.export("k", {"x": np.ones(3)})
    assert len(list_segments(segment_prefix("n", 0, dead), tmp_path)) == 1
    swept = sweep_dead("n", tmp_path)  # a node starting up
    assert swept == list_segments(segment_prefix("n", 0, dead), tmp_path) + swept
    assert list_segments(segment_prefix("n", 0, dead), tmp_path) == []
    assert len(list_segments(segment_prefix("n", 1, os.getpid()), tmp_path)) == 1
    assert len(list_segments(node_prefix("n-2"), tmp_path)) == 1  # not ours to sweep
    assert unlink_segments(segment_prefix("n", 1, os.getpid()), tmp_path)  # a worker died
    assert list_segments(node_prefix("n"), tmp_path) == []


def test_attach_refuses_bad_names_and_layouts(tmp_path: Path) -> None:
    store = ShmStore(segment_prefix("n", 0, os.getpid()), tmp_path)
    seg = store.export("k", {"x": np.ones(16, np.float32)})
    with pytest.raises(ShmError):
        attach("../etc/passwd", seg.size, seg.meta, seg.offsets, directory=tmp_path)
    with pytest.raises(ShmError):
        attach(seg.name, size_class(seg.size) + 1, seg.meta, seg.offsets, directory=tmp_path)
    with pytest.raises(ShmError):
        attach(seg.name, seg.size, seg.meta, [seg.size], directory=tmp_path)
    with pytest.raises(ShmError):
        attach(seg.name, seg.size, seg.meta, [], directory=tmp_path)


def test_data_with_a_segment_carries_no_frames() -> None:
    head = protocol.encode(
        protocol.Data(
            key="k",
            rid="1",
            tensors=[protocol.TensorDesc(name="x", dtype="float32", shape=[2])],
            shm=protocol.ShmRef(name="trident-n-0-1-0", size=64, offsets=[0]),
        )
    )
    msg, rest = protocol.decode([head], protocol.PEER_REPLY)
    assert msg.shm.name == "trident-n-0-1-0" and rest == []
    with pytest.raises(ProtocolError):
        protocol.decode([head, b"x" * 8], protocol.PEER_REPLY)
    bad = head.replace(b"trident-n-0-1-0", b"../../etc/pwd00")
    with pytest.raises(Exception):  # noqa: B017 - the name pattern is checked at decode
        protocol.decode([bad], protocol.PEER_REPLY)
    assert (
        protocol.decode([protocol.encode(protocol.Fetch(key="k", rid="1"))], protocol.PEER_REQUEST)[
            0
        ].shm
        is False
    )


def test_a_worker_keeps_a_passed_through_input_as_its_own_copy(tmp_path: Path) -> None:
    # The worker's keep path (Worker._finished) goes through detach: its kept output
    # must not change when the producer recycles the segment its input came in.
    import asyncio

    from trident.runtime.devices import TaskResult
    from trident.runtime.worker import Worker, WorkerArgs

    store = ShmStore(segment_prefix("n", 5, os.getpid()), tmp_path, pool_bytes=1 << 24)
    seg = store.export("enc", {"emb": np.full(500, 4.0, np.float32)})
    inputs = attach(seg.ref, seg.size, seg.meta, seg.offsets, directory=tmp_path)
    worker = Worker(WorkerArgs("tcp://127.0.0.1:1", "n", "sim", 0, 0, 1 << 30))
    sent: list[object] = []

    async def send(msg: object, frames: object = None) -> None:
        sent.append(msg)

    worker._send = send  # type: ignore[method-assign]
    result = TaskResult(outputs={"emb": inputs["emb"]}, stage_seconds={"diffuse": 0.0})
    try:
        assert asyncio.run(worker._finished("t1", False, result, 0.0))
        store.release("enc")
        assert store.export("other", {"emb": np.zeros(500, np.float32)}).name == seg.name
        assert float(worker.outputs["t1"]["emb"].sum()) == 2000.0 and len(sent) == 1
    finally:
        worker.pool.shutdown(wait=False)
        worker.ctx.term()
        store.close()
