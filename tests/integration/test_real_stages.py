"""Real diffusers stages through the real daemons: scheduler + trident-node --devices cpu:N.

Every family's tiny pipeline, one request each, the three stages spread over worker
processes (tensors through the wire protocol), must give the same pixels as the
diffusers pipeline called whole with the same seed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.pipelines.conftest import STEPS, TEST_SHAPES, TinyModels, diffusers_reference
from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.errors import InvalidRequestError

FAMILIES = ("flux", "sd3", "wan", "cogvideox", "hunyuanvideo")
GUIDANCE = {"flux": 3.5, "sd3": 4.0, "wan": 5.0, "cogvideox": 6.0, "hunyuanvideo": 6.0}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    models = TinyModels(tmp_path_factory.mktemp("tiny"))
    return {f: models(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def cpu_cluster(
    tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        [f"tiny-{f}={d}" for f, d in tiny_dirs.items()],
        [NodeSpec("cpu:2", node_id="c", threads=1)],
        log_dir=tmp_path_factory.mktemp("cpu-cluster"),
        startup_timeout=180,
    )
    with cluster:
        yield cluster


def test_every_family_matches_the_whole_diffusers_pipeline(
    cpu_cluster: LocalCluster, tiny_dirs: dict[str, Path]
) -> None:
    import torch

    torch.set_num_threads(1)  # the workers run with one thread too

    def request(family: str, seed: int) -> dict:
        return dict(
            prompt=f"a tiny {family} test",
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE[family],
            **TEST_SHAPES[family],
        )

    async def run() -> list:
        async with AsyncClient(cpu_cluster.client_addr, timeout=240) as c:
            return await asyncio.gather(
                *(
                    c.generate(model=f"tiny-{f}", seed=11 + i, **request(f, 11 + i))
                    for i, f in enumerate(FAMILIES)
                )
            )

    results = asyncio.run(run())
    stage_devices = set()
    for i, (family, res) in enumerate(zip(FAMILIES, results, strict=True)):
        ref = diffusers_reference(tiny_dirs[family], 11 + i, **request(family, 11 + i))
        assert res.array.shape == ref.shape, family
        diff = float(np.abs(res.array - ref).max())
        assert diff <= 1e-5, f"{family}: max abs diff {diff}"
        stage_devices.add(tuple(tuple(res.devices[s]) for s in ("encode", "diffuse", "decode")))
    # the two devices both took part
    assert {d for devs in stage_devices for group in devs for d in group} == {"c/cpu:0", "c/cpu:1"}


def test_bad_shapes_for_a_real_model_are_refused_at_submission(cpu_cluster: LocalCluster) -> None:
    async def run() -> None:
        async with AsyncClient(cpu_cluster.client_addr, timeout=60) as c:
            with pytest.raises(InvalidRequestError):
                await c.generate(
                    model="tiny-flux", prompt="x", height=30, width=32, num_inference_steps=2
                )
            with pytest.raises(InvalidRequestError):
                await c.generate(
                    model="tiny-wan",
                    prompt="x",
                    height=32,
                    width=32,
                    num_frames=6,
                    num_inference_steps=2,
                )
            with pytest.raises(InvalidRequestError):
                await c.generate(
                    model="tiny-wan",
                    prompt="x",
                    height=32,
                    width=32,
                    num_frames=100_000,
                    num_inference_steps=2,
                )
            # still serving
            r = await c.generate(
                model="tiny-flux", prompt="x", height=32, width=32, num_inference_steps=2, seed=1
            )
            assert r.array.shape == (32, 32, 3)

    asyncio.run(run())
