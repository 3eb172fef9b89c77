"""A stage built around another pipeline object's tensors (a peer weight copy,
``trident.pipelines.weights``) runs exactly like one loaded from the model directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.pipelines.conftest import STEPS, TEST_SHAPES
from trident.pipelines import open_pipeline
from trident.pipelines.weights import StageTensors, WeightsError

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "cogvideox", "hunyuanvideo"])
def test_every_stage_built_from_peer_tensors_gives_the_same_output(
    tiny_model_dir: Callable[[str], Path], family: str
) -> None:
    d = tiny_model_dir(family)
    disk, peer = open_pipeline(d), open_pipeline(d)
    for stage in ("encode", "diffuse", "decode"):
        disk.load(stage)
        peer.load(stage, weights=disk.stage_tensors(stage))
    params = {"prompt": "a fox", "num_inference_steps": STEPS, "seed": 3, **TEST_SHAPES[family]}
    a = disk.run("decode", disk.run("diffuse", disk.run("encode", {}, params), params), params)
    b = peer.run("decode", peer.run("diffuse", peer.run("encode", {}, params), params), params)
    assert np.asarray(a["output"]).tobytes() == np.asarray(b["output"]).tobytes()


def test_tied_weights_stay_one_tensor_and_bfloat16_keeps_float32_modules(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    d = tiny_model_dir("flux")
    disk, peer = open_pipeline(d, dtype=torch.bfloat16), open_pipeline(d, dtype=torch.bfloat16)
    disk.load("encode")
    weights = disk.stage_tensors("encode")
    assert weights.aliases, "T5's shared embedding is tied to its encoder's"
    peer.load("encode", weights=weights)
    built = peer._pipes["encode"].text_encoder_2  # type: ignore[attr-defined]
    assert built.shared.weight is built.encoder.embed_tokens.weight
    ref = disk._pipes["encode"].text_encoder_2  # type: ignore[attr-defined]
    dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    assert {n: p.dtype for n, p in built.named_parameters()} == dtypes


def test_tensors_that_do_not_fit_the_config_are_refused(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    d = tiny_model_dir("flux")
    disk, peer = open_pipeline(d), open_pipeline(d)
    disk.load("decode")
    good = disk.stage_tensors("decode")
    name = next(iter(good.tensors))
    short = StageTensors(dict(good.tensors), dict(good.aliases))
    del short.tensors[name]
    with pytest.raises(WeightsError, match="missing"):
        peer.load("decode", weights=short)
    wrong = StageTensors(dict(good.tensors), dict(good.aliases))
    wrong.tensors[name] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match="shape"):
        peer.load("decode", weights=wrong)
    assert peer.loaded() == set()
