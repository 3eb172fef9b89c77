"""The shared half of every family adapter: lazy per-stage loading and the ``run`` entry.

Each stage owns its own diffusers pipeline object holding only that stage's components
(``from_pretrained(dir, <other components>=None)``), so a device that holds only ``decode``
never reads the text encoders or the transformer. Family modules implement three hooks,
built on the pipelines' public methods:

- ``_encode(pipe, params)``: ``pipe.encode_prompt(...)``;
- ``_diffuse(pipe, inputs, params, seeds=None, cancel=None)``: ``pipe(prompt_embeds=...,
  output_type="latent", **self.diffuse_kwargs(pipe, params, seeds, cancel))`` inside
  :func:`trident.pipelines.parallel.diffuse_context`; ``seeds`` (one per member) is given
  by :meth:`FamilyStages.run_batch`, whose inputs hold the members concatenated on dim 0;
  ``cancel`` becomes a ``callback_on_step_end`` that raises
  :class:`~trident.pipelines.api.StageCancelled` between denoising steps once it is set;
- ``_decode(pipe, inputs, params)``: ``pipe.vae.decode`` + the pipeline's own processor.

Pitfall handled here: a pipeline built with ``vae=None`` falls back to a hard-coded VAE scale
factor (8 / 4). ``_configure`` restores the factors from the model's real VAE config (read by
:func:`trident.pipelines.meta.inspect_model`) on every stage's pipeline object.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trident.errors import InvalidRequestError
from trident.pipelines.api import (
    PER_MEMBER_PARAMS,
    ModelMeta,
    ParallelContext,
    StageCancelled,
    StageName,
)
from trident.pipelines.chunks import DiffuseChunk, chunk_interrupt, chunk_steps
from trident.pipelines.meta import stage_components
from trident.pipelines.parallel import AgreedCancel, broadcast_inputs, diffuse_context
from trident.pipelines.weights import StageTensors, build_modules, module_components, stage_tensors

__all__ = [
    "PER_MEMBER_PARAMS",
    "STAGES",
    "FamilyStages",
    "StageCancelled",
    "check_cancel",
    "drop_none",
    "poll_flag",
    "step_end_canceller",
    "to_numpy_output",
]

STAGES: tuple[StageName, ...] = ("encode", "diffuse", "decode")


def drop_none(**tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Stage outputs are flat tensor dicts without ``None`` values."""
    return {k: v for k, v in tensors.items() if v is not None}


def to_numpy_output(array: Any) -> dict[str, torch.Tensor]:
    """Wrap diffusers' ``output_type="np"`` array for one request as the decode output."""
    return {"output": torch.from_numpy(array[0]).to(torch.float32)}


def check_cancel(cancel: threading.Event | None, where: str) -> None:
    """Raise :class:`StageCancelled` if ``cancel`` is set (``where``: for the message)."""
    if cancel is not None and cancel.is_set():
        raise StageCancelled(f"cancelled {where}")


def poll_flag(cancel: threading.Event | None) -> tuple[bool, bool]:
    """(cancel, yield) as a task's flag says them now. A flag with ``poll()`` answers both
    (the worker's progress flag; a degree-k group's agreed flag, as one collective);
    a plain event can only cancel."""
    if cancel is None:
        return False, False
    poll = getattr(cancel, "poll", None)
    if poll is not None:
        cancelled, yield_now = poll()
        return bool(cancelled), bool(yield_now)
    return cancel.is_set(), False


def step_end_canceller(
    cancel: threading.Event | None, total: int | None = None, chunk: DiffuseChunk | None = None
) -> Any:
    """A diffusers ``callback_on_step_end`` that stops the denoising loop once ``cancel``
    is set. Otherwise it returns the step's tensors as given (the pipeline pops them back
    unchanged), so a run with the flag unset is bit-exact with one without the callback.

    A flag with a ``report_step(step, total)`` method (the worker's progress flag) also
    hears each finished step: ``step`` of ``total`` (the pipeline's own count of
    timesteps when it has one, else ``total``). A report that raises is ignored: progress
    never breaks a request.

    ``chunk``: the call runs steps ``[start, stop)`` of a resumable diffuse
    (:mod:`trident.pipelines.chunks`); the callback ends it after its last step, or after
    the current one when the flag asks for a yield."""
    report = getattr(cancel, "report_step", None)

    def on_step_end(
        pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        cancelled, yield_now = poll_flag(cancel)
        if cancelled:
            raise StageCancelled(f"cancelled after denoising step {step + 1}")
        if report is not None:
            try:
                steps = int(getattr(pipe, "num_timesteps", 0) or total or step + 1)
                report(step + 1, max(steps, step + 1))
            except Exception:  # advisory only
                pass
        if chunk is not None:
            chunk.step_done(pipe, step, yield_now)
        return callback_kwargs

    return on_step_end


class FamilyStages:
    """Implements :class:`trident.pipelines.api.PipelineStages` for one family."""

    #: Names of params read by ``run`` besides the common ones (documentation only).
    family_params: tuple[str, ...] = ()

    def __init__(
        self, meta: ModelMeta, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.meta = meta
        self.device = device
        self.dtype = dtype
        self._root = Path(meta.path)
        with (self._root / "model_index.json").open() as f:
            self._components: dict[str, Any] = {
                k: v for k, v in json.load(f).items() if not k.startswith("_")
            }
        self._pipes: dict[StageName, Any] = {}
        self._lock = threading.Lock()  # load/unload may come from a loader thread
        # The diffuse call now running (one per thread): its chunk of the steps.
        self._running = threading.local()

    # ------------------------------------------------------------------ loading
    def _pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.meta.pipeline_class)

    def load(self, stage: StageName, weights: StageTensors | None = None) -> float:
        """Make ``stage``'s weights resident; returns seconds spent (0 if already).

        ``weights``: the stage's tensors from a device that holds it
        (:meth:`stage_tensors`, moved by the runtime); the modules are built from their
        configs around those tensors instead of reading the weight files
        (:mod:`trident.pipelines.weights`; raises its ``WeightsError`` if they do not
        fit)."""
        self._check_stage(stage)
        with self._lock:
            if stage in self._pipes:
                return 0.0
            t0 = time.perf_counter()
            self._pipes[stage] = self._build(stage, weights)
            return time.perf_counter() - t0

    def rebase(self, stage: StageName, weights: StageTensors) -> bool:
        """A loaded ``stage`` swapped for one built around ``weights`` (the same values:
        a shared copy of its own tensors), so its private copy can go. A call running on
        the old modules finishes on them. False if ``stage`` is no longer loaded."""
        self._check_stage(stage)
        pipe = self._build(stage, weights)
        with self._lock:
            if stage not in self._pipes:
                return False
            self._pipes[stage] = pipe
            return True

    def _build(self, stage: StageName, weights: StageTensors | None) -> Any:
        names = stage_components(self._components, stage)
        keep = set(names)
        absent: dict[str, Any] = {name: None for name in self._components if name not in keep}
        if weights is not None:
            absent.update(build_modules(self._root, self._components, names, weights, self.dtype))
        pipe = self._pipeline_class().from_pretrained(self._root, dtype=self.dtype, **absent)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._configure(pipe)
        return pipe

    def unload(self, stage: StageName) -> None:
        self._check_stage(stage)
        with self._lock:
            pipe = self._pipes.pop(stage, None)
        if pipe is not None and str(self.device).startswith("cuda"):
            del pipe
            torch.cuda.empty_cache()

    def loaded(self) -> set[StageName]:
        return set(self._pipes)

    def stage_tensors(self, stage: StageName) -> StageTensors:
        """Every tensor of a loaded ``stage``'s modules (for a peer's :meth:`load`)."""
        self._check_stage(stage)
        pipe = self._pipes[stage]
        return stage_tensors(module_components(pipe, stage_components(self._components, stage)))

    def _pipe(self, stage: StageName) -> Any:
        if stage not in self._pipes:
            self.load(stage)  # the runtime normally loads first; be forgiving
        return self._pipes[stage]

    @staticmethod
    def _check_stage(stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")

    def _configure(self, pipe: Any) -> None:
        """Restore the VAE factors a ``vae=None`` pipeline lost (see module doc)."""

    # ------------------------------------------------------------------ running
    def run(
        self,
        stage: StageName,
        inputs: Mapping[str, torch.Tensor] | None,
        params: Mapping[str, Any],
        options: Mapping[str, Any] | None = None,
        parallel: ParallelContext | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run one stage for one request (see :mod:`trident.pipelines.api`).

        ``cancel``: checked before the stage and after every denoising step; once set the
        call raises :class:`StageCancelled`. A flag whose ``poll()`` asks for a yield ends
        a diffuse after the current step with its state (:mod:`trident.pipelines.chunks`).

        ``options["diffuse_steps"] = [start, stop]``: run only those denoising steps; from
        a ``start`` > 0 the inputs are the previous chunk's state. A chunk that ends
        before the last step returns state for the next one, not finished latents.
        """
        self._check_stage(stage)
        if stage == "diffuse" and parallel is not None:
            # Degree k: every rank reads the flag collectively, so all stop at one step.
            cancel = AgreedCancel(cancel, parallel)
        check_cancel(cancel, f"before {stage}")
        pipe = self._pipe(stage)
        with torch.no_grad():
            if stage == "encode":
                return self._encode(pipe, params)
            if stage == "diffuse":
                # Degree k: rank 0 holds the inputs, the others receive them here.
                tensors = broadcast_inputs(inputs, parallel)
                tensors = {k: v.to(self.device) for k, v in tensors.items()}
                chunk = DiffuseChunk.begin(
                    tensors, chunk_steps(options) or (0, None), self.num_steps(params)
                )
                return self._run_chunk(pipe, chunk, tensors, params, parallel, cancel=cancel)
            if inputs is None:
                raise InvalidRequestError("decode needs the diffuse stage's output")
            tensors = {k: v.to(self.device) for k, v in inputs.items()}
            return self._decode_with_options(pipe, tensors, params, options or {})

    def run_batch(
        self,
        stage: StageName,
        inputs: Sequence[Mapping[str, torch.Tensor] | None],
        params: Sequence[Mapping[str, Any]],
        options: Mapping[str, Any] | None = None,
        parallel: ParallelContext | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Run one stage for several same-shape requests (see :mod:`trident.pipelines.api`).

        Encode and decode run member by member (bit-exact); diffuse is one pipeline call on
        the members' inputs concatenated along dim 0, one generator per member. A batch of
        one is exactly :meth:`run`. ``cancel`` stops the whole call (:class:`StageCancelled`)
        before a member starts or between denoising steps.
        """
        self._check_stage(stage)
        if len(inputs) != len(params):
            raise InvalidRequestError(
                f"batch has {len(inputs)} inputs but {len(params)} params; expected one each"
            )
        if not params:
            return []
        if len(params) == 1:
            return [self.run(stage, inputs[0], params[0], options, parallel, cancel=cancel)]
        self._check_batch(inputs, params)
        if stage != "diffuse":
            return [
                self.run(stage, x, p, options, cancel=cancel)
                for x, p in zip(inputs, params, strict=True)
            ]
        check_cancel(cancel, "before diffuse")
        if parallel is not None and parallel.world_size > 1:
            raise InvalidRequestError("batched diffuse runs at degree 1")
        pipe = self._pipe(stage)
        members = [dict(x or {}) for x in inputs]
        with torch.no_grad():
            tensors = {k: torch.cat([m[k].to(self.device) for m in members]) for k in members[0]}
            seeds = [self.seed(p) for p in params]
            # A batch runs all its steps in one call (no chunks, no yield).
            chunk = DiffuseChunk(0, None, self.num_steps(params[0]), can_yield=False)
            out = self._run_chunk(pipe, chunk, tensors, params[0], parallel, seeds, cancel)
        n = len(params)
        split: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
        for name, value in out.items():
            if value.shape[0] != n:
                raise RuntimeError(
                    f"{self.meta.family}: batched diffuse output {name!r} has batch "
                    f"{value.shape[0]}, expected {n}"
                )
            # Clone: a view would keep the whole batch's storage alive as long as any one
            # member's output is held (members finish and leave at different times).
            for i, piece in enumerate(value.split(1)):
                split[i][name] = piece.clone()
        return split

    def _run_chunk(
        self,
        pipe: Any,
        chunk: DiffuseChunk,
        tensors: dict[str, torch.Tensor],
        params: Mapping[str, Any],
        parallel: ParallelContext | None,
        seeds: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, torch.Tensor]:
        """The family's diffuse over ``chunk``'s steps (the whole loop for a plain one)."""
        self._running.chunk = chunk
        try:
            with diffuse_context(pipe, self.meta, parallel), chunk_interrupt(pipe, chunk):
                out = self._diffuse(pipe, tensors, params, seeds=seeds, cancel=cancel)
            chunk.check_ran()
            return out
        finally:
            self._running.chunk = None

    def num_steps(self, params: Mapping[str, Any]) -> int:
        """The request's denoising steps (the model's default when not given)."""
        return int(params.get("num_inference_steps") or self.meta.default_steps)

    def paused(self, pipe: Any, latents: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Families call this on ``__call__``'s latents before their own post-processing:
        the chunk's state when the call stopped before the last step (a chunk end or a
        yield), else None (finish as usual)."""
        chunk: DiffuseChunk | None = getattr(self._running, "chunk", None)
        if chunk is None or not chunk.partial:
            return None
        return chunk.output(pipe, latents)

    @staticmethod
    def _check_batch(
        inputs: Sequence[Mapping[str, torch.Tensor] | None], params: Sequence[Mapping[str, Any]]
    ) -> None:
        """Raise :class:`InvalidRequestError` unless the members can share one call."""
        first = params[0]
        keys = set().union(*(p.keys() for p in params))
        for key in sorted(keys):
            if key in PER_MEMBER_PARAMS:
                if (
                    key.startswith("negative_prompt")
                    and len({p.get(key) is None for p in params}) > 1
                ):
                    raise InvalidRequestError(
                        f"batch members differ in whether {key} is given; they cannot share a call"
                    )
                continue
            for i, p in enumerate(params[1:], start=1):
                if p.get(key) != first.get(key):
                    raise InvalidRequestError(
                        f"batch members differ in {key} ({first.get(key)!r} vs "
                        f"{p.get(key)!r} for member {i}); only prompts and seeds may differ"
                    )
        ref = dict(inputs[0] or {})
        for i, x in enumerate(inputs[1:], start=1):
            member = dict(x or {})
            if set(member) != set(ref):
                raise InvalidRequestError(
                    f"batch member {i} has inputs {sorted(member)}, member 0 {sorted(ref)}"
                )
            for name, t in member.items():
                if t.shape[1:] != ref[name].shape[1:] or t.dtype != ref[name].dtype:
                    raise InvalidRequestError(
                        f"batch member {i}'s {name} is {t.dtype} {tuple(t.shape)}, member 0's "
                        f"{ref[name].dtype} {tuple(ref[name].shape)}: shapes must match "
                        "beyond dim 0"
                    )

    def _decode_with_options(
        self,
        pipe: Any,
        inputs: dict[str, torch.Tensor],
        params: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> dict[str, torch.Tensor]:
        # VAE tiling/slicing lower decode's activation peak for one call; tiling changes
        # pixels slightly at tile seams (blended overlaps), slicing does not for batch 1.
        vae = pipe.vae
        tiling = bool(options.get("vae_tiling", False))
        slicing = bool(options.get("vae_slicing", False))
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()
        try:
            return self._decode(pipe, inputs, params)
        finally:
            if tiling:
                vae.disable_tiling()
            if slicing:
                vae.disable_slicing()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def call_default(pipe: Any, name: str) -> Any:
        """Default of ``name`` in the pipeline's ``__call__`` (what a whole-pipeline call uses)."""
        return inspect.signature(type(pipe).__call__).parameters[name].default

    def max_sequence_length(self, pipe: Any, params: Mapping[str, Any]) -> int:
        value = params.get("max_sequence_length")
        return (
            int(value) if value is not None else int(self.call_default(pipe, "max_sequence_length"))
        )

    @staticmethod
    def prompt(params: Mapping[str, Any], key: str = "prompt") -> str | None:
        value = params.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"{key} must be a string, got {type(value).__name__}")
        return value

    def guidance(self, params: Mapping[str, Any]) -> float:
        value = params.get("guidance_scale")
        return float(value) if value is not None else float(self.meta.default_guidance_scale)

    @staticmethod
    def seed(params: Mapping[str, Any]) -> int:
        """The request's seed; absent or ``None`` means 0."""
        value = params.get("seed")
        return int(value) if value is not None else 0

    @classmethod
    def generator(cls, params: Mapping[str, Any]) -> torch.Generator:
        # seed=S means torch.Generator("cpu").manual_seed(S), whatever the device.
        return torch.Generator("cpu").manual_seed(cls.seed(params))

    def diffuse_kwargs(
        self,
        pipe: Any,
        params: Mapping[str, Any],
        seeds: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Arguments common to every family's ``__call__`` in the diffuse stage.

        ``seeds``: a batch's seeds, one per member; diffusers draws each member's initial
        noise from its own generator, so a member starts from the same noise as alone.
        ``cancel``: adds a ``callback_on_step_end`` that raises :class:`StageCancelled`
        between denoising steps once the flag is set (none when ``cancel`` is ``None``).
        """
        generator: torch.Generator | list[torch.Generator] = (
            [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
            if seeds is not None
            else self.generator(params)
        )
        chunk: DiffuseChunk | None = getattr(self._running, "chunk", None)
        if chunk is not None:
            # A resumed chunk continues the random streams where the last one stopped.
            chunk.seed_generators(generator if isinstance(generator, list) else [generator])
        kwargs: dict[str, Any] = {
            "height": params.get("height"),
            "width": params.get("width"),
            "num_inference_steps": self.num_steps(params),
            "guidance_scale": self.guidance(params),
            "generator": generator,
            "output_type": "latent",
            "return_dict": False,
        }
        if self.meta.is_video:
            kwargs["num_frames"] = params.get("num_frames") or self.meta.default_num_frames
        call_params = inspect.signature(type(pipe).__call__).parameters
        if "max_sequence_length" in call_params:
            kwargs["max_sequence_length"] = self.max_sequence_length(pipe, params)
        needs_callback = cancel is not None or (chunk is not None and not chunk.whole)
        if needs_callback and "callback_on_step_end" in call_params:
            # (Every served family's pipeline has it; one without would be cancellable
            # only between stages, and could not run in chunks.)
            kwargs["callback_on_step_end"] = step_end_canceller(
                cancel, kwargs["num_inference_steps"], chunk
            )
        elif chunk is not None and not chunk.whole:
            raise InvalidRequestError(f"{self.meta.family} cannot run its diffuse in chunks")
        return {k: v for k, v in kwargs.items() if v is not None}

    @staticmethod
    def require(inputs: Mapping[str, torch.Tensor], *names: str) -> None:
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InvalidRequestError(
                f"stage input lacks {', '.join(missing)} (was encode run with the same guidance?)"
            )

    # ------------------------------------------------------------------ family hooks
    def _encode(self, pipe: Any, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _diffuse(
        self,
        pipe: Any,
        inputs: dict[str, torch.Tensor],
        params: Mapping[str, Any],
        seeds: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode(
        self, pipe: Any, inputs: dict[str, torch.Tensor], params: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError
