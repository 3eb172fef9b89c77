"""Device kinds and the executors that run stage tasks on them.

- ``sim``: a simulated GPU. A stage sleeps for the cost model's time (times the node's
  ``time_scale``) and memory is accounted (weights of resident stages + the task's peak
  activation); a task that would not fit fails with ``out_of_memory`` as on a real GPU.
  Never imports torch, so a 128-device load test fits on a small machine.
- ``cpu``: a CPU slot running the real diffusers stages (``trident.pipelines``).
- ``cuda``: one GPU running the real stages.

Executors are called from the worker's compute thread; they never touch sockets.

Batches (``run_batch``): several same-shape requests' tasks with the same model, stages
and options run as one call and come back as one result *per member* — a
:class:`TaskResult` or the exception that member failed with — so one bad request
cannot fail the others. An exception raised by ``run_batch`` itself (out of memory for
the whole batch) fails every member. Batches run at degree 1 only.

Progress: a ``cancel`` flag with a ``report_step(step, total)`` method
(:class:`ProgressFlag`) hears each denoising step of diffuse as it ends, on real
devices (the adapters' step callback) and simulated ones (per step slice).

Cancellation: every ``run``/``run_batch`` takes a keyword-only ``cancel`` flag (a
``threading.Event``, set from any thread). It is checked before each stage and between
denoising steps; once set, the call raises :class:`TaskCancelled` (for a batch: the
whole call). Weights loaded for the task stay resident, as after a finished task; the
exception's ``partial`` holds the loads and evictions done before the stop, for the
caller to report. An unset (or absent) flag changes nothing: outputs stay bit-exact.

Yield (step-level preemption): a :class:`ProgressFlag` whose :meth:`ProgressFlag.request_yield`
was called asks a running diffuse to pause at its next step boundary. The call then
returns normally, without running the task's stages after diffuse: its output is the
chunk state (:mod:`trident.pipelines.chunks`; a stand-in on ``sim``) and
:attr:`TaskResult.steps_done` the request's steps done so far. ``options["diffuse_steps"]
= [start, stop]`` runs only those steps (``stop`` None: to the end); a chunk that ends
before the last step is paused the same way. Batches never yield.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from trident.errors import ConfigError
from trident.log import get_logger
from trident.sched.types import DTYPE_BYTES, Shape

if TYPE_CHECKING:
    from trident.runtime.peerweights import PeerWeights

__all__ = [
    "CudaMeter",
    "DeviceSpec",
    "Executor",
    "MemoryMeter",
    "OutOfMemory",
    "ProgressFlag",
    "RssMeter",
    "SimExecutor",
    "StageError",
    "TaskCancelled",
    "TaskResult",
    "TorchExecutor",
    "cuda_memory",
    "diffuse_span",
    "make_executor",
    "mark_stage",
    "parse_devices",
]

GiB = 1 << 30


class StageError(Exception):
    """A stage failed for reasons of the request (bad input), not of the device."""


class OutOfMemory(Exception):
    """A stage did not fit in the device's memory."""


class TaskCancelled(Exception):
    """The task was cancelled between steps (its ``cancel`` flag was set); nothing went
    wrong with the device.

    ``partial``: what the call did before it stopped — its loads (``loaded``,
    ``load_seconds``), evictions and the seconds of the stages it finished; no outputs.
    The weights it loaded stay resident, so a worker reports them as after a finished
    task.
    """

    def __init__(self, message: str = "cancelled", partial: TaskResult | None = None) -> None:
        super().__init__(message)
        self.partial = partial


def mark_stage(exc: BaseException, stage: str) -> BaseException:
    """Remember on ``exc`` which stage of a (merged) task raised it, as
    ``exc.failed_stage``; the worker's failure report carries it to the scheduler, so
    "encode failed" is never said of a diffuse traceback. Returns ``exc``."""
    if getattr(exc, "failed_stage", None) is None:
        # An exception type with __slots__ cannot carry it: then it stays unnamed.
        with contextlib.suppress(AttributeError):
            exc.failed_stage = stage  # type: ignore[attr-defined]
    return exc


# A simulated diffuse with a cancel flag sleeps in slices of at most this many seconds
# (and at least one per denoising step, where a real one checks), checking the flag
# after each.
SIM_SLICE_S = 0.05


class ProgressFlag(threading.Event):
    """A task's cancel flag that also hears its diffuse stage's progress: the adapters'
    step callback (and a simulated diffuse, per step) calls :meth:`report_step` with
    the denoising steps done and the total. ``on_step`` (any thread) gets them; one
    that raises is ignored, so progress never slows or breaks a task.

    It also carries a yield order (:meth:`request_yield`, from any thread): the
    pipelines read both through :meth:`poll` after every denoising step."""

    def __init__(self, on_step: Any = None) -> None:
        super().__init__()
        self.on_step = on_step
        self.yield_requested = False

    def request_yield(self) -> None:
        """Pause the diffuse at its next step boundary (a plain bool: one writer, the
        worker's loop; readers see it at their next poll)."""
        self.yield_requested = True

    def poll(self) -> tuple[bool, bool]:
        """(cancel, yield) now."""
        return self.is_set(), self.yield_requested

    def report_step(self, step: int, total: int) -> None:
        if self.on_step is None:
            return
        with contextlib.suppress(Exception):  # advisory only
            self.on_step(int(step), int(total))


def _report_step(cancel: threading.Event | None, step: int, total: int) -> None:
    report = getattr(cancel, "report_step", None)
    if report is not None:
        report(step, total)


def _cancelled(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def _yield_requested(cancel: threading.Event | None) -> bool:
    return bool(getattr(cancel, "yield_requested", False))


def diffuse_span(options: Mapping[str, Any], total: int) -> tuple[int, int]:
    """``options["diffuse_steps"]`` as the steps ``[start, stop)`` of ``total`` to run
    (the whole loop when absent); a range outside the loop is a :class:`StageError`."""
    value = options.get("diffuse_steps")
    if value is None:
        return 0, total
    try:
        start, stop = value
        start = int(start)
        stop = total if stop is None else min(int(stop), total)
    except (TypeError, ValueError):
        raise StageError(f"diffuse_steps must be [start, stop], got {value!r}") from None
    if not 0 <= start < stop:
        raise StageError(f"diffuse_steps {value!r} is not a range of the {total} steps")
    return start, stop


def _cancel_kw(cancel: threading.Event | None) -> dict[str, Any]:
    """``cancel=`` only when there is a flag: adapters and executors written before
    cancellation (tests' fakes) are still called exactly as before."""
    return {} if cancel is None else {"cancel": cancel}


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # cpu | sim | cuda
    index: int  # position on the node
    ordinal: int  # cuda ordinal (cuda), else == index
    memory_bytes: int
    speed: float = 1.0


def parse_devices(
    spec: str, *, sim_memory_gb: float = 80.0, speed: float = 1.0, memory_gb: float | None = None
) -> list[DeviceSpec]:
    """``cpu:N``, ``sim:N`` or ``cuda:0,1,...`` (``cuda:all`` = every visible GPU).

    ``memory_gb`` overrides the memory each device reports to the planner (cpu: default
    RAM / N; cuda: the GPU's; sim: ``sim_memory_gb``) — e.g. to reserve headroom.
    """
    m = re.fullmatch(r"(cpu|sim|cuda):([0-9,]+|all)", spec.strip())
    if not m:
        raise ConfigError(f"--devices {spec!r}: expected cpu:N, sim:N or cuda:0,1,...")
    kind, rest = m.group(1), m.group(2)
    if kind in ("cpu", "sim"):
        if not rest.isdigit() or not 1 <= int(rest) <= 1024:
            raise ConfigError(f"--devices {spec!r}: N must be an integer in [1, 1024]")
        n = int(rest)
        if memory_gb is not None:
            mem = int(memory_gb * GiB)
        elif kind == "sim":
            mem = int(sim_memory_gb * GiB)
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            mem = total // n
        return [DeviceSpec(kind, i, i, mem, speed) for i in range(n)]
    import torch  # cuda nodes only

    if not torch.cuda.is_available():
        raise ConfigError("--devices cuda:...: no CUDA device is visible")
    count = torch.cuda.device_count()
    ordinals = list(range(count)) if rest == "all" else [int(x) for x in rest.split(",") if x]
    for o in ordinals:
        if not 0 <= o < count:
            raise ConfigError(f"--devices {spec!r}: cuda:{o} does not exist ({count} visible)")
    return [
        DeviceSpec(
            "cuda",
            i,
            o,
            int(memory_gb * GiB)
            if memory_gb is not None
            else int(torch.cuda.get_device_properties(o).total_memory),
            speed,
        )
        for i, o in enumerate(ordinals)
    ]


@dataclass
class TaskResult:
    outputs: dict[str, Any]
    stage_seconds: dict[str, float]
    load_seconds: float = 0.0
    # (model, stage, seconds, source) of each load the task did
    loaded: list[tuple[str, str, float, str]] = field(default_factory=list)
    evicted: list[tuple[str, str]] = field(default_factory=list)  # (model, stage) dropped for room
    # Measured memory (cpu/cuda; None: not measured, as on sim), see MemoryMeter: the
    # peak while the stages ran (weights included), what stays in use after, and per
    # stage its peak above what was in use when it started (its activations).
    peak_bytes: int | None = None
    resident_bytes: int | None = None
    stage_peak_bytes: dict[str, int] = field(default_factory=dict)
    # Set: the diffuse paused after this many of the request's steps (a yield, or a
    # chunk that ends early); ``outputs`` is its chunk state and the task's stages after
    # diffuse did not run. None: every stage ran to its end.
    steps_done: int | None = None


def _partial(
    stage_seconds: Mapping[str, float],
    load_seconds: float,
    loaded: list[tuple[str, str, float, str]],
) -> TaskResult:
    """What a cancelled call did before it stopped (for :attr:`TaskCancelled.partial`)."""
    return TaskResult(
        outputs={},
        stage_seconds=dict(stage_seconds),
        load_seconds=load_seconds,
        loaded=list(loaded),
    )


def _check_batch(inputs: list[Any], params: list[Any], parallel: Any | None) -> None:
    if len(inputs) != len(params) or not params:
        raise ValueError(
            f"a batch needs one inputs and one params per member: {len(inputs)} != {len(params)}"
        )
    if parallel is not None:
        # The runtime never forms a group for a batch (RunBatch is degree 1).
        raise StageError("batched tasks run at degree 1 only")


class Executor:
    """Runs the stages of one task on this device (called in the compute thread)."""

    kind = "base"

    def run(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: Mapping[str, Any] | None,
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> TaskResult:
        """Run ``stages`` for one request; raises :class:`TaskCancelled` once ``cancel``
        is set (checked before each stage and between denoising steps)."""
        raise NotImplementedError

    def run_batch(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: list[Mapping[str, Any] | None],
        params: list[Mapping[str, Any]],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[TaskResult | Exception]:
        """Run ``stages`` for several requests (member i: ``inputs[i]``, ``params[i]``);
        one entry per member, in order: its result or the exception it failed with.
        ``cancel`` set: the whole call raises :class:`TaskCancelled`.

        This base form runs the members one by one (correct for any executor, no
        speed-up); executors that can batch override it.
        """
        _check_batch(inputs, params, parallel)
        out: list[TaskResult | Exception] = []
        for member_inputs, member_params in zip(inputs, params, strict=True):
            if _cancelled(cancel):
                raise TaskCancelled("cancelled before a batch member started")
            try:
                out.append(
                    self.run(
                        model, stages, member_inputs, member_params, options, **_cancel_kw(cancel)
                    )
                )
            except TaskCancelled:
                raise  # the whole call stops
            except Exception as exc:  # this member's failure, reported as its own
                out.append(exc)
        return out

    def load(self, model: str, stage: str, source: str = "disk") -> tuple[float, str]:
        """Make a stage resident; ``source`` is where the scheduler says its weights can
        come from ("peer", "node-cache", "disk"). Returns (seconds, source used)."""
        return 0.0, "none"

    def unload(self, model: str, stage: str) -> None:
        return None

    def free_memory(self) -> dict[str, int]:
        """Give memory a failed call held back (after an out-of-memory failure, in the
        compute thread); returns figures for the log. Nothing to do here."""
        return {}

    def close(self) -> None:
        return None


class SimExecutor(Executor):
    """Sleeps for the cost model's time; accounts memory; emits small stand-in tensors."""

    kind = "sim"

    def __init__(
        self,
        models: Mapping[str, Mapping[str, Any]],
        memory_bytes: int,
        *,
        time_scale: float = 1.0,
        speed: float = 1.0,
        payload_cap: int = 64 << 10,
    ) -> None:
        from trident.sched.cost import load_cost_model

        self.cost = load_cost_model()
        self.models = dict(models)
        self.memory_bytes = memory_bytes
        self.time_scale = time_scale
        self.speed = speed
        self.payload_cap = payload_cap
        self.resident: dict[tuple[str, str], int] = {}  # (model, stage) -> weight bytes
        # Last use of each resident stage (a counter: order is all eviction needs).
        self.last_use: dict[tuple[str, str], float] = {}
        self._uses = 0
        self.evicted: list[tuple[str, str]] = []  # evictions not yet reported

    def _family(self, model: str) -> str:
        info = self.models.get(model)
        if info is None:
            raise StageError(f"unknown model {model!r}")
        return str(info["family"])

    def _weight_bytes(self, model: str, family: str, stage: str) -> int:
        """The cost model's (bfloat16) weights of ``stage``, at the model's dtype
        ("auto" on a simulated GPU: bfloat16), as the planner sizes them."""
        return int(self.cost.weight_bytes(family, stage)) * self._dtype_bytes(model) // 2  # type: ignore[arg-type]

    def _dtype_bytes(self, model: str) -> int:
        """Bytes per element of ``model``'s dtype ("auto" on a simulated GPU: bfloat16);
        the cost model's figures are bfloat16 (2)."""
        name = str((self.models.get(model) or {}).get("dtype") or "auto")
        return DTYPE_BYTES.get(name, 2)

    def load(self, model: str, stage: str, source: str = "disk") -> tuple[float, str]:
        if (model, stage) in self.resident:
            self._touch((model, stage))
            return 0.0, "resident"
        family = self._family(model)
        need = self._weight_bytes(model, family, stage)
        self.evicted.extend(self._make_room(need, keep={(model, stage)}))
        secs = self.cost.load_seconds(family, stage, source) * self.time_scale  # type: ignore[arg-type]
        time.sleep(secs)
        self.resident[(model, stage)] = need
        self._touch((model, stage))
        return secs, source

    def unload(self, model: str, stage: str) -> None:
        self.resident.pop((model, stage), None)
        self.last_use.pop((model, stage), None)

    def _touch(self, key: tuple[str, str]) -> None:
        self._uses += 1
        self.last_use[key] = float(self._uses)

    def _make_room(
        self, need: int, keep: set[tuple[str, str]], peak: int = 0
    ) -> list[tuple[str, str]]:
        """Evict stages the task does not need, in the device model's order (least
        recently used first: trident.sched.residency), until it fits; returns them."""
        from trident.sched.residency import victims

        out = victims(
            self.resident, self.last_use, keep=keep, need=need + peak, capacity=self.memory_bytes
        )
        if out is not None:
            for key in out:
                del self.resident[key]
                self.last_use.pop(key, None)
            return out
        used = sum(self.resident.values())
        raise OutOfMemory(
            f"needs {(need + peak) / GiB:.1f} GiB with {used / GiB:.1f} GiB resident "
            f"of {self.memory_bytes / GiB:.1f} GiB"
        )

    def _shape(self, params: Mapping[str, Any]) -> Shape:
        try:
            return Shape(
                height=int(params["height"]),
                width=int(params["width"]),
                num_frames=int(params.get("num_frames") or 1),
                num_inference_steps=int(params["num_inference_steps"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StageError(f"bad shape parameters: {exc!r}") from None

    def _prepare(
        self,
        model: str,
        stages: tuple[str, ...],
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        batch: int = 1,
    ) -> tuple[TaskResult, list[tuple[str | None, float]], Shape, str]:
        """Account loads and memory; return the sleeps to do: (stage or None for a load, s).

        ``batch`` > 1: one call for ``batch`` members of ``params``' shape — encode and
        decode cost ``batch`` times one member, diffuse the cost model's batched time;
        memory holds the batched peak (:func:`trident.sched.cost.batch_peak_bytes`).
        """
        from trident.sched.cost import batch_peak_bytes, batch_stage_seconds, decode_peak_bytes

        family = self._family(model)
        degree = int(options.get("degree", 1))
        tiled = bool(options.get("vae_tiling"))
        act = self._dtype_bytes(model) / 2  # activations at the model's dtype
        shape = self._shape(params)
        result = TaskResult(outputs={}, stage_seconds={})
        result.evicted, self.evicted = self.evicted, []
        sources = dict(options.get("load_sources") or {})
        sleeps: list[tuple[str | None, float]] = []
        # Merged stages at degree k: the other ranks run diffuse only (as a torch
        # device), so they neither load nor hold the other stages' weights and peaks.
        follower = degree > 1 and int(options.get("rank", 0)) != 0
        for stage in stages:
            if follower and stage != "diffuse":
                continue
            if (model, stage) in self.resident:
                self._touch((model, stage))
                continue
            need = self._weight_bytes(model, family, stage)
            result.evicted += self._make_room(need, keep={(model, s) for s in stages})
            source = str(sources.get(stage, "disk"))
            secs = self.cost.load_seconds(family, stage, source) * self.time_scale  # type: ignore[arg-type]
            self.resident[(model, stage)] = need
            self._touch((model, stage))
            result.load_seconds += secs
            result.loaded.append((model, stage, secs, source))
            sleeps.append((None, secs))
        for stage in stages:
            # batch 1 is one request's figures; encode and decode run member by member.
            if stage == "decode":  # its peak depends on tiling (the core's choice)
                peak = decode_peak_bytes(self.cost, family, shape, tiled)
            else:
                peak = batch_peak_bytes(self.cost, family, stage, shape, degree, batch)  # type: ignore[arg-type]
            peak = 0 if follower and stage != "diffuse" else int(act * peak)
            secs = batch_stage_seconds(self.cost, family, stage, shape, degree, batch)  # type: ignore[arg-type]
            result.evicted += self._make_room(0, keep={(model, s) for s in stages}, peak=peak)
            sleeps.append((stage, secs / self.speed * self.time_scale))
        return result, sleeps, shape, family

    def _outputs(self, stages: tuple[str, ...], shape: Shape, family: str) -> dict[str, Any]:
        if stages[-1] == "decode":
            # The client gets an array of the real layout, scaled down to stay cheap.
            h = max(1, shape.height // 64)
            w = max(1, shape.width // 64)
            arr = np.full((h, w, 3), 0.5, dtype=np.float32)
            if shape.num_frames > 1:
                arr = np.repeat(arr[None], min(shape.num_frames, 8), axis=0)
            return {"output": arr}
        nbytes = min(self.cost.output_bytes(family, stages[-1], shape), self.payload_cap)  # type: ignore[arg-type]
        return {"latents": np.zeros(max(1, nbytes // 4), dtype=np.float32)}

    def run(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: Mapping[str, Any] | None,
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> TaskResult:
        # The worker awaits run_async on its event loop; this blocking form (the Executor
        # contract, for a caller in a thread) runs the same code on a private loop.
        return asyncio.run(
            self.run_async(model, stages, inputs, params, options, parallel, cancel=cancel)
        )

    async def run_async(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: Mapping[str, Any] | None,
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> TaskResult:
        """As :meth:`run`, on the event loop: a simulated stage needs no thread.

        ``options["diffuse_steps"]``: diffuse sleeps only for those steps' share of its
        time. A yield (or a chunk ending early) stops it at a step boundary: the stages
        after diffuse are skipped, the output is a stand-in for the chunk state and
        ``steps_done`` says how far the request got."""
        result, sleeps, shape, family = self._prepare(model, stages, params, options)
        span = diffuse_span(options, shape.num_inference_steps) if "diffuse" in stages else None
        done = await self._sleep_through(result, sleeps, shape.num_inference_steps, cancel, span)
        if done is not None:
            result.steps_done = done
            stages = stages[: stages.index("diffuse") + 1]
        result.outputs = self._outputs(stages, shape, family)
        return result

    @staticmethod
    async def _sleep_through(
        result: TaskResult,
        sleeps: list[tuple[str | None, float]],
        steps: int = 1,
        cancel: threading.Event | None = None,
        span: tuple[int, int] | None = None,
    ) -> int | None:
        """Spend the prepared loads and stages' time; record each stage's seconds.

        With a ``cancel`` flag, as a real device: checked before each stage and, in
        diffuse, between denoising steps — diffuse sleeps in one slice per step (finer
        where a step would exceed :data:`SIM_SLICE_S`), each ending at its share of the
        stage's time from the start (no drift). Loads are not interrupted. The memory
        accounting is that of :meth:`_prepare`, as on the normal path: the loaded
        weights stay resident and the activation peak was never held.

        ``span``: diffuse runs only steps ``[start, stop)`` of ``steps`` (their share of
        its time; progress counts the request's steps), and a yield on the flag stops it
        at the next step boundary (a batch passes none: it never yields). Returns the
        steps done when diffuse stopped before the last one (the stages after it are
        then not run), else None.
        """
        total = max(1, steps)
        start, stop = span if span is not None else (0, total)
        for stage, secs in sleeps:
            if stage is not None and _cancelled(cancel):
                raise TaskCancelled(f"cancelled before {stage}", partial=result)
            t0 = time.perf_counter()
            if stage == "diffuse":
                secs = secs * (stop - start) / total
            if stage != "diffuse" or cancel is None:
                if secs > 0:
                    await asyncio.sleep(secs)
                done = stop
            else:
                chunk = stop - start
                n = max(1, chunk, math.ceil(secs / SIM_SLICE_S))
                reported = done = start
                for k in range(1, n + 1):
                    delay = t0 + secs * k / n - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if cancel.is_set():
                        done = max(start + 1, start + k * chunk // n)
                        raise TaskCancelled(
                            f"cancelled after denoising step {done} of {steps}", partial=result
                        )
                    done = start + k * chunk // n
                    if done > reported:  # a step ended in this slice, as on a real device
                        reported = done
                        _report_step(cancel, done, total)
                        if span is not None and _yield_requested(cancel) and done < stop:
                            break  # a yield: pause at this step boundary
            if stage is not None:
                result.stage_seconds[stage] = time.perf_counter() - t0
            if stage == "diffuse" and done < total:
                return done
        return None

    def run_batch(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: list[Mapping[str, Any] | None],
        params: list[Mapping[str, Any]],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[TaskResult | Exception]:
        # Blocking form of run_batch_async, as run is of run_async.
        return asyncio.run(
            self.run_batch_async(model, stages, inputs, params, options, parallel, cancel=cancel)
        )

    async def run_batch_async(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: list[Mapping[str, Any] | None],
        params: list[Mapping[str, Any]],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[TaskResult | Exception]:
        """One batched sleep per stage for every member that shares the first good
        member's shape; a member with bad or different shape parameters fails alone.
        ``cancel`` set: the whole call raises :class:`TaskCancelled`."""
        _check_batch(inputs, params, parallel)
        out: list[TaskResult | Exception | None] = [None] * len(params)
        members: list[int] = []
        shape: Shape | None = None
        for i, p in enumerate(params):
            try:
                own = self._shape(p)
            except StageError as exc:
                out[i] = exc
                continue
            if shape is None:
                shape = own
            if own != shape:
                out[i] = StageError(f"batch member's shape {own} differs from the batch's {shape}")
                continue
            members.append(i)
        if members:
            # A batch that does not fit raises OutOfMemory here: every member fails.
            result, sleeps, shape, family = self._prepare(
                model, stages, params[members[0]], options, batch=len(members)
            )
            await self._sleep_through(result, sleeps, shape.num_inference_steps, cancel)
            for i in members:
                # Every member reports the call's times and the batch's loads; the
                # worker reports a load or eviction once however many carry it.
                out[i] = TaskResult(
                    outputs=self._outputs(stages, shape, family),
                    stage_seconds=dict(result.stage_seconds),
                    load_seconds=result.load_seconds,
                    loaded=list(result.loaded),
                    evicted=list(result.evicted),
                )
        return [r if r is not None else StageError("batch member was not run") for r in out]


class MemoryMeter:
    """Measures a device's memory around a task's stages (called in the compute thread).

    ``reset`` starts a peak window and returns the bytes in use now; ``peak`` is the
    most in use since; ``current`` what is in use now. None: cannot measure. This base
    measures nothing (``source`` "none").
    """

    source = "none"

    def reset(self) -> int | None:
        return None

    def peak(self) -> int | None:
        return None

    def current(self) -> int | None:
        return None


class CudaMeter(MemoryMeter):
    """The CUDA caching allocator's figures of one device: bytes allocated to tensors
    (``memory_allocated``) and their peak (``max_memory_allocated``, its window reset by
    ``reset_peak_memory_stats``). Host-side bookkeeping: no synchronisation needed.
    ``cuda`` is ``torch.cuda`` (a fake one in tests)."""

    source = "cuda"

    def __init__(self, cuda: Any, device: Any) -> None:
        self.cuda = cuda
        self.device = device

    def reset(self) -> int | None:
        self.cuda.reset_peak_memory_stats(self.device)
        return int(self.cuda.memory_allocated(self.device))

    def peak(self) -> int | None:
        return int(self.cuda.max_memory_allocated(self.device))

    def current(self) -> int | None:
        return int(self.cuda.memory_allocated(self.device))


class RssMeter(MemoryMeter):
    """The worker process's resident set (Linux): ``VmRSS`` now and its high-water mark
    ``VmHWM``, reset by writing ``5`` to ``/proc/self/clear_refs`` (Linux 4.0+). It
    counts everything the process holds — interpreter, libraries, touched pages of
    memory-mapped weights, memory the C allocator keeps after a free — so it is an upper
    bound of what a task needs, not the tensors alone. None where it cannot be read or
    reset."""

    source = "rss"

    def __init__(self, proc: str = "/proc/self") -> None:
        self.proc = proc
        self.ok = True

    def _status(self, key: str) -> int | None:
        try:
            with open(f"{self.proc}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
        return None

    def reset(self) -> int | None:
        if self.ok:
            try:
                with open(f"{self.proc}/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                self.ok = False  # no peak window here: peaks are not reported
        return self.current() if self.ok else None

    def peak(self) -> int | None:
        return self._status("VmHWM") if self.ok else None

    def current(self) -> int | None:
        return self._status("VmRSS") if self.ok else None


def cuda_memory(cuda: Any, ordinal: int, configured: int) -> dict[str, int]:
    """The memory a CUDA worker reports to the planner, from the device itself.

    ``total_bytes``: the device's (``get_device_properties``); ``free_bytes``: what
    ``mem_get_info`` says is free once this process's CUDA context exists (net of the
    context and of other processes on the GPU); ``memory_bytes``, the figure reported:
    the free bytes, or the node's ``configured`` figure where that is lower (a
    ``--device-memory-gb`` headroom). ``cuda`` is ``torch.cuda`` (a fake in tests)."""
    free, total = cuda.mem_get_info(ordinal)
    props_total = int(cuda.get_device_properties(ordinal).total_memory)
    return {
        "total_bytes": props_total or int(total),
        "free_bytes": int(free),
        "configured_bytes": int(configured),
        "memory_bytes": max(0, min(int(configured), int(free))),
    }


def _oom_types(torch: Any) -> tuple[type[BaseException], ...]:
    """torch's out-of-memory error(s): ``torch.OutOfMemoryError`` (torch >= 2.5; also
    ``torch.cuda.OutOfMemoryError``), and the older spelling."""
    found = (
        getattr(torch, "OutOfMemoryError", None),
        getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
    )
    return tuple(dict.fromkeys(t for t in found if isinstance(t, type)))


def _stamp_memory(meter: MemoryMeter, results: list[TaskResult | Exception]) -> list[Any]:
    """A batched call's memory, on each member's result (every member reports the
    call's peak, as it reports the call's stage seconds)."""
    peak, now = meter.peak(), meter.current()
    for r in results:
        if isinstance(r, TaskResult):
            r.peak_bytes, r.resident_bytes = peak, now
    return results


class TorchExecutor(Executor):
    """Runs the real diffusers stages of ``trident.pipelines`` on a CPU or CUDA device."""

    def __init__(
        self,
        models: Mapping[str, Mapping[str, Any]],
        device: str,
        threads: int | None = None,
        peers: PeerWeights | None = None,
    ) -> None:
        import torch

        self.kind = "cuda" if device.startswith("cuda") else "cpu"
        # Same-node weight sharing (trident.runtime.peerweights); None: every load reads
        # the model directory.
        self.peers = peers
        self._publisher: Any = None  # one background thread writing shared copies
        self._publishing: list[Any] = []  # their futures, until flushed
        # Written copies our modules switch to at the next load (compute thread).
        self._rebase_ready: list[tuple[Any, Any, Any]] = []
        self._rebase_lock = threading.Lock()
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.models = dict(models)
        self.pipes: dict[str, Any] = {}
        self.meter: MemoryMeter = (
            CudaMeter(torch.cuda, torch.device(device)) if self.kind == "cuda" else RssMeter()
        )

    def _pipe(self, model: str) -> Any:
        pipe = self.pipes.get(model)
        if pipe is None:
            info = self.models.get(model)
            if info is None or not info.get("path"):
                raise StageError(f"model {model!r} has no weights directory on this node")
            from trident.pipelines import open_pipeline

            pipe = open_pipeline(str(info["path"]), device=self.device, dtype=self.dtype(model))
            self.pipes[model] = pipe
        return pipe

    def dtype(self, model: str) -> Any:
        """The torch dtype ``model`` runs in here: its configured one, or for ``"auto"``
        bfloat16 on cuda and float32 on cpu."""
        import torch

        name = str((self.models.get(model) or {}).get("dtype") or "auto")
        if name == "auto":
            name = "bfloat16" if self.kind == "cuda" else "float32"
        if name not in DTYPE_BYTES:
            raise StageError(f"model {model!r}: unknown dtype {name!r}")
        return getattr(torch, name)

    def load(self, model: str, stage: str, source: str = "disk") -> tuple[float, str]:
        """Make ``stage`` resident. ``source`` "peer": from the node's shared copy of a
        device that holds it (:mod:`trident.runtime.peerweights`), falling back to the
        model directory if no live peer published one (then reported "node-cache").
        From the directory, the weights come from the OS page cache once any device of
        this node read them; the first such load publishes them for the node's peers."""
        self._apply_rebases()
        pipe = self._pipe(model)
        if stage in pipe.loaded():
            return 0.0, "resident"
        key = self._key(model, stage)
        t0 = time.perf_counter()
        if source == "peer" and self.peers is not None:
            secs = self._load_from_peer(pipe, key)
            if secs is not None:
                return secs, "peer"
        used = "node-cache" if source in ("peer", "node-cache") else "disk"
        pipe.load(stage)
        secs = time.perf_counter() - t0
        self._publish(pipe, key)
        return secs, used

    def _key(self, model: str, stage: str) -> Any:
        from trident.runtime.peerweights import WeightKey

        return WeightKey(model, stage, str(self.dtype(model)).removeprefix("torch."))

    def _load_from_peer(self, pipe: Any, key: Any) -> float | None:
        from trident.pipelines.weights import WeightsError

        assert self.peers is not None
        t0 = time.perf_counter()
        try:
            weights = self.peers.open(key)
            if weights is None:
                return None
            pipe.load(key.stage, weights=weights)
        except (OSError, ValueError, WeightsError) as exc:
            self.peers.drop(key)
            get_logger("devices").warning(
                "weights.peer_failed", model=key.model, stage=key.stage, error=repr(exc)
            )
            return None
        return time.perf_counter() - t0

    def _publish(self, pipe: Any, key: Any) -> None:
        """Offer a stage just read from disk to the node's other devices, unless a live
        peer already has, in the background (the load does not wait for the copy)."""
        peers = self.peers
        if peers is None or peers.holds(key) or peers.has_peer(key):
            return
        if self._publisher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="weights-publish")
        self._publishing.append(self._publisher.submit(self._publish_now, pipe, key))

    def _publish_now(self, pipe: Any, key: Any) -> None:
        """Write the node's shared copy of ``key`` (in the background thread: reads the
        stage's tensors, writes a file, touches no global state). On CPU our modules
        switch to it later, in the compute thread (:meth:`_apply_rebases`): building
        modules sets process-wide torch state (the default dtype) that a stage running
        meanwhile would see."""
        from trident.pipelines.weights import WeightsError

        peers = self.peers
        assert peers is not None
        t0 = time.perf_counter()
        try:
            mapped = peers.publish(key, pipe.stage_tensors(key.stage))
            if self.kind == "cpu":
                with self._rebase_lock:
                    self._rebase_ready.append((pipe, key, mapped))
        except Exception as exc:  # a failed copy costs only the sharing
            peers.drop(key)
            get_logger("devices").warning(
                "weights.publish_failed", model=key.model, stage=key.stage, error=repr(exc)
            )
            if not isinstance(exc, OSError | ValueError | WeightsError):
                raise
            return
        get_logger("devices").info(
            "weights.published",
            model=key.model,
            stage=key.stage,
            dtype=key.dtype,
            seconds=round(time.perf_counter() - t0, 4),
        )

    def _apply_rebases(self) -> None:
        """Switch stages whose shared copy is written to modules over it (one copy of
        those weights on the node however many devices hold the stage); in the compute
        thread, between stage calls."""
        from trident.pipelines.weights import WeightsError

        with self._rebase_lock:
            ready, self._rebase_ready = self._rebase_ready, []
        for pipe, key, mapped in ready:
            try:
                kept = pipe.rebase(key.stage, mapped)
            except (OSError, ValueError, WeightsError) as exc:
                kept = False
                get_logger("devices").warning(
                    "weights.rebase_failed", model=key.model, stage=key.stage, error=repr(exc)
                )
            if not kept and self.peers is not None:
                self.peers.drop(key)  # unloaded meanwhile, or not ours to share

    def flush(self) -> None:
        """Wait until every background publish has ended and apply its switch (tests;
        unload; close: never while a stage runs in another thread)."""
        while self._publishing:
            fut = self._publishing.pop(0)
            with contextlib.suppress(Exception):
                fut.result()
        self._apply_rebases()

    def unload(self, model: str, stage: str) -> None:
        self.flush()
        pipe = self.pipes.get(model)
        if pipe is not None:
            pipe.unload(stage)
        if self.peers is not None:
            self.peers.drop(self._key(model, stage))

    def close(self) -> None:
        self.flush()
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None
        if self.peers is not None:
            self.peers.close()

    def free_memory(self) -> dict[str, int]:
        """After an out-of-memory failure: collect the failed call's garbage, then hand
        the CUDA allocator's cached blocks back (``empty_cache``), so the next task
        starts from the weights alone."""
        import gc

        import torch

        gc.collect()
        if self.kind != "cuda":
            return {}
        dev = torch.device(self.device)
        before = int(torch.cuda.memory_reserved(dev))
        torch.cuda.empty_cache()
        return {
            "reserved_before": before,
            "reserved_after": int(torch.cuda.memory_reserved(dev)),
            "allocated": int(torch.cuda.memory_allocated(dev)),
        }

    def _load_for_task(self, model: str, stage: str, source: str) -> tuple[float, str]:
        """:meth:`load`, a torch out-of-memory error becoming :class:`OutOfMemory`
        (raised after the torch error's frames are gone, so their memory can be freed)."""
        import torch

        oom = None
        try:
            return self.load(model, stage, source)
        except _oom_types(torch) as exc:
            oom = str(exc)
        raise mark_stage(OutOfMemory(f"loading {stage}: {oom}"), stage)

    def run(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: Mapping[str, Any] | None,
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> TaskResult:
        import torch

        from trident.pipelines.api import StageCancelled
        from trident.pipelines.chunks import is_partial
        from trident.pipelines.chunks import steps_done as chunk_steps_done

        result = TaskResult(outputs={}, stage_seconds={})
        sources = dict(options.get("load_sources") or {})
        follower = parallel is not None and parallel.rank != 0
        for stage in stages:
            if follower and stage != "diffuse":
                continue  # run on the leader only (below): its weights are not needed here
            secs, source = self._load_for_task(model, stage, str(sources.get(stage, "disk")))
            if source != "resident":
                result.load_seconds += secs
                result.loaded.append((model, stage, secs, source))
        pipe = self._pipe(model)
        current: Mapping[str, Any] | None = inputs
        meter = self.meter
        for stage in stages:
            if follower and stage != "diffuse":
                # Merged stages at degree k: encode and decode run on the leader only;
                # the other ranks join for diffuse (its inputs come from rank 0).
                continue
            # Degree k: only decode (leader alone) may stop on the local flag; encode
            # runs to its end and diffuse checks collectively, or a partner would wait
            # in a collective for a rank that left.
            if _cancelled(cancel) and (parallel is None or stage == "decode"):
                raise TaskCancelled(f"cancelled before {stage}", partial=result)
            start = meter.reset()
            t0 = time.perf_counter()
            oom = None
            try:
                with torch.inference_mode():
                    current = pipe.run(
                        stage,
                        None if follower else current,
                        params,
                        options,
                        parallel if stage == "diffuse" else None,
                        **_cancel_kw(cancel),
                    )
            except StageCancelled as exc:  # the flag, seen between two denoising steps
                raise TaskCancelled(str(exc), partial=result) from exc
            except _oom_types(torch) as exc:
                oom = str(exc)
            except Exception as exc:
                mark_stage(exc, stage)
                raise
            if oom is not None:
                # Raised here, not in the handler, and not chained: the torch error's
                # traceback (the stage's frames and their tensors) is gone, so the
                # worker's gc + empty_cache gives that memory back.
                raise mark_stage(OutOfMemory(oom), stage)
            result.stage_seconds[stage] = time.perf_counter() - t0
            peak = meter.peak()
            if peak is not None and start is not None:
                result.stage_peak_bytes[stage] = max(0, peak - start)
                result.peak_bytes = max(result.peak_bytes or 0, peak)
            if stage == "diffuse" and current is not None and is_partial(current):
                # Paused at a step boundary (a yield or a chunk's end): the state is the
                # task's output, the stages after diffuse do not run.
                result.steps_done = chunk_steps_done(current)
                break
        result.resident_bytes = meter.current()
        result.outputs = {} if follower else dict(current or {})
        return result

    def run_batch(
        self,
        model: str,
        stages: tuple[str, ...],
        inputs: list[Mapping[str, Any] | None],
        params: list[Mapping[str, Any]],
        options: Mapping[str, Any],
        parallel: Any | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[TaskResult | Exception]:
        """Each stage as one ``pipe.run_batch`` call for all members. If a batched call
        fails (members that cannot share a call, one member's bad input, or the batch
        not fitting in memory), the members continue one by one from that stage, so
        each ends with its own result or its own error. Stage seconds of a batched stage
        are the call's wall time. ``cancel`` set: the whole call raises
        :class:`TaskCancelled` (never a member's own error)."""
        import torch

        from trident.pipelines.api import StageCancelled

        _check_batch(inputs, params, parallel)
        loaded: list[tuple[str, str, float, str]] = []
        load_seconds = 0.0
        sources = dict(options.get("load_sources") or {})
        for stage in stages:
            secs, source = self._load_for_task(model, stage, str(sources.get(stage, "disk")))
            if source != "resident":
                load_seconds += secs
                loaded.append((model, stage, secs, source))
        pipe = self._pipe(model)
        batched = getattr(pipe, "run_batch", None)  # adapters without it: one by one
        current: list[Mapping[str, Any] | None] = list(inputs)
        stage_seconds: dict[str, float] = {}
        self.meter.reset()  # the call's peak, on every member (_stamp_memory)

        def singly(si: int) -> list[Any]:
            """The rest of the stages, from ``stages[si]``, member by member."""
            return _stamp_memory(
                self.meter,
                self._finish_singly(
                    pipe,
                    stages[si:],
                    current,
                    params,
                    options,
                    stage_seconds,
                    load_seconds,
                    loaded,
                    cancel,
                ),
            )

        for si, stage in enumerate(stages):
            if batched is None:
                return singly(si)
            if _cancelled(cancel):
                raise TaskCancelled(
                    f"cancelled before {stage}",
                    partial=_partial(stage_seconds, load_seconds, loaded),
                )
            t0 = time.perf_counter()
            failed = False
            try:
                with torch.inference_mode():
                    outs = batched(stage, current, params, options, **_cancel_kw(cancel))
                if len(outs) != len(current):
                    raise StageError(
                        f"{stage}: run_batch returned {len(outs)} outputs for {len(current)} members"
                    )
            except StageCancelled as exc:
                if self.kind == "cuda":
                    torch.cuda.empty_cache()
                raise TaskCancelled(
                    str(exc), partial=_partial(stage_seconds, load_seconds, loaded)
                ) from exc
            except Exception:
                failed = True
            if failed:
                # Which member is at fault is unknown, or the batch did not fit (its
                # peak is an estimate) where each member alone may: free what the call
                # held (outside the handler: its traceback's tensors are gone now) and
                # go on one by one.
                if self.kind == "cuda":
                    torch.cuda.empty_cache()
                return singly(si)
            stage_seconds[stage] = time.perf_counter() - t0
            current = list(outs)
        return _stamp_memory(
            self.meter,
            [
                TaskResult(
                    outputs=dict(out or {}),
                    stage_seconds=dict(stage_seconds),
                    load_seconds=load_seconds,
                    loaded=list(loaded),
                )
                for out in current
            ],
        )

    def _finish_singly(
        self,
        pipe: Any,
        stages: tuple[str, ...],
        inputs: list[Mapping[str, Any] | None],
        params: list[Mapping[str, Any]],
        options: Mapping[str, Any],
        done_seconds: Mapping[str, float],
        load_seconds: float,
        loaded: list[tuple[str, str, float, str]],
        cancel: threading.Event | None = None,
    ) -> list[TaskResult | Exception]:
        """The remaining ``stages`` member by member; per-member result or exception
        (a set ``cancel`` stops the whole call: :class:`TaskCancelled`)."""
        import torch

        from trident.pipelines.api import StageCancelled

        out: list[TaskResult | Exception] = []
        for member_inputs, member_params in zip(inputs, params, strict=True):
            result = TaskResult(
                outputs={},
                stage_seconds=dict(done_seconds),
                load_seconds=load_seconds,
                loaded=list(loaded),
            )
            current = member_inputs
            try:
                for stage in stages:
                    if _cancelled(cancel):
                        raise TaskCancelled(
                            f"cancelled before {stage}",
                            partial=_partial(done_seconds, load_seconds, loaded),
                        )
                    t0 = time.perf_counter()
                    oom = None
                    try:
                        with torch.inference_mode():
                            current = pipe.run(
                                stage, current, member_params, options, None, **_cancel_kw(cancel)
                            )
                    except StageCancelled as exc:
                        raise TaskCancelled(
                            str(exc), partial=_partial(done_seconds, load_seconds, loaded)
                        ) from exc
                    except _oom_types(torch) as exc:
                        oom = str(exc)
                    if oom is not None:  # not chained: the torch error's frames are gone
                        raise mark_stage(OutOfMemory(oom), stage)
                    result.stage_seconds[stage] = time.perf_counter() - t0
            except TaskCancelled:
                raise  # the whole call stops, not this member alone
            except Exception as exc:  # this member's own failure
                out.append(exc)
                continue
            result.outputs = dict(current or {})
            out.append(result)
        return out


def make_executor(
    kind: str,
    models: Mapping[str, Mapping[str, Any]],
    *,
    memory_bytes: int,
    ordinal: int = 0,
    time_scale: float = 1.0,
    speed: float = 1.0,
    threads: int | None = None,
    peers: PeerWeights | None = None,
) -> Executor:
    if kind == "sim":
        return SimExecutor(models, memory_bytes, time_scale=time_scale, speed=speed)
    if kind == "cpu":
        return TorchExecutor(models, "cpu", threads=threads, peers=peers)
    if kind == "cuda":
        return TorchExecutor(models, f"cuda:{ordinal}", threads=threads, peers=peers)
    raise ConfigError(f"unknown device kind {kind!r}")
