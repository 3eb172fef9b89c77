"""The PipelineStages contract as a worker uses it: lazy loading, options, bad inputs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.pipelines.conftest import STEPS, TEST_SHAPES, diffusers_reference
from trident.errors import InvalidRequestError, ModelError
from trident.pipelines import open_pipeline


def _params(family: str, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": "a paper boat",
        "num_inference_steps": STEPS,
        "seed": 3,
        **TEST_SHAPES[family],
        **extra,
    }


@pytest.mark.timeout(60)
def test_load_is_lazy_and_idempotent(tiny_model_dir: Callable[[str], Path]) -> None:
    stages = open_pipeline(tiny_model_dir("sd3"))
    assert stages.loaded() == set()
    assert stages.meta.family == "sd3" and stages.device == "cpu"
    assert stages.load("decode") > 0
    assert stages.load("decode") == 0.0
    assert stages.loaded() == {"decode"}
    stages.unload("decode")
    assert stages.loaded() == set()
    stages.unload("decode")  # unloading twice is harmless


@pytest.mark.timeout(60)
def test_each_stage_reads_only_its_own_weights(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """A device holding only <C> works from a directory without text encoders or transformer."""
    src = tiny_model_dir("flux")
    full = open_pipeline(src)
    params = _params("flux")
    latents = full.run("diffuse", full.run("encode", {}, params), params)

    decode_only = tmp_path / "decode-only"
    shutil.copytree(src, decode_only)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        for f in (decode_only / name).glob("*.safetensors"):
            f.unlink()
    stages = open_pipeline(decode_only)
    image = stages.run("decode", latents, params)["output"]
    assert stages.loaded() == {"decode"}
    expected = diffusers_reference(src, seed=3, **{k: v for k, v in params.items() if k != "seed"})
    assert np.abs(image.numpy() - expected).max() <= 1e-5
    with pytest.raises((OSError, ValueError, EnvironmentError)):
        stages.load("diffuse")  # its weights are gone: fails at load, not silently


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_vae_slicing_and_tiling_options(tiny_model_dir: Callable[[str], Path], family: str) -> None:
    stages = open_pipeline(tiny_model_dir(family))
    params = _params(family, height=64, width=64)
    latents = stages.run("diffuse", stages.run("encode", {}, params), params)
    plain = stages.run("decode", latents, params)["output"].numpy()
    # Slicing splits the batch: one request is one slice, so pixels are identical.
    sliced = stages.run("decode", latents, params, {"vae_slicing": True})["output"].numpy()
    assert np.array_equal(sliced, plain)
    # Tiling blends overlapping tiles: same shape, valid pixels, not necessarily identical.
    tiled = stages.run("decode", latents, params, {"vae_tiling": True})["output"].numpy()
    assert tiled.shape == plain.shape
    assert np.isfinite(tiled).all() and tiled.min() >= 0.0 and tiled.max() <= 1.0
    # The option applies to that call only.
    again = stages.run("decode", latents, params)["output"].numpy()
    assert np.array_equal(again, plain)


@pytest.mark.timeout(60)
def test_diffuse_without_negative_embeds_is_a_clear_error(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    stages = open_pipeline(tiny_model_dir("wan"))
    emb = stages.run("encode", {}, _params("wan", guidance_scale=1.0))  # no CFG: no negative
    assert "negative_prompt_embeds" not in emb
    with pytest.raises(InvalidRequestError, match="negative_prompt_embeds"):
        stages.run("diffuse", emb, _params("wan", guidance_scale=5.0))


@pytest.mark.timeout(60)
def test_stage_inputs_from_the_wire_are_read_only_and_that_is_fine(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    """Tensors rebuilt from frames are read-only numpy views; stages must not write to them."""
    from trident.runtime.serial import pack_tensors, unpack_tensors

    stages = open_pipeline(tiny_model_dir("sd3"))
    params = _params("sd3")
    emb = stages.run("encode", {}, params)
    meta, frames = pack_tensors(emb)
    wire = unpack_tensors(meta, [bytes(f) for f in frames], as_torch=True)
    lat = stages.run("diffuse", wire, params)
    meta, frames = pack_tensors(lat)
    out = stages.run(
        "decode", unpack_tensors(meta, [bytes(f) for f in frames], as_torch=True), params
    )
    direct = stages.run("decode", stages.run("diffuse", emb, params), params)
    assert np.array_equal(out["output"].numpy(), direct["output"].numpy())


def test_bad_arguments(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        open_pipeline(tmp_path)
    stages = open_pipeline(tiny_model_dir("flux"))
    with pytest.raises(ValueError, match="unknown stage"):
        stages.load("vae")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="prompt must be a string"):
        stages.run("encode", {}, {"prompt": 42})
    with pytest.raises(InvalidRequestError, match="decode needs"):
        stages.run("decode", None, {})
