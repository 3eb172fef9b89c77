"""A request run through the three stages gives diffusers' own pixels.

Each stage runs on its own ``open_pipeline`` object (as on three different workers), with
only that stage's components loaded, and is compared with the whole diffusers pipeline
called with the same seed and ``output_type="np"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.pipelines.conftest import STEPS, TEST_SHAPES, diffusers_reference
from trident.pipelines import open_pipeline

TOL = 1e-5

CASES: list[tuple[str, dict[str, Any]]] = [
    ("flux", {}),
    ("flux", {"negative_prompt": "blurry", "true_cfg_scale": 2.0}),
    ("sd3", {"negative_prompt": "blurry", "guidance_scale": 5.0}),
    ("sd3", {"guidance_scale": 1.0}),
    ("wan", {"negative_prompt": "blurry", "guidance_scale": 5.0}),
    ("wan", {"guidance_scale": 1.0}),
    ("cogvideox", {"negative_prompt": "blurry", "guidance_scale": 6.0}),
    ("hunyuanvideo", {}),
    ("hunyuanvideo", {"negative_prompt": "blurry", "true_cfg_scale": 2.0}),
]


def run_three_stages(model_dir: Path, params: dict[str, Any]) -> np.ndarray:
    encode, diffuse, decode = (open_pipeline(model_dir) for _ in range(3))
    emb = encode.run("encode", {}, params)
    lat = diffuse.run("diffuse", emb, params)
    out = decode.run("decode", lat, params)
    assert set(out) == {"output"}
    assert {s.loaded().pop() for s in (encode, diffuse, decode)} == {"encode", "diffuse", "decode"}
    return out["output"].numpy()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("family", "extra"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)]
)
def test_stages_match_whole_pipeline(
    tiny_model_dir: Callable[[str], Path], family: str, extra: dict[str, Any]
) -> None:
    model_dir = tiny_model_dir(family)
    request = {
        "prompt": "a red fox in the snow",
        "num_inference_steps": STEPS,
        **TEST_SHAPES[family],
        **extra,
    }
    expected = diffusers_reference(model_dir, seed=11, **request)
    got = run_three_stages(model_dir, {**request, "seed": 11})
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_seed_and_prompt_change_the_output(
    tiny_model_dir: Callable[[str], Path], family: str
) -> None:
    stages = open_pipeline(tiny_model_dir(family))
    base = {"prompt": "a red fox", "num_inference_steps": STEPS, **TEST_SHAPES[family]}

    def image(**change: Any) -> np.ndarray:
        params = {**base, "seed": 1, **change}
        lat = stages.run("diffuse", stages.run("encode", {}, params), params)
        return stages.run("decode", lat, params)["output"].numpy()

    first = image()
    assert np.array_equal(first, image())  # same request, same pixels
    assert np.abs(first - image(seed=2)).max() > 1e-3
    assert np.abs(first - image(prompt="a blue whale")).max() > 1e-4
