"""A model's own limits: its advertised defaults run, and what it cannot run is refused.

Issue #12: the tiny wan (rope_max_seq_len 32, VAE temporal factor 2) advertised
default_num_frames 81 (41 latent frames) while its rope table covers 32; every request
past 63 frames passed validation and failed inside the transformer with
``shape '[41, 1, 1, -1]' is invalid``. Validation now reads the limit from the
transformer config, and the advertised default is one the model can run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trident.config import ModelSpec
from trident.errors import InvalidRequestError
from trident.families import FAMILIES, FAMILY_NAMES, latent_frames
from trident.pipelines import inspect_model, open_pipeline, validate_request
from trident.runtime.registry import ServedModel, build_request_shape, register_models

VIDEO = [name for name, spec in FAMILIES.items() if spec.is_video]


def _served(path: Path, name: str = "m") -> ServedModel:
    return register_models([ModelSpec(name=name, path=str(path))])[name]


def _run_all_stages(path: Path, params: dict[str, Any]) -> Any:
    stages = open_pipeline(path)
    latents = stages.run("diffuse", stages.run("encode", {}, params), params)
    return stages.run("decode", latents, params)["output"]


def _wan_with_rope(src: Path, dst: Path, rope: int) -> Path:
    """A copy of the tiny wan whose transformer config says ``rope_max_seq_len=rope``
    (the rope table is a non-persistent buffer: the weights load unchanged)."""
    shutil.copytree(src, dst)
    cfg_path = dst / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_max_seq_len"] = rope
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", VIDEO)
def test_the_advertised_default_request_validates_and_runs(
    tiny_model_dir: Callable[[str], Path], family: str
) -> None:
    """``generate(model=..., prompt=...)`` with only the step count given: the registry
    fills the advertised defaults, validation accepts them, and all three stages run."""
    served = _served(tiny_model_dir(family))
    advertised = served.describe()
    assert advertised["default_num_frames"] == served.meta.default_num_frames
    params: dict[str, Any] = {"prompt": "x", "num_inference_steps": 1, "seed": 0}
    build_request_shape(served, params)
    n = params["num_frames"]
    assert n == advertised["default_num_frames"]
    assert n <= served.meta.max_frames
    out = _run_all_stages(tiny_model_dir(family), params)
    h, w = advertised["default_height"], advertised["default_width"]
    k = latent_frames(n, served.meta.vae_scale_factor_temporal) - 1
    # CogVideoX's VAE decodes latent frames in pairs: an odd k gives back 4(k+1) frames.
    frames = 4 * (k + 1) if family == "cogvideox" and k % 2 else n
    assert tuple(out.shape) == (frames, h, w, 3)


def test_the_tiny_wan_runs_its_familys_default(tiny_model_dir: Callable[[str], Path]) -> None:
    meta = inspect_model(tiny_model_dir("wan"))
    assert meta.default_num_frames == FAMILIES["wan"].default_num_frames == 81
    assert meta.max_frames == 127  # rope_max_seq_len 64: 64 latent frames at factor 2


@pytest.mark.timeout(120)
def test_a_model_whose_rope_table_is_short_advertises_a_default_it_can_run(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """The issue's model: rope_max_seq_len 32 at temporal factor 2 covers 63 frames."""
    path = _wan_with_rope(tiny_model_dir("wan"), tmp_path / "wan-rope32", 32)
    served = _served(path)
    assert served.meta.max_frames == 63
    assert served.describe()["default_num_frames"] == 63  # 81, brought within the limit
    for n in (61, 63):
        validate_request(served.meta, height=32, width=32, num_frames=n)
    for n in (65, 67, 71, 81):
        with pytest.raises(
            InvalidRequestError,
            match=rf"num_frames {n} exceeds the maximum of 63 for wan: .*rope_max_seq_len 32",
        ):
            build_request_shape(served, {"prompt": "x", "num_frames": n})
    params: dict[str, Any] = {"prompt": "x", "num_inference_steps": 1, "seed": 0}
    build_request_shape(served, params)
    assert params["num_frames"] == 63
    assert tuple(_run_all_stages(path, params).shape) == (63, 32, 32, 3)


@pytest.mark.parametrize(
    ("family", "num_frames", "maximum", "why"),
    [
        ("wan", 129, 127, "rope_max_seq_len 64"),  # the model's rope table
        ("wan", 301, 127, "rope_max_seq_len 64"),
        ("hunyuanvideo", 261, 257, None),  # the family's cap (rope computed per shape)
        ("cogvideox", 165, 161, None),
    ],
)
def test_over_limit_frames_are_refused_before_any_stage_runs(
    tiny_model_dir: Callable[[str], Path],
    family: str,
    num_frames: int,
    maximum: int,
    why: str | None,
) -> None:
    served = _served(tiny_model_dir(family))
    message = rf"num_frames {num_frames} exceeds the maximum of {maximum} for {family}"
    with pytest.raises(InvalidRequestError, match=message) as exc:
        build_request_shape(served, {"prompt": "x", "num_frames": num_frames})
    if why is not None:
        assert why in str(exc.value)
    # The largest frame count on the 1 + k*t rule within the limit validates.
    validate_request(served.meta, height=None, width=None, num_frames=maximum)


@pytest.mark.parametrize(
    ("family", "ok", "too_big", "why"),
    [
        ("sd3", 256, 264, "pos_embed_max_size 32"),  # PatchEmbed's cropped table: 32 patches
        ("wan", 512, 528, "rope_max_seq_len 64"),
    ],
)
def test_sides_past_the_positional_table_are_refused(
    tiny_model_dir: Callable[[str], Path], family: str, ok: int, too_big: int, why: str
) -> None:
    meta = inspect_model(tiny_model_dir(family))
    assert meta.max_side == ok
    validate_request(meta, height=ok, width=32)
    with pytest.raises(InvalidRequestError, match=rf"height {too_big} exceeds the maximum of {ok}"):
        validate_request(meta, height=too_big, width=32)
    with pytest.raises(InvalidRequestError, match=why):
        validate_request(meta, height=32, width=too_big)


def test_unlimited_families_have_no_side_limit(tiny_model_dir: Callable[[str], Path]) -> None:
    for family in ("flux", "cogvideox", "hunyuanvideo"):  # embeddings computed per shape
        assert inspect_model(tiny_model_dir(family)).max_side is None


def test_every_family_has_an_adapter_and_a_tiny_model() -> None:
    from trident.pipelines.families import ADAPTERS
    from trident.pipelines.tiny import TINY_FAMILIES, TINY_SHAPES

    assert tuple(ADAPTERS) == FAMILY_NAMES
    assert TINY_FAMILIES == FAMILY_NAMES == tuple(TINY_SHAPES)
