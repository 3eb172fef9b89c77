"""The contract between the runtime (workers) and the model adapters.

A worker process opens a served pipeline with :func:`trident.pipelines.open_pipeline`
and runs its stages through the :class:`PipelineStages` protocol below. Everything that
crosses a process boundary is a flat ``dict[str, torch.Tensor]`` (the runtime's wire
protocol carries the tensors as zero-copy frames) plus JSON-like ``params``.

Stage contract (all families):

- ``encode``:  inputs ``{}``; params ``prompt``, ``negative_prompt``, ``guidance_scale``
  (and any family-specific knobs); returns the embeddings the diffuse stage needs.
- ``diffuse``: inputs = encode's output; params ``height``, ``width``, ``num_frames``
  (videos), ``num_inference_steps``, ``guidance_scale``, ``seed``; returns
  ``{"latents": ...}`` (plus whatever decode needs).
- ``decode``:  inputs = diffuse's output; returns ``{"output": float32 tensor}`` laid out
  exactly as diffusers' ``output_type="np"`` for one request: ``images[0]`` (H, W, 3) or
  ``frames[0]`` (F, H, W, 3).

``seed=S`` means ``generator=torch.Generator("cpu").manual_seed(S)`` in diffusers. A
request run through the three stages returns the same pixels as the pipeline called
whole with ``output_type="np"``.

Batches (``run_batch``; image families): several same-shape requests whose params
differ only in per-request values (prompt(s), negative prompt(s), seed) run one stage
together. Diffuse is one call: the members' encode outputs concatenated along dim 0,
one ``torch.Generator`` per member (so each member starts from the same noise as
alone), the output split back per member. Encode and decode run member by member and
stay bit-exact; a batched diffuse matches the unbatched one within 1e-4 (measured
up to 3e-5 — matmuls of another batch size round differently).

Degree k > 1 (diffuse only): every rank of the instance calls ``run`` with the same
``params`` and its :class:`ParallelContext`; rank 0 passes the real inputs, the other
ranks pass ``None`` and obtain them from rank 0 through the group. Only rank 0's return
value is used.

Cancellation: ``run`` and ``run_batch`` take an optional ``cancel`` flag (a
``threading.Event``). It is checked before the stage starts and, in diffuse, after every
denoising step (diffusers' ``callback_on_step_end``, which returns the step's tensors
unchanged, so outputs are bit-exact); once it is set the call raises
:class:`StageCancelled`. At degree k every rank checks its own flag.

Progress: a flag that also has a ``report_step(step, total)`` method hears every finished
denoising step of diffuse (from the same callback; a report that raises is ignored).
The worker's flag throttles and forwards it (``task_progress``); nothing else changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

# Params the members of one batch may differ in (a family fact; the scheduler uses it too).
from trident.families import PER_MEMBER_PARAMS, Stage

if TYPE_CHECKING:  # torch is heavy: simulated workers and the scheduler never import it
    import threading

    import torch

__all__ = [
    "PER_MEMBER_PARAMS",
    "ModelMeta",
    "ParallelContext",
    "PipelineStages",
    "StageCancelled",
    "StageName",
]

StageName: TypeAlias = Stage  # "encode", "diffuse", "decode"


class StageCancelled(Exception):
    """A stage stopped because its ``cancel`` flag was set (before it started or between
    two denoising steps); nothing went wrong with the model or the device."""


@dataclass(frozen=True)
class ModelMeta:
    """What can be known about a diffusers directory without importing torch.

    Read from ``model_index.json`` and the component configs; used by the scheduler to
    register a model and validate requests before any worker sees them.
    """

    path: str
    family: str  # a name in trident.families.FAMILIES
    pipeline_class: str  # model_index.json "_class_name"
    is_video: bool
    vae_scale_factor_spatial: int
    vae_scale_factor_temporal: int = 1  # videos: num_frames must be 1 + k * this
    # Height/width must be multiples of this (VAE factor x transformer patch size, and
    # what the pipeline's check_inputs demands: 16 for wan and hunyuanvideo).
    size_multiple: int = 16
    # Most frames this model can make: the family's cap or what its transformer's
    # positional table covers, whichever is lower (on the 1 + k * t rule).
    max_frames: int | None = None
    # The pipeline's num_frames default, within max_frames.
    default_num_frames: int | None = None
    default_steps: int = 28
    default_guidance_scale: float = 3.5
    uses_cfg: bool = True  # whether guidance_scale > 1 runs an unconditional branch
    context_parallel: bool = False  # diffusers has a _cp_plan for its transformer
    # On-disk bytes of each stage's components (encode: text encoders, diffuse:
    # transformer, decode: vae).
    stage_weight_bytes: Mapping[str, int] = field(default_factory=dict)
    # Of those, the floating-point tensors of each stage's ``*.safetensors`` files (read
    # from their headers): elements and stored bytes. Loading in another dtype changes
    # these bytes only (:func:`trident.pipelines.meta.stage_weight_bytes_as`).
    stage_float_elements: Mapping[str, int] = field(default_factory=dict)
    stage_float_bytes: Mapping[str, int] = field(default_factory=dict)
    # Largest height / width the transformer's positional table covers (None: any).
    max_side: int | None = None
    # Why max_frames ("num_frames") / max_side ("side") are what they are, where the model
    # (not the family) sets them; for error messages.
    limit_notes: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ParallelContext:
    """An instance's process group, as seen from one rank."""

    rank: int
    world_size: int
    group: Any  # torch.distributed.ProcessGroup
    backend: str = "gloo"


class PipelineStages(Protocol):
    """One served pipeline opened on one device."""

    meta: ModelMeta
    device: str  # "cpu", "cuda:0"

    def load(self, stage: StageName) -> float:
        """Make ``stage``'s weights resident; returns seconds spent (0 if already)."""
        ...

    def unload(self, stage: StageName) -> None: ...

    def loaded(self) -> set[StageName]: ...

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
        """Run one stage for one request. ``options``: e.g. ``{"vae_tiling": True}``.
        Raises :class:`StageCancelled` once ``cancel`` is set (checked between steps)."""
        ...

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
        """Run one stage for several requests (``inputs[i]`` and ``params[i]`` are member
        i's); returns one output dict per member, in order. Raises
        :class:`trident.errors.InvalidRequestError` when the members cannot share a call
        (different shapes or shared params), :class:`StageCancelled` once ``cancel`` is set
        (the whole call stops)."""
        ...
