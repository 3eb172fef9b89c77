"""Memory truth: the planner's memory model beside what a device measured.

A cpu/cuda worker reports each finished task's measured memory (``task_finished``:
``peak_bytes``, ``resident_bytes``, ``stage_peak_bytes``; see
``trident.runtime.devices.MemoryMeter``). The scheduler daemon logs one ``task.memory``
event per such task with :func:`task_memory_fields`: the cost model's planned figures
for that stage, shape, degree and batch size, and the weights the daemon believes
resident on the device, next to the measured ones. docs/runtime.md "Memory truth"
lists the fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from trident.families import runs_cfg
from trident.sched.cost import batch_peak_bytes
from trident.sched.types import Shape

__all__ = ["MEASURES", "task_memory_fields", "task_shape"]

# What a device kind's measured figures are (the ``measure`` field).
MEASURES = {"cuda": "cuda_allocator", "cpu": "process_rss"}


def task_shape(family: str, params: Mapping[str, Any]) -> Shape | None:
    """A task's shape from its request params (filled in at admission); None when they
    do not say (a policy's own task)."""
    try:
        return Shape(
            height=int(params["height"]),
            width=int(params["width"]),
            num_frames=int(params.get("num_frames") or 1),
            num_inference_steps=int(params["num_inference_steps"]),
            cfg=runs_cfg(family, params.get("guidance_scale"), params),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError):
        return None


def task_memory_fields(
    *,
    cost: Any,
    family: str,
    model: str,
    stages: Iterable[str],
    params: Mapping[str, Any],
    degree: int,
    batch: int,
    weight_bytes: Mapping[tuple[str, str], int],
    resident: Iterable[tuple[str, str]],
    device_kind: str,
    device_memory_bytes: int,
    peak_bytes: int | None,
    resident_bytes: int | None,
    stage_peak_bytes: Mapping[str, int] | None,
) -> dict[str, Any]:
    """The ``task.memory`` log event's fields (all but the ids the caller adds).

    Planned (the cost model; None where it cannot say): ``planned_stage_peak_bytes``
    (activation peak per stage, batched where ``batch`` > 1), ``planned_peak_bytes``
    (their max), ``planned_weight_bytes`` (the task's own stages' weights),
    ``planned_resident_bytes`` (weights of every stage the daemon believes resident on
    the device), ``planned_total_bytes`` (resident + peak: the device's planned high
    water). Measured: ``measured_peak_bytes``, ``measured_resident_bytes``,
    ``measured_stage_peak_bytes`` (each stage's peak above what was in use when it
    started, comparable to the planned stage peak) and ``measure`` (what the figures
    are: ``cuda_allocator`` or ``process_rss``). ``peak_error`` is measured peak /
    planned total (None when either is missing).
    """
    stages = list(stages)
    shape = task_shape(family, params)
    planned: dict[str, int] | None = None
    if cost is not None and shape is not None:
        try:
            planned = {
                s: int(batch_peak_bytes(cost, family, s, shape, degree, batch))  # type: ignore[arg-type]
                for s in stages
            }
        except Exception:  # an unknown family, a policy's odd task: no plan to compare
            planned = None
    planned_peak = max(planned.values()) if planned else None
    resident_w = sum(weight_bytes.get(ms, 0) for ms in set(resident))
    total = resident_w + planned_peak if planned_peak is not None else None
    return {
        "model": model,
        "stages": stages,
        "degree": degree,
        "batch": batch,
        "shape": None
        if shape is None
        else {
            "height": shape.height,
            "width": shape.width,
            "num_frames": shape.num_frames,
            "steps": shape.num_inference_steps,
            "cfg": shape.cfg,
        },
        "device_kind": device_kind,
        "device_memory_bytes": device_memory_bytes,
        "planned_stage_peak_bytes": planned,
        "planned_peak_bytes": planned_peak,
        "planned_weight_bytes": sum(weight_bytes.get((model, s), 0) for s in stages),
        "planned_resident_bytes": resident_w,
        "planned_total_bytes": total,
        "measure": MEASURES.get(device_kind, device_kind),
        "measured_peak_bytes": peak_bytes,
        "measured_resident_bytes": resident_bytes,
        "measured_stage_peak_bytes": dict(stage_peak_bytes) if stage_peak_bytes else None,
        "peak_error": round(peak_bytes / total, 4) if peak_bytes is not None and total else None,
    }
