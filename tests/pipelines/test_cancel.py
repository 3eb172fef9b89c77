"""A real (tiny) diffuse stops at the next denoising step once its cancel flag is set,
and an unset flag leaves every output bit-identical."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.pipelines.conftest import STEPS, TEST_SHAPES
from trident.pipelines import StageCancelled, open_pipeline
from trident.pipelines.families.base import STAGES
from trident.runtime.devices import TaskCancelled, TaskResult, TorchExecutor

pytestmark = pytest.mark.timeout(120)

FAMILIES = ["flux", "sd3", "wan", "cogvideox", "hunyuanvideo"]
MANY = 50  # steps asked for; a cancelled run must stop far sooner
CANCEL_AT = 3  # steps done when the flag is set


def _params(family: str, steps: int, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": "a red fox",
        "seed": 3,
        "num_inference_steps": steps,
        **TEST_SHAPES[family],
        **extra,
    }


class StepCounter:
    """Wraps a diffusers scheduler's ``step``: counts steps; sets ``cancel`` after
    ``cancel_at`` of them (when given); ``reached`` is set once ``wait_for`` are done."""

    def __init__(
        self,
        scheduler: Any,
        cancel: threading.Event | None = None,
        cancel_at: int | None = None,
        wait_for: int = 0,
    ) -> None:
        self.count = 0
        self.cancel = cancel
        self.cancel_at = cancel_at
        self.wait_for = wait_for
        self.reached = threading.Event()
        self._scheduler = scheduler
        self._step = scheduler.step
        scheduler.step = self  # instance attribute shadows the method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._step(*args, **kwargs)
        self.count += 1
        if self.cancel is not None and self.count == self.cancel_at:
            self.cancel.set()
        if self.count >= self.wait_for:
            self.reached.set()
        return out

    def remove(self) -> None:
        del self._scheduler.step


def _diffuse_pipe(stages: Any) -> Any:
    stages.load("diffuse")
    return stages._pipe("diffuse")


@pytest.mark.parametrize("family", FAMILIES)
def test_diffuse_stops_at_the_next_step(tiny_model_dir: Callable[[str], Path], family: str) -> None:
    stages = open_pipeline(tiny_model_dir(family))
    params = _params(family, MANY)
    emb = stages.run("encode", {}, params)
    cancel = threading.Event()
    counter = StepCounter(_diffuse_pipe(stages).scheduler, cancel, CANCEL_AT)
    try:
        with pytest.raises(StageCancelled, match=f"after denoising step {CANCEL_AT}"):
            stages.run("diffuse", emb, params, cancel=cancel)
    finally:
        counter.remove()
    # The flag is seen at the end of the step that set it: not one step more.
    assert counter.count == CANCEL_AT


@pytest.mark.parametrize("family", FAMILIES)
def test_unset_flag_keeps_outputs_bit_identical(
    tiny_model_dir: Callable[[str], Path], family: str
) -> None:
    stages = open_pipeline(tiny_model_dir(family))
    params = _params(family, STEPS, negative_prompt="blurry")
    emb = stages.run("encode", {}, params)
    assert all(
        torch.equal(v, stages.run("encode", {}, params, cancel=threading.Event())[k])
        for k, v in emb.items()
    )
    plain = stages.run("diffuse", emb, params)
    flagged = stages.run("diffuse", emb, params, cancel=threading.Event())
    assert set(plain) == set(flagged)
    assert all(torch.equal(plain[k], flagged[k]) for k in plain)
    img = stages.run("decode", plain, params)["output"]
    assert torch.equal(
        img, stages.run("decode", flagged, params, cancel=threading.Event())["output"]
    )


def test_flag_set_before_a_stage_stops_it_before_it_starts(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    stages = open_pipeline(tiny_model_dir("flux"))
    params = _params("flux", STEPS)
    lat = stages.run("diffuse", stages.run("encode", {}, params), params)
    cancel = threading.Event()
    cancel.set()
    for stage, inputs in (("encode", {}), ("diffuse", {}), ("decode", lat)):
        with pytest.raises(StageCancelled, match=f"before {stage}"):
            stages.run(stage, inputs, params, cancel=cancel)  # type: ignore[arg-type]


def test_batched_diffuse_stops_at_the_next_step(tiny_model_dir: Callable[[str], Path]) -> None:
    stages = open_pipeline(tiny_model_dir("flux"))
    params = [_params("flux", MANY, prompt=p, seed=i) for i, p in enumerate(("a fox", "a cat"))]
    embs = [stages.run("encode", {}, p) for p in params]
    cancel = threading.Event()
    counter = StepCounter(_diffuse_pipe(stages).scheduler, cancel, CANCEL_AT)
    try:
        with pytest.raises(StageCancelled):
            stages.run_batch("diffuse", embs, params, cancel=cancel)
    finally:
        counter.remove()
    assert counter.count == CANCEL_AT


def _executor(tiny_model_dir: Callable[[str], Path], family: str = "flux") -> TorchExecutor:
    return TorchExecutor({"m": {"family": family, "path": str(tiny_model_dir(family))}}, "cpu")


def test_executor_cancel_from_another_thread(tiny_model_dir: Callable[[str], Path]) -> None:
    """As the worker does it: the flag is set from another thread while the executor
    computes; the call raises TaskCancelled long before its 50 steps are done, with the
    stages it loaded and finished in ``partial``."""
    ex = _executor(tiny_model_dir)
    for stage in STAGES:
        ex.load("m", stage)
    counter = StepCounter(ex._pipe("m")._pipe("diffuse").scheduler, wait_for=2)
    cancel = threading.Event()

    def canceller() -> None:
        if counter.reached.wait(60):
            cancel.set()

    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    try:
        with pytest.raises(TaskCancelled) as info:
            ex.run("m", STAGES, None, _params("flux", MANY), {}, cancel=cancel)
    finally:
        cancel.set()  # the thread ends in any case
        thread.join(5)
        counter.remove()
    assert 2 <= counter.count < MANY // 2, counter.count
    partial = info.value.partial
    assert isinstance(partial, TaskResult) and set(partial.stage_seconds) == {"encode"}
    assert isinstance(info.value.__cause__, StageCancelled)


def test_executor_unset_flag_keeps_outputs_bit_identical(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    ex = _executor(tiny_model_dir, "sd3")
    params = _params("sd3", STEPS, negative_prompt="blurry", guidance_scale=5.0)
    plain = ex.run("m", STAGES, None, params, {})
    flagged = ex.run("m", STAGES, None, params, {}, cancel=threading.Event())
    assert torch.equal(plain.outputs["output"], flagged.outputs["output"])
    assert [m for m, *_ in flagged.loaded] == []  # resident after the first call


def test_executor_batch_cancel_stops_the_whole_call(tiny_model_dir: Callable[[str], Path]) -> None:
    ex = _executor(tiny_model_dir)
    params: list[Mapping[str, Any]] = [
        _params("flux", MANY, prompt=p, seed=i) for i, p in enumerate(("a fox", "a cat"))
    ]
    ex.load("m", "diffuse")
    cancel = threading.Event()
    counter = StepCounter(ex._pipe("m")._pipe("diffuse").scheduler, cancel, CANCEL_AT)
    try:
        with pytest.raises(TaskCancelled):
            ex.run_batch("m", STAGES, [None, None], params, {}, cancel=cancel)
    finally:
        counter.remove()
    # one batched diffuse, stopped: not a member-by-member retry of it
    assert counter.count == CANCEL_AT
    again: list[Mapping[str, Any]] = [_params("flux", STEPS, seed=i) for i in range(2)]
    ok = ex.run_batch("m", STAGES, [None, None], again, {}, cancel=threading.Event())
    assert all(isinstance(r, TaskResult) and "output" in r.outputs for r in ok)
