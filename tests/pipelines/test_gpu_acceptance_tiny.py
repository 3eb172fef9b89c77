"""bench/gpu/run.py end to end in its CPU mode (``--device cpu --tiny``): the same build,
profile and serve steps as on a GPU, with the tiny models, into a temporary directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trident.pipelines.profile import validate_profile
from trident.sched.cost import ReferenceCostModel, read_profile

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

RUN = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "run.py"
FAMILIES = ("sd3", "flux", "cogvideox", "wan", "hunyuanvideo")


def test_gpu_acceptance_run_cpu_tiny(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "trident-gpu-acceptance/1"
    assert results["environment"]["device_name"] == "cpu"
    assert results["environment"]["torch"]
    assert set(results["families"]) == set(FAMILIES)
    for fam, rec in results["families"].items():
        assert "error" not in rec, (fam, rec.get("error"))
        prof = rec["profile"]
        assert prof["shapes_done"] and not prof["shapes_skipped"], fam
        doc = json.loads((out / prof["file"]).read_text())
        validate_profile(doc)
        assert {e["stage"] for e in doc["entries"]} == {"encode", "diffuse", "decode"}
        ReferenceCostModel().add_profile(read_profile(doc))
        reqs = rec["serve"]["requests"]
        assert len(reqs) >= 2, fam
        for r in reqs:
            for stage in ("encode", "diffuse", "decode", "total"):
                assert r["timings"][stage] >= 0, (fam, stage)
            assert r["devices"]["diffuse"], fam
    summary = (out / "summary.md").read_text()
    assert "GPU acceptance run" in summary and "cpu" in summary
    assert not (tmp_path / "models" / "flux").exists()  # models are cleaned up
