"""Memory truth (issue #12): what a device measures of a task's memory, what a CUDA
worker says its memory is, and out-of-memory errors that free what the stage held.

No GPU here: ``torch.cuda`` is faked where the code reads it; torch's real
``OutOfMemoryError`` (constructible in a CPU build) is raised by fake stages.
"""

from __future__ import annotations

import gc
import mmap
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from trident.errors import OutOfMemoryError, StageFailedError, error_from_code
from trident.runtime import protocol
from trident.runtime.devices import (
    CudaMeter,
    MemoryMeter,
    OutOfMemory,
    RssMeter,
    TorchExecutor,
    cuda_memory,
)
from trident.runtime.memtruth import task_memory_fields
from trident.runtime.worker import _failure
from trident.sched.cost import load_cost_model
from trident.sched.types import Shape

pytestmark = pytest.mark.timeout(60)

GiB = 1 << 30


class FakeCuda:
    """torch.cuda's memory bookkeeping, driven by the fake stages below."""

    def __init__(self, free: int = 70 * GiB, total: int = 80 * GiB) -> None:
        self.allocated = 0
        self.max_allocated = 0
        self.free = free
        self.total = total
        self.resets = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.max_allocated = max(self.max_allocated, self.allocated)

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.resets += 1
        self.max_allocated = self.allocated

    def memory_allocated(self, device: Any = None) -> int:
        return self.allocated

    def max_memory_allocated(self, device: Any = None) -> int:
        return self.max_allocated

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.free, self.total

    def get_device_properties(self, device: Any = None) -> Any:
        return SimpleNamespace(total_memory=self.total)


class MeteredPipe:
    """An adapter whose stages allocate on a FakeCuda: each stage holds ``transient``
    bytes at its peak and keeps ``kept`` bytes (its output) after."""

    def __init__(self, cuda: FakeCuda, figures: dict[str, tuple[int, int]]) -> None:
        self.cuda = cuda
        self.figures = figures

    def loaded(self) -> set[str]:
        return {"encode", "diffuse", "decode"}

    def run(self, stage: str, inputs: Any, params: Any, options: Any, parallel: Any) -> Any:
        transient, kept = self.figures[stage]
        self.cuda.alloc(transient)
        self.cuda.alloc(-transient + kept)
        return {"x": stage}


def _executor(cuda: FakeCuda | None = None) -> TorchExecutor:
    ex = TorchExecutor({"m": {"family": "flux", "path": "/nonexistent"}}, device="cpu")
    if cuda is not None:
        ex.meter = CudaMeter(cuda, "cuda:0")
    return ex


def test_cuda_meter_reports_per_stage_activation_peaks_and_what_stays() -> None:
    cuda = FakeCuda()
    cuda.alloc(10 * GiB)  # resident weights
    ex = _executor(cuda)
    ex.pipes["m"] = MeteredPipe(
        cuda, {"encode": (1 * GiB, 0), "diffuse": (6 * GiB, 0), "decode": (3 * GiB, 1 * GiB)}
    )
    res = ex.run("m", ("encode", "diffuse", "decode"), {}, {}, {})
    assert res.stage_peak_bytes == {"encode": 1 * GiB, "diffuse": 6 * GiB, "decode": 3 * GiB}
    assert res.peak_bytes == 16 * GiB  # weights + diffuse's activations
    assert res.resident_bytes == 11 * GiB  # weights + decode's kept output
    assert cuda.resets == 3  # one peak window per stage


def test_a_batched_call_reports_its_peak_on_every_member() -> None:
    cuda = FakeCuda()
    cuda.alloc(2 * GiB)
    ex = _executor(cuda)

    class Batched(MeteredPipe):
        def run_batch(self, stage: str, inputs: Any, params: Any, options: Any) -> Any:
            return [
                self.run(stage, i, p, options, None) for i, p in zip(inputs, params, strict=True)
            ]

    ex.pipes["m"] = Batched(cuda, {"diffuse": (5 * GiB, 0)})
    out = ex.run_batch("m", ("diffuse",), [{}, {}], [{}, {}], {})
    assert [r.peak_bytes for r in out] == [7 * GiB, 7 * GiB]  # type: ignore[union-attr]
    assert [r.resident_bytes for r in out] == [2 * GiB, 2 * GiB]  # type: ignore[union-attr]


def test_cuda_memory_is_the_devices_free_bytes_or_a_lower_configured_figure() -> None:
    cuda = FakeCuda(free=70 * GiB, total=80 * GiB)
    mem = cuda_memory(cuda, 0, configured=80 * GiB)
    assert mem == {
        "total_bytes": 80 * GiB,
        "free_bytes": 70 * GiB,
        "configured_bytes": 80 * GiB,
        "memory_bytes": 70 * GiB,
    }
    assert cuda_memory(cuda, 0, configured=60 * GiB)["memory_bytes"] == 60 * GiB


def test_rss_meter_sees_a_peak_and_resets_it() -> None:
    meter = RssMeter()
    start = meter.reset()
    if start is None:
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    # An anonymous mapping, touched (64 MiB resident) and unmapped: unlike a freed
    # bytearray, which malloc may keep, the pages surely leave the process.
    block = mmap.mmap(-1, 64 << 20)
    for off in range(0, 64 << 20, 4096):
        block[off] = 1
    block.close()
    peak = meter.peak()
    assert peak is not None and peak >= start + (60 << 20)
    again = meter.reset()
    assert again is not None and meter.peak() is not None
    assert meter.peak() < peak  # type: ignore[operator]


def test_rss_meter_without_proc_reports_nothing(tmp_path: Any) -> None:
    meter = RssMeter(proc=str(tmp_path / "absent"))
    assert meter.reset() is None and meter.peak() is None and meter.current() is None
    assert MemoryMeter().reset() is None


class OomPipe:
    """diffuse raises torch's real OutOfMemoryError while holding a tensor."""

    held: weakref.ref[Any] | None = None

    def loaded(self) -> set[str]:
        return {"encode", "diffuse", "decode"}

    def run(self, stage: str, inputs: Any, params: Any, options: Any, parallel: Any) -> Any:
        if stage == "diffuse":
            activations = torch.ones(1024)
            OomPipe.held = weakref.ref(activations)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return {"x": torch.zeros(2)}


def test_a_torch_oom_becomes_out_of_memory_with_the_stage_and_frees_its_tensors() -> None:
    ex = _executor()
    ex.pipes["m"] = OomPipe()
    with pytest.raises(OutOfMemory) as info:
        ex.run("m", ("encode", "diffuse", "decode"), {}, {}, {})
    exc = info.value
    assert exc.failed_stage == "diffuse"  # type: ignore[attr-defined]
    assert "out of memory" in str(exc)
    # Not chained to the torch error: nothing keeps the failed stage's frames alive.
    assert exc.__cause__ is None and exc.__context__ is None
    gc.collect()
    assert OomPipe.held is not None and OomPipe.held() is None
    assert _failure(exc, 1) == ("out_of_memory", str(exc), False)


def test_a_torch_oom_in_a_batch_member_fails_that_member_only() -> None:
    ex = _executor()

    class OneBig(OomPipe):
        def run(self, stage: str, inputs: Any, params: Any, options: Any, parallel: Any) -> Any:
            if params.get("big"):
                return super().run(stage, inputs, params, options, parallel)
            return {"x": torch.zeros(2)}

    ex.pipes["m"] = OneBig()
    out = ex.run_batch("m", ("diffuse",), [{}, {}], [{"big": True}, {}], {})
    assert isinstance(out[0], OutOfMemory) and out[0].__context__ is None
    assert not isinstance(out[1], Exception)


def test_a_raw_torch_oom_still_maps_to_out_of_memory() -> None:
    err = torch.OutOfMemoryError("CUDA out of memory")
    assert _failure(err, 2)[0] == "out_of_memory"
    assert _failure(RuntimeError("x"), 1)[0] == "stage_failed"


def test_free_memory_collects_and_empties_the_cuda_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = _executor()
    assert ex.free_memory() == {}  # cpu: gc only
    calls: list[str] = []
    reserved = [8 * GiB]
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: reserved[0])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 3 * GiB)

    def empty() -> None:
        calls.append("empty_cache")
        reserved[0] = 3 * GiB

    monkeypatch.setattr(torch.cuda, "empty_cache", empty)
    ex.kind, ex.device = "cuda", "cuda:0"
    assert ex.free_memory() == {
        "reserved_before": 8 * GiB,
        "reserved_after": 3 * GiB,
        "allocated": 3 * GiB,
    }
    assert calls == ["empty_cache"]


def test_out_of_memory_reaches_the_client_as_out_of_memory_error() -> None:
    err = error_from_code("out_of_memory", "diffuse failed on n/cuda:0: CUDA out of memory", "r")
    assert isinstance(err, OutOfMemoryError) and isinstance(err, StageFailedError)
    assert err.code == "out_of_memory" and err.request_id == "r"


def test_task_finished_carries_measured_memory_and_old_reports_still_decode() -> None:
    msg = protocol.TaskFinished(
        task_id="t",
        stage_seconds={"diffuse": 1.0},
        peak_bytes=16 * GiB,
        resident_bytes=11 * GiB,
        stage_peak_bytes={"diffuse": 6 * GiB},
    )
    back, _ = protocol.decode([protocol.encode(msg)], protocol.CLUSTER_TO_SCHEDULER)
    assert back == msg
    plain = protocol.TaskFinished(task_id="t", stage_seconds={})
    back, _ = protocol.decode([protocol.encode(plain)], protocol.CLUSTER_TO_SCHEDULER)
    assert back.peak_bytes is None and back.stage_peak_bytes is None


def test_task_memory_fields_put_the_plan_beside_the_measurement() -> None:
    cost = load_cost_model()
    params = {"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5}
    weights = {("flux", "encode"): 9 * GiB, ("flux", "diffuse"): 24 * GiB}
    f = task_memory_fields(
        cost=cost,
        family="flux",
        model="flux",
        stages=("diffuse",),
        params=params,
        degree=1,
        batch=2,
        weight_bytes=weights,
        resident={("flux", "encode"), ("flux", "diffuse")},
        device_kind="cuda",
        device_memory_bytes=79 * GiB,
        peak_bytes=40 * GiB,
        resident_bytes=33 * GiB,
        stage_peak_bytes={"diffuse": 7 * GiB},
    )
    shape = Shape(1024, 1024, 1, 28)
    planned = cost.batch_peak_bytes("flux", "diffuse", shape, 1, 2)
    assert f["planned_stage_peak_bytes"] == {"diffuse": planned}
    assert f["planned_peak_bytes"] == planned
    assert f["planned_weight_bytes"] == 24 * GiB
    assert f["planned_resident_bytes"] == 33 * GiB
    assert f["planned_total_bytes"] == 33 * GiB + planned
    assert f["measured_peak_bytes"] == 40 * GiB and f["measure"] == "cuda_allocator"
    assert f["peak_error"] == round(40 * GiB / (33 * GiB + planned), 4)
    assert f["shape"]["cfg"] is False and f["batch"] == 2
    # No shape in the params (or no cost model): measured figures alone.
    bare = task_memory_fields(
        cost=None,
        family="flux",
        model="flux",
        stages=("encode",),
        params={},
        degree=1,
        batch=1,
        weight_bytes=weights,
        resident=(),
        device_kind="cpu",
        device_memory_bytes=GiB,
        peak_bytes=None,
        resident_bytes=5,
        stage_peak_bytes=None,
    )
    assert bare["planned_peak_bytes"] is None and bare["peak_error"] is None
    assert bare["measure"] == "process_rss" and bare["measured_resident_bytes"] == 5
