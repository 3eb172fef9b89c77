"""Every message on Trident's wire, in one place.

A message is a ZeroMQ multipart: ``[header, *tensor_frames]`` where ``header`` is a
msgpack map with ``"t"`` (the message type, below) and the type's fields, and the
tensor frames are described by the header's ``"tensors"`` list (see
:mod:`trident.runtime.serial`). No pickle anywhere. ROUTER sockets see the sender's
identity as an extra first frame, handled by the transport.

Channels and their messages (C client, S scheduler, N node, W worker)::

    C -> S   submit, cancel, ping
    S -> C   result (+frames), error, pong
    N -> S   node_hello, node_heartbeat, worker_exited, node_bye
    S -> N   node_welcome, reject, reregister, shutdown
    W -> S   worker_hello, heartbeat, task_started, task_finished (+frames when final),
             task_failed, stage_loaded, stage_unloaded
    S -> W   worker_welcome, reject, run_task, run_batch, release, load_stage, unload_stage,
             shutdown
    W -> W   fetch -> data (+frames) | missing;  barrier -> go     (peer data plane)
    any      error   (a reply to a message that could not be understood)

``run_batch`` carries several requests' tasks of the same model, stages and devices
(``members``: one map per task, fields :data:`BATCH_MEMBER_FIELDS`) to run as one call;
the worker reports ``task_started`` / ``task_finished`` / ``task_failed`` per member
task id, exactly as for ``run_task``.

The handshake (``*_hello``) carries :data:`PROTOCOL_VERSION`; a mismatch is answered
with ``reject`` and the peer exits with a clear message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from trident.errors import ProtocolError

__all__ = [
    "BATCH_MEMBER_FIELDS",
    "MAX_HEADER_BYTES",
    "MESSAGE_FIELDS",
    "PROTOCOL_VERSION",
    "decode",
    "encode",
    "error_message",
]

# 2: run_batch (batched tasks) and the submit field "batch".
PROTOCOL_VERSION = 2

# Headers are small maps; anything bigger is malformed or hostile.
MAX_HEADER_BYTES = 1 << 20

# message type -> required fields (optional fields are documented at the sender).
MESSAGE_FIELDS: dict[str, tuple[str, ...]] = {
    # client <-> scheduler
    "submit": ("id", "model", "params"),
    "cancel": ("id",),
    "ping": (),
    "pong": ("models",),
    "result": ("id", "timings", "devices", "tensors"),
    "error": ("code", "message"),
    # node <-> scheduler
    "node_hello": ("version", "node_id", "devices"),
    "node_welcome": ("models", "heartbeat_s"),
    "node_heartbeat": ("node_id", "workers"),
    "worker_exited": ("node_id", "index", "exitcode", "restarts"),
    "node_bye": ("node_id",),
    "reject": ("reason",),
    "reregister": (),
    "shutdown": (),
    # worker <-> scheduler
    "worker_hello": ("version", "device_id", "node_id", "index", "kind", "memory_bytes", "peer_addr"),
    "worker_welcome": ("models", "heartbeat_s"),
    "heartbeat": (),
    "run_task": ("task_id", "request_id", "model", "stages", "devices", "rank", "inputs", "final", "params"),
    # optional: options, leader_addr, group (as run_task)
    "run_batch": ("batch_id", "model", "stages", "devices", "rank", "members"),
    "task_started": ("task_id",),
    "task_finished": ("task_id", "stage_seconds"),
    "task_failed": ("task_id", "error", "message", "retryable"),
    "release": ("key",),
    "load_stage": ("model", "stage"),
    "unload_stage": ("model", "stage"),
    "stage_loaded": ("model", "stage", "seconds", "source"),
    "stage_unloaded": ("model", "stage"),
    # worker <-> worker
    "fetch": ("key", "rid"),
    "data": ("key", "rid", "tensors"),
    "missing": ("key", "rid"),
    "barrier": ("task_id", "rank"),
    "go": ("task_id",),
}

# Each map of run_batch's "members": one request's task riding in the batch.
BATCH_MEMBER_FIELDS: tuple[str, ...] = ("task_id", "request_id", "inputs", "final", "params")


def _member_problem(members: Any) -> str | None:
    """Why a run_batch's ``members`` is malformed, or None: checked on both ends so a
    worker never starts a batch it cannot report on member by member."""
    if not isinstance(members, list) or not members:
        return "'members' is not a non-empty list"
    for i, m in enumerate(members):
        if not isinstance(m, dict):
            return f"member {i} is not a map"
        missing = [f for f in BATCH_MEMBER_FIELDS if f not in m]
        if missing:
            return f"member {i}: missing fields {missing}"
    return None


def encode(msg_type: str, fields: Mapping[str, Any] | None = None, **more: Any) -> bytes:
    """The msgpack header of a message of ``msg_type``."""
    if msg_type not in MESSAGE_FIELDS:
        raise ValueError(f"unknown message type {msg_type!r}")
    body: dict[str, Any] = {"t": msg_type}
    if fields:
        body.update(fields)
    body.update(more)
    missing = [f for f in MESSAGE_FIELDS[msg_type] if f not in body]
    if missing:
        raise ValueError(f"{msg_type}: missing fields {missing}")
    if msg_type == "run_batch":
        problem = _member_problem(body["members"])
        if problem is not None:
            raise ValueError(f"run_batch: {problem}")
    return msgpack.packb(body, use_bin_type=True)


def decode(frames: Sequence[Any]) -> tuple[dict[str, Any], list[Any]]:
    """Split a received multipart into (header, tensor frames) and check the header.

    Raises :class:`ProtocolError` for anything that is not a well-formed known message.
    """
    if not frames:
        raise ProtocolError("empty message")
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    msg_type = header.get("t")
    if not isinstance(msg_type, str) or msg_type not in MESSAGE_FIELDS:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    missing = [f for f in MESSAGE_FIELDS[msg_type] if f not in header]
    if missing:
        raise ProtocolError(f"{msg_type}: missing fields {missing}")
    if msg_type == "run_batch":
        problem = _member_problem(header["members"])
        if problem is not None:
            raise ProtocolError(f"run_batch: {problem}")
    rest = list(frames[1:])
    described = header.get("tensors")
    if described is not None:
        if not isinstance(described, list):
            raise ProtocolError(f"{msg_type}: 'tensors' is not a list")
        if len(described) != len(rest):
            raise ProtocolError(
                f"{msg_type}: {len(described)} tensors described, {len(rest)} frames attached"
            )
    elif rest:
        raise ProtocolError(f"{msg_type}: {len(rest)} unexpected frames")
    return header, rest


def error_message(code: str, message: str, **more: Any) -> bytes:
    return encode("error", {"code": code, "message": message, **more})
