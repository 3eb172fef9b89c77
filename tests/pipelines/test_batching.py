"""``run_batch``: same-shape requests share one diffuse call and keep their own results.

Each member of a batched diffuse must give (after decode) the pixels it gets alone within
1e-4 (matmuls of another batch size round differently; measured on the tiny models: up to
1.1e-5 for wan, ~2e-6 for flux and sd3), start from its own seed's noise, and a batch of
one must be exactly ``run``. Encode and decode run member by member: bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.pipelines.conftest import STEPS, TEST_SHAPES
from trident.errors import InvalidRequestError
from trident.pipelines import ParallelContext, PipelineStages, open_pipeline

pytestmark = pytest.mark.timeout(120)

TOL = 1e-4

# (family, shared params): the image families with and without their guidance branch,
# and one video family with CFG.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("flux", {}),
    ("flux", {"true_cfg_scale": 2.0}),  # true CFG: every member has a negative prompt
    ("sd3", {"guidance_scale": 5.0}),  # diffusers concatenates negative + positive itself
    ("wan", {"guidance_scale": 5.0}),
]
# Member 0 and 2 share a prompt and differ only in seed.
MEMBERS: list[dict[str, Any]] = [
    {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "seed": 1},
    {"prompt": "a blue whale", "negative_prompt": "low quality", "seed": 2},
    {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "seed": 3},
]


def _params(family: str, shared: dict[str, Any], member: dict[str, Any]) -> dict[str, Any]:
    return {"num_inference_steps": STEPS, **TEST_SHAPES[family], **shared, **member}


def _decoded(stages: PipelineStages, latents: dict[str, torch.Tensor], params: Any) -> np.ndarray:
    return stages.run("decode", latents, params)["output"].numpy()


@pytest.mark.parametrize(
    ("family", "shared"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)]
)
def test_batched_diffuse_matches_each_member_alone(
    tiny_model_dir: Callable[[str], Path], family: str, shared: dict[str, Any]
) -> None:
    stages = open_pipeline(tiny_model_dir(family))
    params = [_params(family, shared, m) for m in MEMBERS]
    embeds = [stages.run("encode", {}, p) for p in params]

    batched = stages.run_batch("diffuse", embeds, params)

    assert len(batched) == len(MEMBERS)
    images = []
    for emb, p, got in zip(embeds, params, batched, strict=True):
        alone = stages.run("diffuse", emb, p)
        assert set(got) == set(alone)
        for name in alone:
            assert got[name].shape == alone[name].shape  # split back to one request
        image = _decoded(stages, got, p)
        assert np.abs(image - _decoded(stages, alone, p)).max() <= TOL
        images.append(image)
    # Same prompt, other seed: each member drew its own initial noise.
    assert np.abs(images[0] - images[2]).max() > 1e-3
    assert np.abs(images[0] - images[1]).max() > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_batch_of_one_is_run(tiny_model_dir: Callable[[str], Path], family: str) -> None:
    stages = open_pipeline(tiny_model_dir(family))
    params = _params(family, {"guidance_scale": 5.0} if family != "flux" else {}, MEMBERS[1])
    emb = stages.run("encode", {}, params)
    lat = stages.run("diffuse", emb, params)
    out = stages.run("decode", lat, params)
    for stage, inputs, expected in (
        ("encode", {}, emb),
        ("diffuse", emb, lat),
        ("decode", lat, out),
    ):
        (got,) = stages.run_batch(stage, [inputs], [params])  # type: ignore[arg-type]
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), stage


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_batched_encode_and_decode_are_per_member_runs(
    tiny_model_dir: Callable[[str], Path], family: str
) -> None:
    stages = open_pipeline(tiny_model_dir(family))
    shared = {"guidance_scale": 5.0} if family != "flux" else {}
    params = [_params(family, shared, m) for m in MEMBERS]

    embeds = stages.run_batch("encode", [{}] * len(params), params)
    for emb, p in zip(embeds, params, strict=True):
        alone = stages.run("encode", {}, p)
        assert set(emb) == set(alone)
        assert all(torch.equal(emb[k], alone[k]) for k in alone)

    latents = [stages.run("diffuse", e, p) for e, p in zip(embeds, params, strict=True)]
    outputs = stages.run_batch("decode", latents, params)
    for lat, p, out in zip(latents, params, outputs, strict=True):
        assert torch.equal(out["output"], stages.run("decode", lat, p)["output"])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"height": 48}, "height"),
        ({"guidance_scale": 7.0}, "guidance_scale"),
        ({"num_inference_steps": STEPS + 1}, "num_inference_steps"),
        ({"negative_prompt": None}, "negative_prompt"),  # flux: true CFG on vs off
    ],
)
def test_members_must_share_params(
    tiny_model_dir: Callable[[str], Path], change: dict[str, Any], named: str
) -> None:
    stages = open_pipeline(tiny_model_dir("flux"))
    first = _params("flux", {"true_cfg_scale": 2.0}, MEMBERS[0])
    second = {**_params("flux", {"true_cfg_scale": 2.0}, MEMBERS[1]), **change}
    emb = stages.run("encode", {}, first)
    for stage, inputs in (("encode", [{}, {}]), ("diffuse", [emb, emb])):
        with pytest.raises(InvalidRequestError, match=named):
            stages.run_batch(stage, inputs, [first, second])  # type: ignore[arg-type]


def test_members_must_share_input_shapes(tiny_model_dir: Callable[[str], Path]) -> None:
    stages = open_pipeline(tiny_model_dir("sd3"))
    params = [_params("sd3", {"guidance_scale": 1.0}, m) for m in MEMBERS[:2]]
    emb = stages.run("encode", {}, params[0])
    shorter = {k: v[:, :-1] if k == "prompt_embeds" else v for k, v in emb.items()}
    with pytest.raises(InvalidRequestError, match="prompt_embeds"):
        stages.run_batch("diffuse", [emb, shorter], params)
    with pytest.raises(InvalidRequestError, match="inputs"):
        stages.run_batch("diffuse", [emb, {"prompt_embeds": emb["prompt_embeds"]}], params)
    with pytest.raises(InvalidRequestError, match="one each"):
        stages.run_batch("diffuse", [emb], params)


def test_batched_diffuse_runs_at_degree_one(tiny_model_dir: Callable[[str], Path]) -> None:
    stages = open_pipeline(tiny_model_dir("flux"))
    params = [_params("flux", {}, m) for m in MEMBERS[:2]]
    emb = stages.run("encode", {}, params[0])
    pair = ParallelContext(rank=0, world_size=2, group=None)
    with pytest.raises(InvalidRequestError, match="degree 1"):
        stages.run_batch("diffuse", [emb, emb], params, parallel=pair)
