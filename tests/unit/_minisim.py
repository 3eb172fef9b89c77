"""A tiny discrete-event loop for policy tests: runs RunTask commands for their cost."""

from __future__ import annotations

import heapq
import itertools

from trident.sched.types import (
    Command,
    CompleteRequest,
    CostModel,
    DeviceInfo,
    Event,
    FailRequest,
    LoadStage,
    ModelInfo,
    NodeJoined,
    Policy,
    RequestArrived,
    RequestSpec,
    RunTask,
    Shape,
    StageLoaded,
    TaskFinished,
    TaskStarted,
)

GB = 10**9


def devices(nodes: int, per_node: int, memory: int = 48 * GB) -> list[DeviceInfo]:
    return [
        DeviceInfo(f"n{n}/sim:{i}", f"n{n}", "sim", i, memory)
        for n in range(nodes)
        for i in range(per_node)
    ]


def models(*names: str) -> dict[str, ModelInfo]:
    video = {"wan", "cogvideox", "hunyuanvideo"}
    return {m: ModelInfo(m, m, is_video=m in video) for m in names}


class MiniSim:
    """Each device runs its tasks FIFO; a task starts when all its devices are free."""

    def __init__(
        self, policy: Policy, cost: CostModel, families: dict[str, str] | None = None
    ) -> None:
        self.policy = policy
        self.cost = cost
        self.families = families or {}  # model -> family (default: the model's name)
        self.now = 0.0
        self.q: list[tuple[float, int, Event]] = []
        self.seq = itertools.count()
        self.free: dict[str, float] = {}
        self.loads: list[LoadStage] = []
        self.tasks: list[RunTask] = []
        self.done: list[CompleteRequest] = []
        self.failed: list[FailRequest] = []
        self.busy: dict[str, list[tuple[float, float]]] = {}

    def push(self, t: float, ev: Event) -> None:
        heapq.heappush(self.q, (t, next(self.seq), ev))

    def run(self, until: float = 1e9) -> None:
        while self.q:
            t, _, ev = heapq.heappop(self.q)
            if t > until:
                break
            self.now = t
            for cmd in self.policy.handle(ev, t):
                self.execute(cmd)

    def execute(self, cmd: Command) -> None:
        if isinstance(cmd, LoadStage):
            self.loads.append(cmd)
            self.push(self.now, StageLoaded(cmd.device_id, cmd.model, cmd.stage))
        elif isinstance(cmd, RunTask):
            self.tasks.append(cmd)
            fam = self.families.get(cmd.model, cmd.model)
            shape = _shape(cmd)
            secs: dict[str, float] = {
                s: self.cost.stage_seconds(fam, s, shape, cmd.degree if s == "diffuse" else 1)
                for s in cmd.stages
            }
            start = max([self.now] + [self.free.get(d, 0.0) for d in cmd.devices])
            end = start + sum(secs.values())
            for d in cmd.devices:
                self.free[d] = end
                self.busy.setdefault(d, []).append((start, end))
            self.push(start, TaskStarted(cmd.task_id))
            self.push(end, TaskFinished(cmd.task_id, stage_seconds=secs))
        elif isinstance(cmd, CompleteRequest):
            self.done.append(cmd)
        elif isinstance(cmd, FailRequest):
            self.failed.append(cmd)


def _shape(cmd: RunTask) -> Shape:
    p = cmd.params
    h, w, f, n = (int(str(p[k])) for k in ("height", "width", "num_frames", "num_inference_steps"))
    return Shape(h, w, f, n)


def join(sim: MiniSim, devs: list[DeviceInfo]) -> None:
    by_node: dict[str, list[DeviceInfo]] = {}
    for d in devs:
        by_node.setdefault(d.node_id, []).append(d)
    for n, ds in by_node.items():
        sim.push(0.0, NodeJoined(n, tuple(ds)))


def arrive(sim: MiniSim, spec: RequestSpec) -> None:
    sim.push(spec.arrival, RequestArrived(spec))
