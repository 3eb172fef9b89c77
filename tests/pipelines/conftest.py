"""Shared fixtures for the pipeline tests: tiny models built once per session.

``tiny_model_dir("flux")`` returns the directory of a tiny random-weight Flux pipeline,
written on first use into the session's temporary directory and reused afterwards. Other
test packages can use it too: ``from tests.pipelines.conftest import TinyModels``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trident.pipelines.tiny import TINY_SHAPES

# Shapes and step counts the exactness tests run at (CogVideoX's VAE needs an odd number
# of latent frames to give back the requested frame count).
TEST_SHAPES: dict[str, dict[str, int]] = {
    **TINY_SHAPES,
    "cogvideox": {"height": 32, "width": 32, "num_frames": 9},
}
STEPS = 2


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the 2-core test machine is shared, and OpenMP's spinning threads
    slow tiny models down ~10x under contention. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyModels:
    """Builds each family's tiny model at most once, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, Path] = {}

    def __call__(self, family: str) -> Path:
        if family not in self._dirs:
            from trident.pipelines.tiny import make_tiny_model

            self._dirs[family] = make_tiny_model(family, self.root / family, seed=0)
        return self._dirs[family]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family) -> Path``: a cached tiny pipeline directory."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


def diffusers_reference(model_dir: Path, seed: int, **kwargs: Any) -> Any:
    """The whole diffusers pipeline's ``output_type="np"`` result for one request."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs, output_type="np", generator=torch.Generator("cpu").manual_seed(seed))
    return out.images[0] if hasattr(out, "images") else out.frames[0]
