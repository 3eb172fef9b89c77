"""Degree-k diffuse: process groups, input broadcast, context/CFG parallel transformer.

STUB — owned by the degree-k helper; the family adapters call exactly these two seams:

    inputs = broadcast_inputs(inputs, parallel)          # rank>0 passes None
    with diffuse_context(pipe, meta, parallel):          # no-op when parallel is None
        latents = pipe(..., output_type="latent")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from trident.pipelines.api import ModelMeta, ParallelContext

if TYPE_CHECKING:
    import torch

__all__ = ["broadcast_inputs", "diffuse_context", "join_group", "leave_group"]


def join_group(
    rendezvous: str, group_key: str, rank: int, world_size: int, backend: str = "gloo"
) -> ParallelContext:
    """Join (or create) the process group ``group_key`` of ``world_size`` ranks.

    ``rendezvous`` is ``"tcp://HOST:PORT"`` of a torch TCPStore hosted by rank 0.
    """
    raise NotImplementedError("degree k > 1 is not implemented yet")


def leave_group(ctx: ParallelContext) -> None:
    raise NotImplementedError("degree k > 1 is not implemented yet")


def broadcast_inputs(
    inputs: Mapping[str, torch.Tensor] | None, parallel: ParallelContext | None
) -> dict[str, torch.Tensor]:
    if parallel is None:
        assert inputs is not None
        return dict(inputs)
    raise NotImplementedError("degree k > 1 is not implemented yet")


@contextlib.contextmanager
def diffuse_context(pipe: Any, meta: ModelMeta, parallel: ParallelContext | None) -> Iterator[None]:
    if parallel is None:
        yield
        return
    raise NotImplementedError("degree k > 1 is not implemented yet")
