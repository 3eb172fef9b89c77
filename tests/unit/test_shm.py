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
    list_segments,
    node_prefix,
    segment_prefix,
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
    got = attach(seg.name, seg.size, seg.meta, seg.offsets, directory=tmp_path)
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


def test_release_unlinks_and_a_mapping_outlives_the_unlink(tmp_path: Path) -> None:
    store = ShmStore(segment_prefix("n", 1, os.getpid()), tmp_path)
    seg = store.export("k", {"x": np.full(1000, 7.0, np.float32)})
    got = attach(seg.name, seg.size, seg.meta, seg.offsets, directory=tmp_path)
    assert (tmp_path / seg.name).exists()
    assert store.release("k") and not store.release("k")
    assert not (tmp_path / seg.name).exists() and len(store) == 0
    assert float(got["x"].sum()) == 7000.0  # still mapped: the kernel frees it later
    with pytest.raises(ShmError):
        attach(seg.name, seg.size, seg.meta, seg.offsets, directory=tmp_path)


def test_close_and_clear_unlink_everything_of_the_worker(tmp_path: Path) -> None:
    prefix = segment_prefix("n", 2, os.getpid())
    store = ShmStore(prefix, tmp_path)
    for i in range(3):
        store.export(f"k{i}", {"x": np.ones(10)})
    orphan = store.create({"x": np.ones(3)})  # made, never adopted
    assert len(list_segments(prefix, tmp_path)) == 4
    store.clear()
    assert list_segments(prefix, tmp_path) == [orphan.name]
    store.close()
    assert list_segments(prefix, tmp_path) == []


def test_adopt_keeps_the_first_segment_of_a_key(tmp_path: Path) -> None:
    store = ShmStore(segment_prefix("n", 0, os.getpid()), tmp_path)
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
        attach(seg.name, seg.size * 100, seg.meta, seg.offsets, directory=tmp_path)
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
