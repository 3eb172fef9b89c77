"""inspect_model / validate_request: what the scheduler can check without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from trident.errors import InvalidRequestError, ModelError
from trident.pipelines import ModelMeta, inspect_model, validate_request

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_importing_the_package_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "import trident.pipelines as p\n"
        "from trident.pipelines.meta import FAMILIES\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules)\n"
        f"m = p.inspect_model({str(tmp_path)!r})\n"
        "p.validate_request(m, height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=5.0)\n"
        "assert 'torch' not in sys.modules\n"
    )
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "WanPipeline",
                "transformer": ["diffusers", "X"],
                "vae": ["diffusers", "Y"],
                "scheduler": ["diffusers", "Z"],
            }
        )
    )
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(
        json.dumps({"scale_factor_spatial": 8, "scale_factor_temporal": 4})
    )
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": [1, 2, 2]}))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("family", "is_video", "spatial", "temporal", "multiple"),
    [
        ("flux", False, 4, 1, 8),
        ("sd3", False, 4, 1, 8),
        ("wan", True, 4, 2, 16),  # WanPipeline.check_inputs: multiples of 16
        ("cogvideox", True, 4, 4, 8),
        ("hunyuanvideo", True, 8, 4, 16),  # HunyuanVideoPipeline.check_inputs: 16
    ],
)
def test_inspect_reads_family_and_factors_from_configs(
    tiny_model_dir: Callable[[str], Path],
    family: str,
    is_video: bool,
    spatial: int,
    temporal: int,
    multiple: int,
) -> None:
    meta = inspect_model(tiny_model_dir(family))
    assert meta.family == family
    assert meta.is_video is is_video
    assert (meta.vae_scale_factor_spatial, meta.vae_scale_factor_temporal) == (spatial, temporal)
    assert meta.size_multiple == multiple
    assert set(meta.stage_weight_bytes) == {"encode", "diffuse", "decode"}
    assert all(b > 1000 for b in meta.stage_weight_bytes.values())
    assert meta.context_parallel is (family in ("flux", "wan"))


def test_not_a_pipeline_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no model_index\.json"):
        inspect_model(tmp_path)
    with pytest.raises(ModelError, match="not a directory"):
        inspect_model(tmp_path / "missing")
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        inspect_model(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ModelError, match="_class_name"):
        inspect_model(tmp_path)


def test_unsupported_family(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"})
    )
    with pytest.raises(ModelError, match="StableDiffusionPipeline is not supported"):
        inspect_model(tmp_path)


def test_pipeline_without_transformer_weights_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "transformer": [None, None],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    with pytest.raises(ModelError, match="without a transformer"):
        inspect_model(tmp_path)


def _meta(family: str = "wan", **kw: object) -> ModelMeta:
    video = family != "flux"
    base = ModelMeta(
        path="/x",
        family=family,
        pipeline_class="WanPipeline" if video else "FluxPipeline",
        is_video=video,
        vae_scale_factor_spatial=8,
        vae_scale_factor_temporal=4 if video else 1,
        size_multiple=16,
        max_frames=257 if video else None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_valid_requests_pass() -> None:
    validate_request(
        _meta("flux"),
        height=1024,
        width=768,
        num_frames=None,
        num_inference_steps=28,
        guidance_scale=3.5,
    )
    validate_request(
        _meta(), height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0
    )
    validate_request(_meta(), height=None, width=None)  # model defaults


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 1000, "width": 1024}, "height 1000 is not a multiple of 16"),
        ({"height": 1024, "width": 1000}, "width 1000 is not a multiple of 16"),
        ({"height": 0, "width": 64}, "height must be positive"),
        ({"height": -16, "width": 64}, "height must be positive"),
        ({"height": 8192, "width": 64}, "exceeds the maximum"),
        ({"height": 64.0, "width": 64}, "must be an integer"),
        (
            {"height": 64, "width": 64, "num_frames": 1001},
            "num_frames 1001 exceeds the maximum of 257",
        ),
        ({"height": 64, "width": 64, "num_frames": 80}, r"1 \+ k\*4"),
        ({"height": 64, "width": 64, "num_frames": 0}, "num_frames must be positive"),
        ({"height": 64, "width": 64, "num_inference_steps": 0}, r"1\.\.1000"),
        ({"height": 64, "width": 64, "num_inference_steps": 5000}, r"1\.\.1000"),
        ({"height": 64, "width": 64, "guidance_scale": float("nan")}, "guidance_scale"),
        ({"height": 64, "width": 64, "guidance_scale": -1.0}, "guidance_scale"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        validate_request(_meta(), **kwargs)  # type: ignore[arg-type]


def test_image_model_refuses_frames() -> None:
    with pytest.raises(InvalidRequestError, match="makes images"):
        validate_request(_meta("flux"), height=64, width=64, num_frames=9)


def test_validation_uses_the_tiny_models_real_factors(
    tiny_model_dir: Callable[[str], Path],
) -> None:
    meta = inspect_model(tiny_model_dir("wan"))  # spatial 4 x patch 2 (pipeline: 16), temporal 2
    validate_request(meta, height=48, width=32, num_frames=7)
    with pytest.raises(InvalidRequestError, match=r"multiple of 16 .*\(try 32 or 48\)"):
        validate_request(meta, height=40, width=32)
    with pytest.raises(InvalidRequestError, match=r"1 \+ k\*2"):
        validate_request(meta, height=32, width=32, num_frames=6)
