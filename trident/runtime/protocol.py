"""Every message on Trident's wire, in one place, as typed structs.

A message is a ZeroMQ multipart ``[header, *tensor_frames]``. The header is one
msgspec :class:`Message` struct encoded as a msgpack map whose ``"t"`` field names the
type (a tagged union, the vLLM ``serial_utils`` pattern); tensor frames follow,
described by the header's ``tensors`` list (:mod:`trident.runtime.serial`). No pickle.
ROUTER sockets see the sender's identity as an extra first frame (the transport's).

Decoding *is* validation: :func:`decode` checks the message's type against what its
channel may carry, every field's type and bounds, and the tensor frames against their
descriptions, and raises :class:`~trident.errors.ProtocolError` (carrying the request
id when one could be read) for anything else. Nothing malformed reaches a handler.

Channels (C client, S scheduler, N node, W worker), each with its own decoder::

    C -> S   submit, cancel, ping, status_query                CLIENT_TO_SCHEDULER
    S -> C   result (+frames), error, pong, progress, cluster_status
                                                               SCHEDULER_TO_CLIENT
    N,W -> S node_hello, node_heartbeat, worker_exited, node_bye,
             worker_hello, heartbeat, task_started, task_progress,
             task_finished (+frames when final), task_failed, stage_loaded,
             stage_unloaded, stage_load_failed                 CLUSTER_TO_SCHEDULER
    S -> N   node_welcome, reject, reregister, shutdown, kill_worker, error
                                                               SCHEDULER_TO_NODE
    S -> W   worker_welcome, reject, reregister, run_task, run_batch, cancel_task,
             yield_task, release, load_stage, unload_stage, shutdown, error
                                                               SCHEDULER_TO_WORKER
    W -> W   fetch, barrier                                    PEER_REQUEST
    W -> W   data (+frames), missing, go, error                PEER_REPLY

The handshakes (``node_hello``, ``worker_hello``) carry :data:`PROTOCOL_VERSION`; a
mismatch is answered with ``reject`` and the peer exits with a clear message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeAlias

import msgspec
from msgspec import Meta, Struct

from trident.errors import ProtocolError
from trident.families import Stage

__all__ = [
    "CLIENT_TO_SCHEDULER",
    "CLUSTER_TO_SCHEDULER",
    "MAX_HEADER_BYTES",
    "OUTPUT_FPS_PARAM",
    "OUTPUT_TYPES",
    "OUTPUT_TYPE_PARAM",
    "PEER_REPLY",
    "PEER_REQUEST",
    "PROTOCOL_VERSION",
    "SCHEDULER_TO_CLIENT",
    "SCHEDULER_TO_NODE",
    "SCHEDULER_TO_WORKER",
    "SHM_NAME_PATTERN",
    "Barrier",
    "BatchMember",
    "Cancel",
    "CancelTask",
    "Channel",
    "ClusterStatus",
    "Data",
    "DeviceStatus",
    "Error",
    "Fetch",
    "Go",
    "GroupSpec",
    "Heartbeat",
    "InputAddr",
    "KillWorker",
    "LoadStage",
    "Message",
    "Missing",
    "ModelRef",
    "ModelStatus",
    "NodeBye",
    "NodeDevice",
    "NodeHeartbeat",
    "NodeHello",
    "NodeStatus",
    "NodeWelcome",
    "OutputInfo",
    "OutputType",
    "Ping",
    "Pong",
    "Progress",
    "Reject",
    "Release",
    "Reregister",
    "ResidentStage",
    "Result",
    "RunBatch",
    "RunTask",
    "RunningTask",
    "ShmOutput",
    "ShmRef",
    "Shutdown",
    "StageLoadFailed",
    "StageLoaded",
    "StageUnloaded",
    "StatusQuery",
    "Submit",
    "SubmitParams",
    "TaskFailed",
    "TaskFinished",
    "TaskProgress",
    "TaskStarted",
    "TensorDesc",
    "UnloadStage",
    "WorkerExited",
    "WorkerHello",
    "WorkerStatus",
    "WorkerWelcome",
    "YieldTask",
    "decode",
    "encode",
    "error_message",
    "message_types",
]

# 3: typed structs (msgspec), cancel_task, kill_worker, stage_load_failed, ping nonce.
# 4: output types (Submit.output_type, OutputInfo), status query.
# 5: yield_task, task_finished.steps_done (a paused diffuse).
# 6: task_finished.kept_shm, InputAddr.shm (a same-node input attached without a fetch).
PROTOCOL_VERSION = 6

# Headers are small maps; anything bigger is malformed or hostile.
MAX_HEADER_BYTES = 1 << 20

# ---------------------------------------------------------------- field types (bounds)

Id = Annotated[str, Meta(min_length=1, max_length=256)]
ClientRid = Annotated[str, Meta(min_length=1, max_length=128)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Addr = Annotated[str, Meta(max_length=512)]
Text = Annotated[str, Meta(max_length=65_536)]
Prompt = Annotated[str, Meta(max_length=20_000)]
Count = Annotated[int, Meta(ge=0, le=1 << 53)]
Index = Annotated[int, Meta(ge=0, le=65_535)]
# Durations and sizes: finite, non-negative (NaN fails every bound).
Seconds = Annotated[float, Meta(ge=0.0, le=1e9)]
DeviceKind = Literal["cpu", "sim", "cuda"]
ErrorCode = Annotated[str, Meta(min_length=1, max_length=64)]
StageList = Annotated[list[Stage], Meta(min_length=1, max_length=3)]
DeviceList = Annotated[list[Id], Meta(min_length=1, max_length=1024)]
Steps = Annotated[int, Meta(ge=0, le=100_000)]
# How a request's final output travels (trident/runtime/encode.py): the float32 array
# (np, the default), uint8 pixels, or an encoded file (png for images, mp4 for videos).
OutputType = Literal["np", "uint8", "png", "mp4"]
OUTPUT_TYPES: tuple[OutputType, ...] = ("np", "uint8", "png", "mp4")
# The run_task / batch member params that carry it to the decode worker (set by the
# scheduler at admission for anything but np; the worker takes them out before the stages
# see the params).
OUTPUT_TYPE_PARAM = "output_type"
OUTPUT_FPS_PARAM = "output_fps"
Fps = Annotated[int, Meta(ge=1, le=240)]
# A shared-memory segment's name (trident/runtime/shm.py NAME_RE, the same pattern: a
# file in /dev/shm, never a path); an eagerly exported output's also ends in
# ``-<seq>.<generation>`` (ShmSegment.ref), so a recycled segment is told apart.
SHM_NAME_PATTERN = r"^trident-[A-Za-z0-9_.-]{1,200}$"
ShmName = Annotated[str, Meta(pattern=SHM_NAME_PATTERN)]
ShmGenName = Annotated[
    str, Meta(max_length=256, pattern=r"^trident-[A-Za-z0-9_.-]{1,200}-[0-9]{1,20}\.[0-9]{1,20}$")
]
ShmSize = Annotated[int, Meta(ge=1, le=1 << 40)]
ShmOffsets = Annotated[list[Annotated[int, Meta(ge=0, le=1 << 40)]], Meta(max_length=256)]


class _Base(Struct, tag_field="t", omit_defaults=False):
    """Every message: a msgpack map tagged by ``"t"``."""


class TensorDesc(Struct):
    """One tensor frame's description (see :mod:`trident.runtime.serial`)."""

    name: Annotated[str, Meta(min_length=1, max_length=256)]
    dtype: Annotated[str, Meta(min_length=1, max_length=32)]
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=1 << 40)]], Meta(max_length=16)]
    lib: Literal["np", "torch"] = "np"


Tensors = Annotated[list[TensorDesc], Meta(max_length=256)]

# ---------------------------------------------------------------- client <-> scheduler


class SubmitParams(Struct, forbid_unknown_fields=True):
    """A request's parameters, named as diffusers' pipeline ``__call__`` names them.
    Wire-level bounds only (no overflow, no NaN); what a model accepts is checked
    by the registry against that model."""

    prompt: Prompt
    negative_prompt: Prompt | None = None
    height: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    width: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    num_frames: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    num_inference_steps: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0.0, le=1000.0)] | None = None
    seed: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The params the stages see: ``prompt`` always, the rest when given."""
        out: dict[str, Any] = {"prompt": self.prompt}
        for name in self.__struct_fields__[1:]:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class Submit(_Base, tag="submit"):
    id: ClientRid
    model: Name
    params: SubmitParams
    slo_s: Annotated[float, Meta(gt=0.0, le=1e7)] | None = None
    batch: bool = True
    # The result's form (encoded on the decode worker); fps: mp4's frame rate (default:
    # the family's). A model that cannot give it is refused at admission.
    output_type: OutputType = "np"
    fps: Fps | None = None


class Cancel(_Base, tag="cancel"):
    id: ClientRid


class Ping(_Base, tag="ping"):
    """Also the client's heartbeat while it has requests in flight: ``inflight`` lists
    their ids, and the scheduler answers an ``error`` (``unavailable``) for each one it
    does not hold (it restarted without it), so no request waits for nothing."""

    nonce: Count | None = None
    inflight: Annotated[list[ClientRid], Meta(max_length=10_000)] = []


class Pong(_Base, tag="pong"):
    models: dict[str, dict[str, Any]]
    devices: list[str] = []
    nodes: list[str] = []
    nonce: int | None = None
    # Every served model has a live device, and the scheduler's loops are healthy.
    ready: bool = False
    heartbeat_s: float = 1.0
    # Models no live device can serve now (new requests for them fail "unavailable").
    unavailable: list[str] = []


class OutputInfo(Struct):
    """What a final ``output`` tensor holds when it is not the float32 array: ``type``
    uint8 (the pixels) or png / mp4 (the file's bytes as a 1-D uint8 tensor); ``shape``
    the decoded array's shape, ``seconds`` the encoding's time on the worker."""

    type: OutputType
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=1 << 40)]], Meta(max_length=16)]
    seconds: Seconds = 0.0


class Result(_Base, tag="result"):
    id: ClientRid
    timings: dict[str, float]
    devices: dict[str, list[str]]
    tensors: Tensors
    met_slo: bool | None = None
    slo_s: float | None = None
    output: OutputInfo | None = None  # None: ``output`` is decode's float32 array (np)


class Progress(_Base, tag="progress"):
    """A running request's progress: ``step`` of ``total`` denoising steps of its
    ``stage`` done (forwarded from the worker's ``task_progress``). Advisory: throttled
    at the worker and dropped, never queued, when a queue on the way is full."""

    id: ClientRid
    stage: Stage
    step: Steps
    total: Annotated[int, Meta(ge=1, le=100_000)]


class Error(_Base, tag="error"):
    """A reply about something that could not be done or understood. ``id`` names
    the request it concerns when there is one (the client matches on it)."""

    code: ErrorCode
    message: Text
    id: str | None = None
    nonce: int | None = None  # the ping this answers (``unknown_request`` replies)


class StatusQuery(_Base, tag="status_query"):
    """Ask for a :class:`ClusterStatus` (``trident status``); ``nonce`` is echoed."""

    nonce: Count | None = None


class ResidentStage(Struct):
    model: Name
    stage: Stage


class RunningTask(Struct):
    """A task the scheduler sent to a device and that has not ended; ``started`` once
    the worker said so (before that it waits in the worker's queue)."""

    task_id: Id
    request_id: Id
    model: Name
    stages: StageList
    started: bool = False


class DeviceStatus(Struct):
    device_id: Id
    node_id: Name
    kind: DeviceKind
    up: bool
    memory_bytes: Count
    resident: Annotated[list[ResidentStage], Meta(max_length=1024)] = []
    resident_bytes: Count = 0  # weight bytes of the resident stages (the planner's sizes)
    running: Annotated[list[RunningTask], Meta(max_length=4096)] = []
    busy_s: Seconds = 0.0  # seconds of stage work done since the scheduler started


class NodeStatus(Struct):
    node_id: Name
    up: bool
    devices: Annotated[list[Id], Meta(max_length=4096)] = []


class ModelStatus(Struct):
    """One served model: requests waiting for a stage (``queued``) and with a stage on
    a device (``running``); SLO outcomes of its requests finished in the last
    ``ClusterStatus.slo_window_s`` seconds."""

    name: Name
    queued: Count = 0
    running: Count = 0
    available: bool = True
    recent_finished: Count = 0
    recent_on_time: Count = 0


class ClusterStatus(_Base, tag="cluster_status"):
    """The live cluster as the scheduler sees it (a snapshot, at most a moment old)."""

    nodes: Annotated[list[NodeStatus], Meta(max_length=4096)]
    devices: Annotated[list[DeviceStatus], Meta(max_length=65_536)]
    models: Annotated[list[ModelStatus], Meta(max_length=4096)]
    policy: Annotated[str, Meta(max_length=256)] = ""
    uptime_s: Seconds = 0.0
    ready: bool = False
    slo_window_s: Seconds = 0.0
    nonce: int | None = None


# ---------------------------------------------------------------- node <-> scheduler


class NodeDevice(Struct):
    index: Index
    kind: DeviceKind
    memory_bytes: Count
    speed: Annotated[float, Meta(gt=0.0, le=1000.0)] = 1.0


class NodeHello(_Base, tag="node_hello"):
    version: int
    node_id: Name
    devices: Annotated[list[NodeDevice], Meta(max_length=1024)]
    host: Addr = ""


class ModelRef(Struct):
    family: Name
    path: Addr | None = None
    dtype: Name = "auto"  # float32, bfloat16, float16; auto: bfloat16 on cuda, float32 on cpu


class NodeWelcome(_Base, tag="node_welcome"):
    models: dict[str, ModelRef]
    heartbeat_s: float


class WorkerStatus(Struct):
    pid: int | None = None
    alive: bool = False
    restarts: Count = 0


class NodeHeartbeat(_Base, tag="node_heartbeat"):
    node_id: Name
    workers: dict[str, WorkerStatus] = {}


class WorkerExited(_Base, tag="worker_exited"):
    node_id: Name
    index: Index
    exitcode: int | None
    restarts: Count = 0
    device_id: Id | None = None


class NodeBye(_Base, tag="node_bye"):
    node_id: Name


class KillWorker(_Base, tag="kill_worker"):
    """The scheduler declared this worker lost (silent): kill and restart it."""

    index: Index
    reason: Text = ""


class Reject(_Base, tag="reject"):
    reason: Text


class Reregister(_Base, tag="reregister"):
    pass


class Shutdown(_Base, tag="shutdown"):
    pass


# ---------------------------------------------------------------- worker <-> scheduler


class WorkerHello(_Base, tag="worker_hello"):
    version: int
    device_id: Id
    node_id: Name
    index: Index
    kind: DeviceKind
    memory_bytes: Count
    peer_addr: Addr
    pid: int | None = None
    speed: Annotated[float, Meta(gt=0.0, le=1000.0)] = 1.0
    store_addr: Addr | None = None


class WorkerWelcome(_Base, tag="worker_welcome"):
    models: dict[str, ModelRef]
    heartbeat_s: float


class Heartbeat(_Base, tag="heartbeat"):
    queued: Count = 0


class ShmOutput(Struct):
    """A kept stage output its worker already wrote into one of its shared-memory
    segments when the task finished (docs/runtime.md, "Same-node hand-off"): what a
    consumer on the holder's node needs to attach it with no fetch (trident/runtime/shm.py
    ``attach``). ``name`` carries the segment's generation: a recycled segment no
    longer matches, and the consumer falls back to a fetch."""

    name: ShmGenName
    size: ShmSize
    offsets: ShmOffsets
    tensors: Tensors

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.tensors):
            raise ValueError(f"{len(self.tensors)} tensors described, {len(self.offsets)} offsets")
        if any(off > self.size for off in self.offsets):
            raise ValueError(f"an offset lies past the segment's {self.size} bytes")


class InputAddr(Struct):
    """A kept stage output and the peer address of the worker keeping it; ``shm``: the
    holder exported it into shared memory (a consumer on its node may attach it)."""

    key: Id
    device_id: Id
    addr: Addr
    shm: ShmOutput | None = None


class GroupSpec(Struct):
    """A degree-k instance's process group: rendezvous store and member devices."""

    key: Id
    rendezvous: Addr | None
    devices: DeviceList


class RunTask(_Base, tag="run_task"):
    task_id: Id
    request_id: Id
    model: Name
    stages: StageList
    devices: DeviceList
    rank: Index
    inputs: Annotated[list[InputAddr], Meta(max_length=16)]
    final: bool
    params: dict[str, Any]
    options: dict[str, Any] = {}
    leader_addr: Addr | None = None
    group: GroupSpec | None = None


class BatchMember(Struct):
    """One request's task riding in a ``run_batch``."""

    task_id: Id
    request_id: Id
    inputs: Annotated[list[InputAddr], Meta(max_length=16)]
    final: bool
    params: dict[str, Any]


class RunBatch(_Base, tag="run_batch"):
    """Several requests' tasks of the same model, stages and devices as one call;
    the worker reports started / finished / failed per member task id."""

    batch_id: Id
    model: Name
    stages: StageList
    devices: DeviceList
    rank: Index
    members: Annotated[list[BatchMember], Meta(min_length=1, max_length=1024)]
    options: dict[str, Any] = {}
    leader_addr: Addr | None = None
    group: GroupSpec | None = None


class CancelTask(_Base, tag="cancel_task"):
    """Drop the task if queued; stop it at its next denoising step if running."""

    task_id: Id


class YieldTask(_Base, tag="yield_task"):
    """Pause the running task's diffuse at its next denoising step boundary: it then
    finishes with ``steps_done`` and keeps the chunk state as its output (the stages
    after diffuse do not run). Ignored for a queued, unknown or batched task, and by a
    task past its diffuse (it finishes as usual)."""

    task_id: Id


class TaskStarted(_Base, tag="task_started"):
    task_id: Id


class TaskProgress(_Base, tag="task_progress"):
    """Rank 0 of a running task finished denoising step ``step`` of ``total`` (sent at
    most every 0.5 s, and at the last step; dropped rather than waited for)."""

    task_id: Id
    step: Steps
    total: Annotated[int, Meta(ge=1, le=100_000)]


class TaskFinished(_Base, tag="task_finished"):
    task_id: Id
    stage_seconds: dict[str, Seconds]
    transfer_seconds: Seconds = 0.0
    load_seconds: Seconds = 0.0
    output_bytes: Count = 0
    tensors: Tensors | None = None  # the final output (the request's result)
    output: OutputInfo | None = None  # how a final output is encoded (None: np)
    # Measured memory of the leader's device (docs/runtime.md "Memory truth"; None: not
    # measured, as on sim): peak in use while the stages ran (weights included), in use
    # after, and each stage's peak above what was in use when it started.
    peak_bytes: Count | None = None
    resident_bytes: Count | None = None
    stage_peak_bytes: dict[str, Count] | None = None
    # Set: the diffuse paused after this many of the request's denoising steps (a yield,
    # or a chunk ending before the last step); the kept output is its chunk state and
    # the task's stages after diffuse did not run (nothing rides with a final task).
    steps_done: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    # A kept (not final) output already in the worker's shared-memory segment (eager
    # export; None: shm off or the segment could not be made). The scheduler passes it
    # on in the consumer's InputAddr.shm.
    kept_shm: ShmOutput | None = None


class TaskFailed(_Base, tag="task_failed"):
    task_id: Id
    error: ErrorCode
    message: Text
    retryable: bool
    stage: Stage | None = None  # which of a merged task's stages raised, when known


class Release(_Base, tag="release"):
    key: Id


class LoadStage(_Base, tag="load_stage"):
    model: Name
    stage: Stage
    source: Annotated[str, Meta(max_length=32)] = "disk"


class UnloadStage(_Base, tag="unload_stage"):
    model: Name
    stage: Stage


class StageLoaded(_Base, tag="stage_loaded"):
    model: Name
    stage: Stage
    seconds: Seconds
    source: Annotated[str, Meta(max_length=32)]


class StageUnloaded(_Base, tag="stage_unloaded"):
    model: Name
    stage: Stage


class StageLoadFailed(_Base, tag="stage_load_failed"):
    model: Name
    stage: Stage
    message: Text


# ---------------------------------------------------------------- worker <-> worker


class Fetch(_Base, tag="fetch"):
    key: Id
    rid: Id
    # The fetcher runs on the holder's node: a shared-memory reply is welcome.
    shm: bool = False


class ShmRef(Struct):
    """A kept output in a same-node shared-memory segment (trident/runtime/shm.py)."""

    name: ShmName
    size: ShmSize
    offsets: ShmOffsets


class Data(_Base, tag="data"):
    key: Id
    rid: Id
    tensors: Tensors
    # Set: the tensors lie in this segment at these offsets, and no frames follow.
    shm: ShmRef | None = None


class Missing(_Base, tag="missing"):
    key: Id
    rid: Id


class Barrier(_Base, tag="barrier"):
    task_id: Id
    rank: Index


class Go(_Base, tag="go"):
    task_id: Id


Message: TypeAlias = (
    Submit | Cancel | Ping | Pong | Result | Error | Progress | StatusQuery | ClusterStatus
    | NodeHello | NodeWelcome | NodeHeartbeat | WorkerExited | NodeBye | KillWorker
    | Reject | Reregister | Shutdown
    | WorkerHello | WorkerWelcome | Heartbeat | RunTask | RunBatch | CancelTask | YieldTask
    | TaskStarted | TaskProgress | TaskFinished | TaskFailed | Release | LoadStage | UnloadStage
    | StageLoaded | StageUnloaded | StageLoadFailed
    | Fetch | Data | Missing | Barrier | Go
)  # fmt: skip


class Channel:
    """What one socket may receive: a name (for logs) and a decoder of its union."""

    def __init__(self, name: str, types: tuple[type[_Base], ...]) -> None:
        self.name = name
        self.types = types
        self.tags = frozenset(str(t.__struct_config__.tag) for t in types)
        union: Any = types[0] if len(types) == 1 else _union(types)
        self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(union)

    def __repr__(self) -> str:
        return f"Channel({self.name})"


def _union(types: tuple[type[_Base], ...]) -> Any:
    from functools import reduce
    from operator import or_

    return reduce(or_, types)


CLIENT_TO_SCHEDULER = Channel("client", (Submit, Cancel, Ping, StatusQuery))
SCHEDULER_TO_CLIENT = Channel("client-reply", (Result, Error, Pong, Progress, ClusterStatus))
CLUSTER_TO_SCHEDULER = Channel(
    "cluster",
    (
        NodeHello, NodeHeartbeat, WorkerExited, NodeBye,
        WorkerHello, Heartbeat, TaskStarted, TaskProgress, TaskFinished, TaskFailed,
        StageLoaded, StageUnloaded, StageLoadFailed,
    ),
)  # fmt: skip
SCHEDULER_TO_NODE = Channel("node", (NodeWelcome, Reject, Reregister, Shutdown, KillWorker, Error))
SCHEDULER_TO_WORKER = Channel(
    "worker",
    (
        WorkerWelcome, Reject, Reregister, RunTask, RunBatch, CancelTask, YieldTask,
        Release, LoadStage, UnloadStage, Shutdown, Error,
    ),
)  # fmt: skip
PEER_REQUEST = Channel("peer", (Fetch, Barrier))
PEER_REPLY = Channel("peer-reply", (Data, Missing, Go, Error))

_encoder = msgspec.msgpack.Encoder()


def message_types() -> tuple[type[_Base], ...]:
    """Every message type (for fuzzing and docs)."""
    return tuple(Message.__args__)  # type: ignore[attr-defined]


def encode(msg: Message) -> bytes:
    """The msgpack header of ``msg``."""
    return _encoder.encode(msg)


def error_message(
    code: str, message: str, id: str | None = None, nonce: int | None = None
) -> bytes:
    return _encoder.encode(Error(code=code, message=message[:65_536], id=id, nonce=nonce))


def _readable_id(raw: bytes) -> str | None:
    """The ``id`` of a message that failed validation, when it has a readable one (so
    the error reply reaches the request it concerns, not every request in flight)."""
    try:
        loose = msgspec.msgpack.decode(raw)
    except Exception:
        return None
    if isinstance(loose, dict):
        rid = loose.get("id")
        if isinstance(rid, str) and 0 < len(rid) <= 128:
            return rid
    return None


def decode(frames: Sequence[Any], channel: Channel) -> tuple[Any, list[Any]]:
    """Split a received multipart into (message, tensor frames) and validate both.

    Raises :class:`ProtocolError` (with ``request_id`` when one could be read) for
    anything that is not a well-formed message this channel may carry.
    """
    if not frames:
        raise ProtocolError("empty message")
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        msg = channel.decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"{channel.name}: {exc}", request_id=_readable_id(raw)) from None
    except Exception as exc:  # msgspec is strict, but never let decoding crash a loop
        raise ProtocolError(f"{channel.name}: undecodable header ({type(exc).__name__})") from None
    rest = list(frames[1:])
    described = getattr(msg, "tensors", None)
    if getattr(msg, "shm", None) is not None:  # a data reply pointing at shared memory
        described = []
    if described is not None:
        if len(described) != len(rest):
            raise ProtocolError(
                f"{msg.__struct_config__.tag}: {len(described)} tensors described, "
                f"{len(rest)} frames attached",
                request_id=getattr(msg, "id", None),
            )
    elif rest:
        raise ProtocolError(
            f"{msg.__struct_config__.tag}: {len(rest)} unexpected frames",
            request_id=getattr(msg, "id", None),
        )
    return msg, rest
