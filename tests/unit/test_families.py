"""trident.families: the one home of family facts, and every layer deriving from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trident.config import KNOWN_FAMILIES, ModelSpec, parse_model_flag
from trident.errors import ConfigError
from trident.families import (
    FAMILIES,
    FAMILY_NAMES,
    PER_MEMBER_PARAMS,
    STAGES,
    Geometry,
    family_of_class,
    fit_frames,
    frames_for_latent,
    latent_frames,
    runs_cfg,
)
from trident.runtime.registry import SIM_DEFAULTS, build_request_shape, register_models
from trident.sched.cost import REFERENCE_FAMILIES
from trident.sched.types import STAGES as SCHED_STAGES
from trident.sim import traces

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_scheduler_and_the_facts_stays_light() -> None:
    code = (
        "import sys\n"
        "import trident.families, trident.sched, trident.sched.batching, trident.sched.cost\n"
        "bad = [m for m in sys.modules\n"
        "       if m.startswith(('trident.pipelines', 'trident.runtime', 'torch', 'diffusers'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=25
    )
    assert proc.returncode == 0, proc.stderr


def test_every_layer_lists_the_same_families() -> None:
    assert KNOWN_FAMILIES == FAMILY_NAMES == tuple(FAMILIES)
    assert set(SIM_DEFAULTS) == set(FAMILIES)
    assert set(REFERENCE_FAMILIES) == set(FAMILIES)
    assert {n for n, s in FAMILIES.items() if s.is_video} == traces.VIDEO_FAMILIES
    assert {n for n, s in FAMILIES.items() if s.uses_cfg} == traces.CFG_FAMILIES
    assert set(traces.FAMILY_SHAPES) <= set(FAMILIES)
    assert "ltx" not in traces.VIDEO_FAMILIES  # no adapter, no family
    assert tuple(SCHED_STAGES) == STAGES
    for name, spec in FAMILIES.items():
        assert spec.name == name and spec.stages == STAGES
        assert family_of_class(spec.pipeline_class) is spec


def test_cost_model_flags_come_from_the_family() -> None:
    for name, est in REFERENCE_FAMILIES.items():
        spec = FAMILIES[name]
        assert est.is_video is spec.is_video
        assert est.cfg_in_reference is spec.uses_cfg
        assert (est.vae_spatial, est.vae_temporal) == (
            spec.reference.vae_spatial,
            spec.reference.vae_temporal,
        )


def test_sim_defaults_are_the_familys_and_runnable() -> None:
    for name, spec in FAMILIES.items():
        d = SIM_DEFAULTS[name]
        assert (d["height"], d["width"], d["steps"]) == (
            spec.default_height,
            spec.default_width,
            spec.default_steps,
        )
        geo = spec.reference
        assert d["height"] % geo.size_multiple == 0 and d["width"] % geo.size_multiple == 0
        if spec.is_video:
            assert spec.default_num_frames is not None
            limit = spec.frame_limit(geo)
            assert fit_frames(d["num_frames"], geo.vae_temporal, limit) == d["num_frames"]
        else:
            assert d["num_frames"] == 1


def test_config_knows_the_families() -> None:
    assert parse_model_flag("wan") == ModelSpec(name="wan", family="wan")
    assert parse_model_flag("x=sim:hunyuanvideo") == ModelSpec(name="x", family="hunyuanvideo")
    with pytest.raises(ConfigError, match="unknown family 'ltx'"):
        parse_model_flag("x=sim:ltx")


def test_frame_rule() -> None:
    assert latent_frames(81, 4) == 21 and frames_for_latent(21, 4) == 81
    assert latent_frames(1, 4) == 1 and frames_for_latent(1, 4) == 1
    assert fit_frames(81, 2, 63) == 63
    assert fit_frames(80, 4, None) == 77  # onto 1 + k*4, rounding down
    assert fit_frames(129, 4, 100) == 97


def test_wan_geometry_from_configs() -> None:
    wan = FAMILIES["wan"]
    # A config that says nothing: diffusers' defaults (Wan 2.1: 8 / 4, patch (1, 2, 2),
    # rope 1024), well past the family's cap.
    geo = wan.geometry({}, {})
    assert (geo.vae_spatial, geo.vae_temporal, geo.patch, geo.patch_t) == (8, 4, 2, 1)
    assert geo.size_multiple == 16 and geo.max_side == 16 * 1024
    assert wan.frame_limit(geo) == 257
    # The tiny wan of issue #12: factors 4 / 2, rope table 32 rows: 32 latent frames.
    tiny = wan.geometry(
        {"scale_factor_spatial": 4, "scale_factor_temporal": 2},
        {"patch_size": [1, 2, 2], "rope_max_seq_len": 32},
    )
    assert tiny.size_multiple == 16  # the VAE x patch says 8, WanPipeline demands 16
    assert tiny.max_frames == 63 and wan.frame_limit(tiny) == 63
    assert tiny.max_side == 256


def test_other_geometries() -> None:
    sd3 = FAMILIES["sd3"].geometry({"block_out_channels": [8, 8, 8]}, {"pos_embed_max_size": 32})
    assert (sd3.size_multiple, sd3.max_side, sd3.max_frames) == (8, 256, None)
    assert FAMILIES["sd3"].geometry({}, {"pos_embed_max_size": None}).max_side is None
    flux = FAMILIES["flux"].geometry({"block_out_channels": [8, 8, 8]}, {"patch_size": 1})
    assert (flux.size_multiple, flux.max_side) == (8, None)  # 2x2 packing, rope per shape
    cog = FAMILIES["cogvideox"]
    assert cog.geometry({}, {"patch_size_t": None}).patch_t == 1  # CogVideoX 1.0
    assert cog.default_num_frames_for({"sample_frames": 49}) == 49  # as the pipeline reads
    assert cog.default_num_frames_for({}) == cog.default_num_frames
    hy = FAMILIES["hunyuanvideo"].geometry({}, {"patch_size": 1})
    assert (hy.vae_spatial, hy.vae_temporal, hy.size_multiple, hy.max_frames) == (8, 4, 16, None)
    assert (
        Geometry(vae_spatial=8, patch=2, max_patches_side=9, pipeline_multiple=32).max_side == 128
    )


def test_runs_cfg_follows_the_family() -> None:
    assert runs_cfg("wan", 5.0, {}) and runs_cfg("sd3", 7.0, {}) and runs_cfg("cogvideox", 6.0, {})
    assert not runs_cfg("wan", 1.0, {}) and not runs_cfg("wan", None, {})
    # Guidance-distilled: guidance_scale is embedded; only true CFG runs an uncond branch.
    assert not runs_cfg("flux", 3.5, {}) and not runs_cfg("hunyuanvideo", 6.0, {})
    assert runs_cfg("flux", 3.5, {"negative_prompt": "blur", "true_cfg_scale": 4.0})
    assert not runs_cfg("flux", 3.5, {"negative_prompt": "blur"})  # true_cfg_scale 1
    assert not runs_cfg("hunyuanvideo", 6.0, {"true_cfg_scale": 4.0})  # no negative prompt
    assert runs_cfg("unknown", 2.0, {})


def test_registry_shapes_use_the_family_facts() -> None:
    served = register_models([ModelSpec(name=n, family=n) for n in FAMILY_NAMES])
    for name, model in served.items():
        assert model.info.is_video is FAMILIES[name].is_video
    p: dict[str, object] = {"prompt": "x", "guidance_scale": 6.0}
    assert not build_request_shape(served["hunyuanvideo"], p).cfg  # distilled: no uncond
    p = {"prompt": "x", "guidance_scale": 5.0}
    assert build_request_shape(served["wan"], p).cfg
    p = {"prompt": "x", "negative_prompt": "blur", "true_cfg_scale": 4.0}
    assert build_request_shape(served["flux"], p).cfg


def test_per_member_params_are_shared_with_the_adapters() -> None:
    from trident.pipelines.api import PER_MEMBER_PARAMS as API_PARAMS
    from trident.sched import batching

    assert API_PARAMS is PER_MEMBER_PARAMS
    assert batching.PER_MEMBER_PARAMS is PER_MEMBER_PARAMS
    assert {"prompt", "seed"} <= PER_MEMBER_PARAMS
