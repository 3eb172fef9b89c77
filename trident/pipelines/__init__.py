"""Diffusers pipelines as three stages (encode, diffuse, decode).

Torch-free entry points (scheduler, simulated workers)::

    meta = inspect_model("/models/flux-dev")          # ModelMeta, raises ModelError
    validate_request(meta, height=1024, width=1024, num_frames=None,
                     num_inference_steps=28, guidance_scale=3.5)  # raises InvalidRequestError

Real workers::

    stages = open_pipeline("/models/flux-dev", device="cuda:0")
    stages.load("encode")
    emb = stages.run("encode", {}, {"prompt": "a cat"})
    lat = stages.run("diffuse", emb, {"height": 1024, "width": 1024, "seed": 0, ...})
    img = stages.run("decode", lat, {})["output"]  # == diffusers output_type="np" images[0]

Importing this package does not import torch; :func:`open_pipeline` does, lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trident.pipelines.api import (
    ModelMeta,
    ParallelContext,
    PipelineStages,
    StageCancelled,
    StageName,
)
from trident.pipelines.meta import FAMILIES, inspect_model, validate_request

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILIES",
    "ModelMeta",
    "ParallelContext",
    "PipelineStages",
    "StageCancelled",
    "StageName",
    "inspect_model",
    "open_pipeline",
    "validate_request",
]


def open_pipeline(
    path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
) -> PipelineStages:
    """Open the diffusers pipeline at ``path`` on ``device``; no weights load until ``load``.

    ``dtype`` defaults to ``torch.float32``. Raises :class:`trident.errors.ModelError` for a
    directory that is not a servable pipeline.
    """
    meta = inspect_model(path)
    import torch

    from trident.pipelines.families import ADAPTERS

    adapter: Any = ADAPTERS[meta.family]
    stages: PipelineStages = adapter(meta, device=device, dtype=dtype or torch.float32)
    return stages
