"""The reference cost model: table look-ups, interpolation, profiles, estimates."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trident.sched.cost import (
    PROFILE_FORMAT,
    MonotoneCurve,
    ReferenceCostModel,
    best_degree,
    efficient_degrees,
    load_cost_model,
    on_device,
)
from trident.sched.types import Shape

pytestmark = pytest.mark.timeout(30)

FAMILIES = ("flux", "sd3", "wan", "cogvideox", "hunyuanvideo")


@pytest.fixture(scope="module")
def cost() -> ReferenceCostModel:
    return load_cost_model([])


def test_table_rows_reproduced(cost: ReferenceCostModel) -> None:
    # flux 1024^2 k=1: 0.8403 s/step; hunyuanvideo 720x1280x129 k=8: 16.35 s/step
    assert cost.stage_seconds("flux", "diffuse", Shape(1024, 1024, 1, 28), 1) == pytest.approx(
        0.8403 * 28
    )
    hv = Shape(720, 1280, 129, 50)
    assert cost.stage_seconds("hunyuanvideo", "diffuse", hv, 8) == pytest.approx(16.35 * 50)
    assert cost.stage_seconds("cogvideox", "diffuse", Shape(768, 1360, 81, 1), 8) == pytest.approx(
        4.75
    )


def test_efficient_degrees_match_authors_k_star(cost: ReferenceCostModel) -> None:
    assert best_degree(cost, "flux", Shape(4096, 4096, 1, 28)) == 8
    assert best_degree(cost, "flux", Shape(1024, 1024, 1, 28)) == 1
    assert best_degree(cost, "hunyuanvideo", Shape(720, 1280, 129, 50)) == 8
    assert best_degree(cost, "cogvideox", Shape(768, 1360, 33, 50)) == 2
    assert efficient_degrees(cost, "flux", Shape(2048, 2048, 1, 28)) == (1, 2)
    # configurable threshold
    assert 4 in efficient_degrees(cost, "flux", Shape(2048, 2048, 1, 28), efficiency=0.75)


def test_every_family_answers_every_query(cost: ReferenceCostModel) -> None:
    for fam in FAMILIES:
        shape = (
            Shape(720, 1280, 81, 50)
            if fam in ("wan", "cogvideox", "hunyuanvideo")
            else Shape(1024, 1024)
        )
        for stage in ("encode", "diffuse", "decode"):
            assert 0 < cost.stage_seconds(fam, stage, shape) < math.inf
            assert cost.stage_peak_bytes(fam, stage, shape) > 0
            assert cost.weight_bytes(fam, stage) > 0
            assert cost.output_bytes(fam, stage, shape) > 0
            assert cost.load_seconds(fam, stage, "disk") > cost.load_seconds(fam, stage, "peer") > 0
    assert cost.weight_bytes("flux", "diffuse") == 23_800_000_000
    assert cost.stage_seconds("flux", "diffuse", Shape(512, 512), 16) == math.inf
    with pytest.raises(ValueError):
        cost.stage_seconds("nope", "encode", Shape(64, 64))


def test_transfer_and_speed(cost: ReferenceCostModel) -> None:
    assert cost.transfer_seconds(0, True) == 0.0
    assert cost.transfer_seconds(10**9, False) > cost.transfer_seconds(10**9, True) > 0
    assert on_device(10.0, 2.0) == 5.0
    with pytest.raises(ValueError):
        on_device(1.0, 0.0)


@settings(max_examples=60, deadline=None)
@given(
    fam=st.sampled_from(FAMILIES),
    k=st.sampled_from([1, 2, 4, 8]),
    a=st.integers(1, 300),
    b=st.integers(1, 300),
    frames=st.integers(1, 129),
)
def test_monotone_in_pixels(fam: str, k: int, a: int, b: int, frames: int) -> None:
    cost = _COST
    s1 = Shape(16 * min(a, b), 16 * min(a, b), frames, 10)
    s2 = Shape(16 * max(a, b), 16 * max(a, b), frames, 10)
    for stage in ("encode", "diffuse", "decode"):
        assert (
            cost.stage_seconds(fam, stage, s1, k) <= cost.stage_seconds(fam, stage, s2, k) + 1e-12
        )
        assert cost.stage_peak_bytes(fam, stage, s1, k) <= cost.stage_peak_bytes(fam, stage, s2, k)


_COST = load_cost_model([])


def test_curve_isotonic_and_extrapolation() -> None:
    c = MonotoneCurve([(1, 1.0), (2, 3.0), (3, 2.0), (4, 5.0)])
    xs = [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 8, 100]
    ys = [c(x) for x in xs]
    assert ys == sorted(ys)
    assert c(1) == pytest.approx(1.0)
    single = MonotoneCurve([(10, 2.0)])
    assert single(20) == pytest.approx(4.0)


def test_profile_overrides_reference(tmp_path: Path) -> None:
    prof = {
        "format": PROFILE_FORMAT,
        "device": "NVIDIA H100",
        "dtype": "bfloat16",
        "family": "flux",
        "model": "flux-dev",
        "weights_bytes": {"encode": 1, "diffuse": 2_000, "decode": 3},
        "entries": [
            {
                "stage": "diffuse",
                "height": 512,
                "width": 512,
                "num_frames": 1,
                "num_inference_steps": 10,
                "degree": 1,
                "seconds": 1.0,
                "peak_bytes": 1000,
                "repeats": 3,
            },
            {
                "stage": "diffuse",
                "height": 1024,
                "width": 1024,
                "num_frames": 1,
                "num_inference_steps": 10,
                "degree": 1,
                "seconds": 4.0,
                "peak_bytes": 4000,
                "repeats": 3,
            },
            {
                "stage": "encode",
                "height": 512,
                "width": 512,
                "num_frames": 1,
                "num_inference_steps": 10,
                "degree": 1,
                "seconds": 0.05,
                "peak_bytes": 10,
                "repeats": 3,
            },
        ],
    }
    p = tmp_path / "flux.json"
    p.write_text(json.dumps(prof))
    cost = load_cost_model([p])
    assert cost.stage_seconds("flux", "diffuse", Shape(512, 512, 1, 20)) == pytest.approx(2.0)
    # between the two points: log-log interpolation (slope 1 here)
    assert cost.stage_seconds("flux", "diffuse", Shape(724, 724, 1, 10)) == pytest.approx(
        2.0, rel=0.01
    )
    assert cost.stage_peak_bytes("flux", "diffuse", Shape(1024, 1024)) == 4000
    assert cost.stage_seconds("flux", "encode", Shape(512, 512)) == pytest.approx(0.05)
    assert cost.weight_bytes("flux", "diffuse") == 2000
    # degrees it did not measure still come from the reference
    assert cost.stage_seconds("flux", "diffuse", Shape(1024, 1024, 1, 1), 2) == pytest.approx(
        0.5376
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError):
        load_cost_model([bad])
    # a directory contributes its *.json files
    (tmp_path / "bad.json").unlink()
    assert load_cost_model([tmp_path]).weight_bytes("flux", "diffuse") == 2000


def test_importable_without_torch() -> None:
    code = "import sys; import trident.sched.cost as c; c.load_cost_model(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
