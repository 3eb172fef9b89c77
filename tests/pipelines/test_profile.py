"""``trident profile`` on a tiny model: schema, positivity, CLI parsing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trident.pipelines.profile import (
    PROFILE_FORMAT,
    main,
    parse_shape,
    parse_shapes,
    validate_profile,
)

pytestmark = pytest.mark.timeout(150)


def test_parse_shapes() -> None:
    assert parse_shape("64x48") == (64, 48, None)
    assert parse_shape(" 64X64x5 ") == (64, 64, 5)
    assert parse_shapes("64x64,64x64x5") == [(64, 64, None), (64, 64, 5)]
    for bad in ("64", "64x", "axb", "0x64", "1x2x3x4", "-8x8"):
        with pytest.raises(ValueError):
            parse_shape(bad)


def _doc() -> dict[str, Any]:
    return {
        "format": PROFILE_FORMAT,
        "device": "cpu",
        "dtype": "float32",
        "family": "flux",
        "model": "m",
        "created": "2026-01-01T00:00:00+00:00",
        "command": "trident profile",
        "weights_bytes": {"encode": 1, "diffuse": 2, "decode": 3},
        "entries": [
            {
                "stage": "diffuse",
                "height": 64,
                "width": 64,
                "num_frames": 1,
                "num_inference_steps": 2,
                "degree": 2,
                "seconds": 0.5,
                "peak_bytes": 10,
                "repeats": 3,
                "seconds_per_step": 0.25,
            }
        ],
    }


@pytest.mark.parametrize(
    "breaks",
    [
        lambda d: d.update(format="x"),
        lambda d: d["weights_bytes"].pop("decode"),
        lambda d: d["entries"][0].pop("seconds_per_step"),
        lambda d: d["entries"][0].update(stage="encode"),  # degree 2 encode
        lambda d: d["entries"][0].update(peak_bytes=1.5),
        lambda d: d["entries"][0].update(seconds=-1.0),
        lambda d: d.update(entries={}),
        lambda d: d["entries"][0].update(batch=0),
        lambda d: d["entries"][0].update(batch=True),
        lambda d: d["entries"][0].update(batch=2.0),
        lambda d: d["entries"][0].update(stage="decode", degree=1, batch=2),  # decode: per member
    ],
)
def test_validate_profile_rejects(breaks: Callable[[dict[str, Any]], Any]) -> None:
    validate_profile(_doc())
    doc = copy.deepcopy(_doc())
    breaks(doc)
    with pytest.raises(ValueError):
        validate_profile(doc)


def test_validate_profile_accepts_batch() -> None:
    doc = _doc()
    doc["entries"][0]["batch"] = 4
    validate_profile(doc)
    doc["entries"][0].update(stage="encode", degree=1, batch=1)
    validate_profile(doc)


def test_profile_tiny_flux_batch_sizes(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from trident.sched.cost import ReferenceCostModel, read_profile
    from trident.sched.types import Shape

    out = tmp_path / "flux-batch.json"
    argv = [
        "--model", str(tiny_model_dir("flux")), "--shapes", "32x32", "--batch-sizes", "1,2",
        "--steps", "2", "--repeats", "1", "--warmup", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    validate_profile(doc)
    got = sorted((e["stage"], e["degree"], e.get("batch", 1)) for e in doc["entries"])
    assert got == [("decode", 1, 1), ("diffuse", 1, 1), ("diffuse", 1, 2), ("encode", 1, 1)]
    (single,) = [e for e in doc["entries"] if e["stage"] == "diffuse" and "batch" not in e]
    (pair,) = [e for e in doc["entries"] if e.get("batch") == 2]
    assert pair["seconds"] > 0 and pair["peak_bytes"] >= 0
    assert pair["seconds_per_step"] == pytest.approx(pair["seconds"] / 2)

    # The cost model reads the batched call: one measured point, so the figure is the
    # measured one, held between one call and two separate calls.
    model = ReferenceCostModel([read_profile(out)])
    shape = Shape(height=32, width=32, num_inference_steps=2)
    assert model.stage_seconds("flux", "diffuse", shape) == pytest.approx(single["seconds"])
    expected = min(2 * single["seconds"], max(single["seconds"], pair["seconds"]))
    assert model.stage_seconds_batched("flux", "diffuse", shape, 1, 2) == pytest.approx(expected)


def test_profile_rejects_bad_batch_sizes() -> None:
    for bad in ("0", "a", ""):
        with pytest.raises(SystemExit):
            main(["--model", "m", "--shapes", "32x32", "--batch-sizes", bad, "--out", "x"])


def test_profile_tiny_flux_degrees_1_and_2(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from trident.sched.cost import read_profile

    model = tiny_model_dir("flux")
    out = tmp_path / "flux.json"
    argv = [
        "--model", str(model), "--device", "cpu", "--shapes", "32x32", "--degrees", "1,2",
        "--steps", "2", "--repeats", "1", "--warmup", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    validate_profile(doc)
    assert doc["family"] == "flux" and doc["model"] == model.name and doc["device"] == "cpu"
    assert doc["command"].startswith("trident profile --model")
    assert all(v > 0 for v in doc["weights_bytes"].values())
    got = {(e["stage"], e["degree"]) for e in doc["entries"]}
    assert got == {("encode", 1), ("diffuse", 1), ("decode", 1), ("diffuse", 2)}
    for e in doc["entries"]:
        assert (e["height"], e["width"], e["num_frames"], e["num_inference_steps"]) == (
            32,
            32,
            1,
            2,
        )
        assert e["seconds"] > 0 and e["peak_bytes"] >= 0 and e["repeats"] == 1
        if e["stage"] == "diffuse":
            assert e["seconds_per_step"] == pytest.approx(e["seconds"] / 2)
    assert any(e["peak_bytes"] > 0 for e in doc["entries"])
    parsed = read_profile(out)  # the cost model accepts it
    assert len(parsed.entries) == 4 and parsed.weights_bytes == doc["weights_bytes"]


def test_profile_rejects_bad_shape_for_family(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        main(
            ["--model", str(tiny_model_dir("flux")), "--shapes", "32", "--out", str(tmp_path / "x")]
        )
    from trident.pipelines.profile import run_profile

    with pytest.raises(ValueError, match="images"):
        run_profile(tiny_model_dir("flux"), "cpu", ["32x32x5"], [1], repeats=1, warmup=0, steps=1)
