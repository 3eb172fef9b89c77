"""A failure inside a merged task names the stage that raised, not the task's first
stage: the executor marks the exception, the worker reports the stage, the core says
"diffuse failed" for a diffuse traceback in an encode+diffuse+decode task."""

from __future__ import annotations

from typing import Any

import pytest

from trident.runtime.devices import TorchExecutor
from trident.sched.core import CoreConfig, FifoPolicy
from trident.sched.types import (
    DeviceInfo,
    FailRequest,
    ModelInfo,
    NodeJoined,
    RequestArrived,
    RequestSpec,
    RunTask,
    Shape,
    TaskFailed,
)

pytestmark = pytest.mark.timeout(30)


class DiffuseBreaks:
    """A pipeline adapter whose diffuse stage raises (as wan's rope table did)."""

    def loaded(self) -> set[str]:
        return {"encode", "diffuse", "decode"}

    def run(self, stage: str, inputs: Any, params: Any, options: Any, parallel: Any) -> Any:
        if stage == "diffuse":
            raise RuntimeError("shape '[41, 1, 1, -1]' is invalid for input of size 128")
        return {"x": 1}


def test_the_executor_marks_the_stage_that_raised() -> None:
    ex = TorchExecutor({"m": {"family": "flux", "path": "/nonexistent"}}, device="cpu")
    ex.pipes["m"] = DiffuseBreaks()
    with pytest.raises(RuntimeError) as info:
        ex.run("m", ("encode", "diffuse", "decode"), {}, {}, {})
    assert info.value.failed_stage == "diffuse"  # type: ignore[attr-defined]


def test_the_core_names_the_reported_stage() -> None:
    core = FifoPolicy({"m": ModelInfo("m", "flux")}, config=CoreConfig(preload=False))
    core.handle(NodeJoined("n", (DeviceInfo("n/sim:0", "n", "sim", 0, 80 << 30),)), 0.0)
    spec = RequestSpec("r", "m", Shape(64, 64, 1, 2), arrival=0.0, params={"prompt": "x"})
    [run] = [c for c in core.handle(RequestArrived(spec), 0.0) if isinstance(c, RunTask)]
    merged = RunTask(run.task_id, "r", "m", ("encode", "diffuse", "decode"), run.devices)
    core.tasks[run.task_id].cmd = merged  # as a placed policy would merge them
    out = core.handle(TaskFailed(run.task_id, "stage_failed", "boom", stage="diffuse"), 1.0)
    [fail] = [c for c in out if isinstance(c, FailRequest)]
    assert fail.message.startswith("diffuse failed on n/sim:0")
