"""Resumable diffuse: run denoising steps ``[start, stop)`` of a request and hand over
the state, so a diffuse can pause at a step boundary and resume elsewhere.

A *chunk* is one diffusers ``__call__`` that computes only some of the loop's steps.
The pipeline still builds its full timestep schedule (same ``num_inference_steps``, so
every per-step formula — SD3's skip-layer window, CogVideoX's dynamic CFG — sees the
same ``i`` and ``t``); the steps outside the chunk are skipped through the pipeline's own
``interrupt`` check at the top of each iteration (``if self.interrupt: continue``),
which every served family reads exactly once per iteration.

The state a chunk hands over is a flat tensor dict, so it travels like any stage output
(wire frames, shared memory, kept until the next chunk has finished):

- ``latents``: the loop's latents after the last step run (Flux: still packed);
- ``_trident.step``: how many steps are done (0-d int64);
- ``_trident.sched.meta`` + ``_trident.sched.<n>``: the noise scheduler's state (step
  index, sigmas/timesteps, a multistep solver's history, ...), every attribute of the
  scheduler object that is a tensor, a number, ``None`` or a list of those, described
  in msgpack (never pickle) with the tensors beside it;
- ``_trident.rng.<i>``: each generator's state (families whose scheduler draws noise per
  step continue the same random stream);
- the stage's other inputs (prompt embeddings), passed through for the next chunk.

Resuming restores the scheduler state right before the first step it computes and
passes ``latents`` to ``__call__`` (every family's ``prepare_latents`` takes given
latents as they are). The final chunk's output is the ordinary diffuse output, bit for
bit the unchunked one at the same degree (tests/pipelines/test_chunks.py).

A *yield* stops a running chunk early at the next step boundary: the step-end callback
sees the worker's flag, records the step, and the remaining iterations are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from trident.errors import InvalidRequestError

__all__ = [
    "STATE_PREFIX",
    "DiffuseChunk",
    "chunk_steps",
    "is_partial",
    "steps_done",
]

STATE_PREFIX = "_trident."
_STEP = "_trident.step"
_SCHED_META = "_trident.sched.meta"
_SCHED = "_trident.sched."
_RNG = "_trident.rng."
# Scheduler attributes never carried: configuration, not state.
_SKIP_ATTRS = frozenset({"_internal_dict", "config"})


def chunk_steps(options: Mapping[str, Any] | None) -> tuple[int, int | None] | None:
    """``options["diffuse_steps"]`` as ``(start, stop)`` (``stop`` None: to the end), or
    None when the task runs the whole diffuse."""
    value = (options or {}).get("diffuse_steps")
    if value is None:
        return None
    try:
        start, stop = value
        return int(start), (None if stop is None else int(stop))
    except (TypeError, ValueError):
        raise InvalidRequestError(f"diffuse_steps must be [start, stop], got {value!r}") from None


def is_partial(output: Mapping[str, Any]) -> bool:
    """Whether a diffuse output is a paused chunk's state (not the finished latents)."""
    return _STEP in output


def steps_done(output: Mapping[str, Any]) -> int | None:
    """Steps a paused chunk's state has done (None: a finished diffuse output)."""
    value = output.get(_STEP)
    return None if value is None else int(value)


# --------------------------------------------------------------------------- state codec


def _encode_value(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A msgpack-able description of ``value``; tensors go to ``tensors`` by index."""
    if isinstance(value, torch.Tensor):
        key = f"{_SCHED}{len(tensors)}"
        tensors[key] = value.detach().clone()
        return {"t": key}
    if value is None or isinstance(value, bool | int | float):
        return {"v": value}
    if isinstance(value, list | tuple):
        items = [_encode_value(v, tensors) for v in value]
        if any(i is _UNSUPPORTED for i in items):
            return _UNSUPPORTED
        return {"l": items, "tuple": isinstance(value, tuple)}
    return _UNSUPPORTED


_UNSUPPORTED: Any = object()


def _decode_value(desc: Any, tensors: Mapping[str, torch.Tensor], like: Any) -> Any:
    if "t" in desc:
        t = tensors[desc["t"]]
        device = like.device if isinstance(like, torch.Tensor) else None
        return t.clone() if device is None else t.to(device).clone()
    if "v" in desc:
        return desc["v"]
    likes = like if isinstance(like, list | tuple) else []
    items = [
        _decode_value(d, tensors, likes[i] if i < len(likes) else None)
        for i, d in enumerate(desc["l"])
    ]
    return tuple(items) if desc.get("tuple") else items


def scheduler_state(scheduler: Any) -> dict[str, torch.Tensor]:
    """Every state attribute of a noise scheduler as flat tensors (see module doc)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, value in vars(scheduler).items():
        if name in _SKIP_ATTRS:
            continue
        desc = _encode_value(value, tensors)
        if desc is not _UNSUPPORTED:
            meta[name] = desc
    packed = msgpack.packb(meta, use_bin_type=True)
    tensors[_SCHED_META] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    return tensors


def restore_scheduler(scheduler: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Put a :func:`scheduler_state` back onto ``scheduler`` (its current tensors keep
    their devices)."""
    meta = msgpack.unpackb(state[_SCHED_META].numpy().tobytes(), raw=False)
    current = vars(scheduler)
    for name, desc in meta.items():
        setattr(scheduler, name, _decode_value(desc, state, current.get(name)))


# --------------------------------------------------------------------------- the chunk


@dataclass
class DiffuseChunk:
    """One diffuse call's share of the denoising loop, and the state it carries."""

    start: int
    stop: int | None
    total: int
    # Scheduler and RNG state from the previous chunk (empty for the first).
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # Filled in while the call runs.
    # Whether a yield order may stop this call early (not for a batched call).
    can_yield: bool = True
    # The call's other inputs (prompt embeddings), handed on with the state.
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    done: int = 0
    yielded: bool = False
    stopped: bool = False  # ended before the last step (chunk end or yield)
    _iteration: int = 0
    generators: list[torch.Generator] = field(default_factory=list)

    @classmethod
    def begin(
        cls, inputs: dict[str, torch.Tensor], steps: tuple[int, int | None], total: int
    ) -> DiffuseChunk:
        """Split a resumed chunk's inputs: state keys leave ``inputs`` (in place), the
        latents and prompt embeddings stay for ``__call__``."""
        start, stop = steps
        if stop is not None and stop > total:
            stop = total
        if start < 0 or start >= total or (stop is not None and stop <= start):
            raise InvalidRequestError(
                f"diffuse_steps [{start}, {stop}) is not a range of the {total} steps"
            )
        state = {k: inputs.pop(k) for k in [k for k in inputs if k.startswith(STATE_PREFIX)]}
        if start > 0:
            if "latents" not in inputs or _SCHED_META not in state:
                raise InvalidRequestError(
                    f"diffuse_steps starts at step {start} but the input holds no chunk "
                    "state (latents and scheduler state of the steps before)"
                )
            if int(state.get(_STEP, torch.tensor(-1))) != start:
                raise InvalidRequestError(
                    f"diffuse_steps starts at step {start} but the state has done "
                    f"{int(state.get(_STEP, torch.tensor(-1)))}"
                )
        elif "latents" in inputs:
            raise InvalidRequestError("a diffuse from step 0 takes no latents")
        return cls(start=start, stop=stop, total=total, state=state, done=start, inputs=inputs)

    @property
    def whole(self) -> bool:
        """Runs every step (a plain diffuse)."""
        return self.start == 0 and (self.stop is None or self.stop >= self.total)

    @property
    def partial(self) -> bool:
        """Ended before the last step: the output is state, not the finished latents."""
        return self.stopped

    def seed_generators(self, generators: list[torch.Generator]) -> None:
        """Continue the previous chunk's random streams (and remember the generators so
        their state can be handed on)."""
        self.generators = generators
        for i, gen in enumerate(generators):
            saved = self.state.get(f"{_RNG}{i}")
            if saved is not None:
                gen.set_state(saved.clone())

    # ------------------------------------------------------------ inside the loop

    def interrupt(self, pipe: Any) -> bool:
        """The pipeline's ``interrupt`` read at the top of iteration ``_iteration``:
        skip it unless it is one of this chunk's steps. Restores the scheduler right
        before the first computed step of a resumed chunk."""
        i = self._iteration
        self._iteration += 1
        if pipe._interrupt:  # a stop (yield or chunk end) already decided
            return True
        if i < self.start:
            return True
        if i == self.start and self.start > 0:
            restore_scheduler(pipe.scheduler, self.state)
        return False

    def step_done(self, pipe: Any, step: int, yield_now: bool) -> None:
        """The step-end callback after loop step ``step``: stop after it when the chunk
        ends there or a yield was asked for."""
        self.done = step + 1
        end = self.total if self.stop is None else self.stop
        yield_now = yield_now and self.can_yield
        if self.done >= end or (yield_now and self.done < self.total):
            self.yielded = yield_now and self.done < end
            self.stopped = self.done < self.total
            pipe._interrupt = True

    def check_ran(self) -> None:
        """The loop read ``interrupt`` once per step (a family that reads it otherwise
        would skip the wrong steps: refuse loudly rather than return wrong latents)."""
        if self._iteration != self.total:
            raise RuntimeError(
                f"diffuse loop read interrupt {self._iteration} times for {self.total} "
                "steps; this pipeline cannot run in chunks"
            )

    # ------------------------------------------------------------ the output

    def output(self, pipe: Any, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """A paused chunk's state: latents, steps done, scheduler and RNG, inputs."""
        out = {k: v for k, v in self.inputs.items() if k != "latents"}
        out["latents"] = latents
        out[_STEP] = torch.tensor(self.done, dtype=torch.int64)
        out.update(scheduler_state(pipe.scheduler))
        for i, gen in enumerate(self.generators):
            out[f"{_RNG}{i}"] = gen.get_state()
        return out


@contextlib.contextmanager
def chunk_interrupt(pipe: Any, chunk: DiffuseChunk) -> Iterator[None]:
    """Route ``pipe.interrupt`` through ``chunk`` for one call: the object's class is
    swapped for a subclass whose ``interrupt`` asks the chunk, and swapped back after."""
    base = type(pipe)
    sub = _chunkable(base)
    pipe.__class__ = sub
    pipe._trident_chunk = chunk
    try:
        yield
    finally:
        pipe.__class__ = base
        with contextlib.suppress(AttributeError):
            del pipe._trident_chunk


_CHUNKABLE: dict[type, type] = {}


def _chunkable(base: type) -> type:
    sub = _CHUNKABLE.get(base)
    if sub is None:

        def interrupt(self: Any) -> bool:
            return bool(self._trident_chunk.interrupt(self))

        sub = type(f"Chunked{base.__name__}", (base,), {"interrupt": property(interrupt)})
        _CHUNKABLE[base] = sub
    return sub
