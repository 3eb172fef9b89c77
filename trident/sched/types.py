"""The vocabulary of the sans-IO scheduler core: requests, devices, events, commands.

The scheduler core is driven only through ``Policy.handle(event, now) -> list[Command]``.
The runtime daemon feeds it real events (from sockets) and executes the commands; the
simulator feeds it virtual events and executes the commands on virtual time. Nothing in
this module touches sockets, asyncio or the wall clock.

Conventions:
- Device ids are strings ``"<node_id>/<kind>:<index>"`` (e.g. ``"n0/sim:3"``).
- A *task* is one or more consecutive stages of one request run on one instance
  (``devices``, leader first, at degree ``len(devices)``). Its output is kept on the
  leader under the key ``task_id`` until the core sends ``ReleaseOutput``.
- Times are seconds on the caller's clock (``now``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

# The stage names are a family fact; re-exported here as the core's vocabulary.
from trident.families import STAGES, Stage

__all__ = [
    "DTYPE_BYTES",
    "STAGES",
    "CancelTask",
    "Command",
    "CompleteRequest",
    "CostModel",
    "DeviceInfo",
    "DeviceKind",
    "DeviceLost",
    "DeviceUp",
    "ErrorCode",
    "Event",
    "FailRequest",
    "InputRef",
    "LoadStage",
    "LogEvent",
    "ModelInfo",
    "NodeJoined",
    "NodeLost",
    "Policy",
    "ReleaseOutput",
    "RequestArrived",
    "RequestCancelled",
    "RequestSpec",
    "RunBatch",
    "RunTask",
    "Shape",
    "Stage",
    "StageLoaded",
    "StageUnloaded",
    "TaskFailed",
    "TaskFinished",
    "TaskStarted",
    "Tick",
    "UnloadStage",
    "YieldTask",
    "new_stimulus_id",
]


# The dtypes a model can be served in, and bytes per element of each (weights and
# activations). The cost model's built-in figures are for bfloat16.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DeviceKind: TypeAlias = Literal["cpu", "sim", "cuda"]

# Error codes carried by FailRequest / TaskFailed; the client maps them onto the
# exception tree in trident.errors.
ErrorCode: TypeAlias = Literal[
    "unknown_model",
    "invalid_request",
    "overloaded",
    "stage_failed",
    "timeout",
    "cancelled",
    "out_of_memory",
    "unavailable",
    "internal",
]

_stimulus_counter = itertools.count()


def new_stimulus_id(prefix: str = "ev") -> str:
    """A process-unique id for an event (for logs and tracing)."""
    return f"{prefix}-{next(_stimulus_counter)}"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Shape:
    """What a request asks of the model, as far as cost and memory are concerned."""

    height: int
    width: int
    num_frames: int = 1  # 1 for images
    num_inference_steps: int = 28
    cfg: bool = False  # classifier-free guidance doubles the diffuse batch
    # The policy keys many per-round dicts by shape (tens of millions of lookups in an
    # overloaded simulated run): hash the fields once, not at every lookup.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_hash",
            hash((self.height, self.width, self.num_frames, self.num_inference_steps, self.cfg)),
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def pixels(self) -> int:
        """height * width * frames: the size the cost model interpolates in."""
        return self.height * self.width * self.num_frames


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """A request as the scheduler core sees it.

    ``params`` carries everything the stages need but the core does not look at
    (prompt, negative prompt, seed, guidance scale...), passed through to RunTask.
    """

    request_id: str
    model: str  # served model name
    shape: Shape
    arrival: float
    slo_s: float | None = None  # explicit latency budget; default slo_scale x standalone
    params: Mapping[str, object] = field(default_factory=dict)
    # May share a batched diffuse call with other same-shape requests. Batched outputs
    # match unbatched ones within 1e-4, not bit for bit (docs/planner.md "Batching").
    batchable: bool = True


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served pipeline."""

    name: str  # served name, e.g. "flux" or "my-flux-dev"
    family: str  # flux, sd3, wan, cogvideox, hunyuanvideo
    path: str | None = None  # local diffusers directory; None for simulated-only models
    is_video: bool = False
    # Weight bytes per stage on the device, at ``dtype`` (for a model directory: its
    # files' bytes with the floating-point tensors at ``dtype``); used for placement.
    stage_weight_bytes: Mapping[str, int] = field(default_factory=dict)
    # Families whose diffuse stage can run at degree > 1 (context parallel or CFG).
    max_degree: int = 8
    # The dtype the planner sizes this model's weights with (a key of DTYPE_BYTES):
    # the configured one, or bfloat16 for "auto" (what cuda and sim devices run).
    dtype: str = "bfloat16"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device (GPU, CPU slot or simulated GPU) on a node."""

    device_id: str
    node_id: str
    kind: DeviceKind
    index: int  # position within its node: degree-k groups are aligned on it
    memory_bytes: int
    speed: float = 1.0  # relative compute speed (1.0 = profile's reference device)


@dataclass(frozen=True, slots=True)
class InputRef:
    """A stage output kept on a device under ``key`` (the producing task's id)."""

    key: str
    device_id: str


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class NodeJoined:
    node_id: str
    devices: tuple[DeviceInfo, ...]
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class NodeBooting:
    """A node said hello with ``expected`` devices whose workers are still starting. The
    core holds their ``DeviceUp`` s back and takes them as one ``NodeJoined`` once all
    are up or ``CoreConfig.join_grace_s`` has passed (so a booting node is planned once,
    not once per worker hello)."""

    node_id: str
    expected: int
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class NodeLost:
    node_id: str
    reason: str = ""
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class DeviceUp:
    """A device's worker is ready (first start or after a restart); it holds no stages."""

    device: DeviceInfo
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class DeviceLost:
    """A device's worker died or went silent; its queued tasks and kept outputs are gone."""

    device_id: str
    reason: str = ""
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class RequestArrived:
    request: RequestSpec
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    request_id: str
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """The instance began computing the task (inputs received, stages loaded)."""

    task_id: str
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class TaskFinished:
    task_id: str
    stage_seconds: Mapping[str, float] = field(default_factory=dict)  # per stage run
    transfer_seconds: float = 0.0  # fetching inputs from peers
    load_seconds: float = 0.0  # loading stage weights on demand
    output_bytes: int = 0
    stimulus_id: str = ""
    # A diffuse that stopped before its last step (a yield, or a chunk that ends
    # early): the steps of the request done so far; its output is the chunk state
    # (trident.pipelines.chunks). None: every stage of the task ran to the end.
    steps_done: int | None = None


@dataclass(frozen=True, slots=True)
class TaskFailed:
    task_id: str
    error: ErrorCode = "stage_failed"
    message: str = ""
    # True when the failure is the device's, not the request's (a re-run may succeed).
    retryable: bool = False
    stimulus_id: str = ""
    # The stage that raised, when the task ran several merged (None: unknown).
    stage: Stage | None = None


@dataclass(frozen=True, slots=True)
class StageLoaded:
    device_id: str
    model: str
    stage: Stage
    seconds: float = 0.0
    source: str = ""  # "peer", "node-cache", "disk"
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class StageUnloaded:
    device_id: str
    model: str
    stage: Stage
    stimulus_id: str = ""


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic wake-up: timeouts, re-planning, monitor windows."""

    stimulus_id: str = ""


Event: TypeAlias = (
    NodeJoined
    | NodeBooting
    | NodeLost
    | DeviceUp
    | DeviceLost
    | RequestArrived
    | RequestCancelled
    | TaskStarted
    | TaskFinished
    | TaskFailed
    | StageLoaded
    | StageUnloaded
    | Tick
)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class RunTask:
    """Run ``stages`` (consecutive, merged into one call) of a request on ``devices``.

    All devices of the instance receive the task; the leader (``devices[0]``) fetches
    ``inputs`` from the devices holding them and keeps the output under ``task_id``.
    When ``final`` the leader sends the output to the scheduler for the client instead.
    Workers run the tasks they receive first-in-first-out, in the order sent.
    """

    task_id: str
    request_id: str
    model: str
    stages: tuple[Stage, ...]
    devices: tuple[str, ...]
    inputs: tuple[InputRef, ...] = ()
    final: bool = False
    params: Mapping[str, object] = field(default_factory=dict)  # request params
    options: Mapping[str, object] = field(default_factory=dict)  # e.g. {"vae_tiling": True}
    # Where each device loads each stage's weights it lacks (device -> stage -> source:
    # "resident", "peer", "node-cache", "disk"); filled in by the core as the command
    # leaves it (trident.sched.residency), forwarded as is by the daemon.
    load_sources: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def degree(self) -> int:
        return len(self.devices)


@dataclass(frozen=True, slots=True)
class RunBatch:
    """Run the same stages of several same-shape requests as one batched call.

    Each member is an ordinary :class:`RunTask` (its own task id, request, inputs,
    params and ``final`` flag) with the same ``model``, ``stages``, ``devices`` and
    ``options`` as the others. The instance runs the members' diffuse stage as one call
    (batch dimension = members, in order; one random generator per member) and encode
    and decode member by member. Workers report each member's TaskStarted /
    TaskFinished / TaskFailed separately and keep each member's output under its own
    task id, so the core's per-request bookkeeping is unchanged.
    """

    batch_id: str
    tasks: tuple[RunTask, ...]

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("a batch needs at least one task")
        first = self.tasks[0]
        for t in self.tasks[1:]:
            if (t.model, t.stages, t.devices) != (first.model, first.stages, first.devices):
                raise ValueError(f"batch {self.batch_id}: members differ in model/stages/devices")

    @property
    def model(self) -> str:
        return self.tasks[0].model

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.tasks[0].stages

    @property
    def devices(self) -> tuple[str, ...]:
        return self.tasks[0].devices

    @property
    def degree(self) -> int:
        return len(self.tasks[0].devices)

    @property
    def size(self) -> int:
        return len(self.tasks)


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Stop a task the client no longer wants: dropped where it is still queued, and
    stopped at its next denoising step where it runs. Its devices report it failed
    with ``cancelled``; the core then ends the request."""

    task_id: str
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class YieldTask:
    """Pause a running diffuse at its next step boundary: the leader keeps the state
    (latents, scheduler and RNG) under the task id and reports ``TaskFinished`` with
    ``steps_done``; the core resumes it later with ``options["diffuse_steps"]``, on the
    same or other devices, possibly at another degree. A task no longer in its diffuse
    (or finished) ignores it and finishes as usual."""

    task_id: str
    devices: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReleaseOutput:
    """The kept output ``key`` on ``device_id`` is no longer needed."""

    device_id: str
    key: str


@dataclass(frozen=True, slots=True)
class LoadStage:
    """Prefetch a stage's weights onto a device (optional; tasks also load on demand)."""

    device_id: str
    model: str
    stage: Stage
    source: str = ""  # filled in by the core as the command leaves it (see RunTask)


@dataclass(frozen=True, slots=True)
class UnloadStage:
    device_id: str
    model: str
    stage: Stage


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    """The request's final output (sent by its final task) goes to the client."""

    request_id: str
    timings: Mapping[str, float]  # queue, encode, diffuse, decode, transfer, load, total
    devices: Mapping[str, tuple[str, ...]]  # stage -> devices that ran it
    deadline: float | None = None
    met_slo: bool | None = None


@dataclass(frozen=True, slots=True)
class FailRequest:
    request_id: str
    error: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class LogEvent:
    """A structured log line the core wants written (e.g. which solver decided)."""

    event: str
    fields: Mapping[str, object] = field(default_factory=dict)


Command: TypeAlias = (
    RunTask
    | RunBatch
    | CancelTask
    | YieldTask
    | ReleaseOutput
    | LoadStage
    | UnloadStage
    | CompleteRequest
    | FailRequest
    | LogEvent
)


# --------------------------------------------------------------------------- interfaces


class Policy(Protocol):
    """A scheduler core. Pure: its output depends only on the events and ``now``."""

    name: str

    def handle(self, event: Event, now: float) -> list[Command]: ...


class CostModel(Protocol):
    """Latency and memory of stages; the planner's estimate and the simulator's truth."""

    def stage_seconds(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> float:
        """Seconds for one request's ``stage`` at ``degree`` on a speed-1.0 device."""
        ...

    def stage_peak_bytes(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> int:
        """Peak activation bytes per device for ``stage`` (weights excluded)."""
        ...

    def weight_bytes(self, family: str, stage: Stage) -> int: ...

    def output_bytes(self, family: str, stage: Stage, shape: Shape) -> int:
        """Bytes of the tensors ``stage`` hands to the next stage (or the client)."""
        ...

    def transfer_seconds(self, nbytes: int, same_node: bool) -> float: ...

    def load_seconds(self, family: str, stage: Stage, source: str) -> float:
        """Seconds to load a stage's weights from "peer", "node-cache" or "disk"."""
        ...
