"""Wire validation of the eager shared-memory references (protocol version 6):
``task_finished.kept_shm`` and ``InputAddr.shm`` are checked at the socket edge."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from trident.errors import ProtocolError
from trident.runtime import protocol, shm

TENSORS = [
    protocol.TensorDesc(name="x", dtype="float32", shape=[4]),
    protocol.TensorDesc(name="y", dtype="int64", shape=[2]),
]
GOOD = protocol.ShmOutput(name="trident-n-0-123-4.7", size=256, offsets=[64, 128], tensors=TENSORS)


def _finished(ref: Any) -> bytes:
    d = msgspec.to_builtins(protocol.TaskFinished(task_id="t", stage_seconds={}))
    d["kept_shm"] = ref
    return msgspec.msgpack.encode(d)


def _run_task(ref: Any) -> bytes:
    msg = protocol.RunTask(
        task_id="t2",
        request_id="r",
        model="flux",
        stages=["diffuse"],
        devices=["n/cpu:1"],
        rank=0,
        inputs=[protocol.InputAddr(key="t", device_id="n/cpu:0", addr="tcp://127.0.0.1:1")],
        final=False,
        params={},
    )
    d = msgspec.to_builtins(msg)
    d["inputs"][0]["shm"] = ref
    return msgspec.msgpack.encode(d)


def _good() -> dict[str, Any]:
    return msgspec.to_builtins(GOOD)  # type: ignore[no-any-return]


def test_the_version_is_bumped_and_the_name_pattern_is_shms() -> None:
    assert protocol.PROTOCOL_VERSION == 6
    assert shm.NAME_RE.pattern == protocol.SHM_NAME_PATTERN


def test_a_well_formed_reference_round_trips_on_both_channels() -> None:
    msg, _ = protocol.decode([_finished(_good())], protocol.CLUSTER_TO_SCHEDULER)
    assert msg.kept_shm == GOOD
    msg, _ = protocol.decode([_run_task(_good())], protocol.SCHEDULER_TO_WORKER)
    assert msg.inputs[0].shm == GOOD
    # absent: None (an older-style message without the field decodes)
    msg, _ = protocol.decode([_run_task(None)], protocol.SCHEDULER_TO_WORKER)
    assert msg.inputs[0].shm is None
    assert protocol.decode([_finished(None)], protocol.CLUSTER_TO_SCHEDULER)[0].kept_shm is None


def _bad(**change: Any) -> dict[str, Any]:
    d = _good()
    d.update(change)
    return d


@pytest.mark.parametrize(
    "ref",
    [
        _bad(name="../../etc/passwd"),
        _bad(name="trident-n/../x-1.1"),
        _bad(name="trident-n-0-123-4"),  # no generation: a recycled segment would pass
        _bad(name="trident-n-0-123-4.x"),
        _bad(name="trident-" + "a" * 300 + "-1.1"),
        _bad(size=0),
        _bad(size=1 << 41),
        _bad(offsets=[64]),  # fewer offsets than tensors
        _bad(offsets=[64, 512]),  # past the segment
        _bad(offsets=[-64, 128]),
        _bad(offsets=list(range(0, 257 * 64, 64)), tensors=[TENSORS[0]] * 257),
        _bad(tensors="x"),
        "trident-n-0-123-4.7",
        {"name": "trident-n-0-123-4.7"},
    ],
)
def test_a_malformed_reference_is_rejected_at_the_socket_edge(ref: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode([_finished(ref)], protocol.CLUSTER_TO_SCHEDULER)
    with pytest.raises(ProtocolError):
        protocol.decode([_run_task(ref)], protocol.SCHEDULER_TO_WORKER)


def test_a_task_finished_with_a_reference_still_carries_no_frames() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode([_finished(_good()), b"x" * 16], protocol.CLUSTER_TO_SCHEDULER)
