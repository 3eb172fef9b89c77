"""Exactness survives process boundaries: each stage in its own process, no pickle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.pipelines.conftest import STEPS, TEST_SHAPES, diffusers_reference
from tests.pipelines.stage_worker import read_tensors

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("flux", "wan")  # one image and one video family; the stage split is generic


@pytest.mark.timeout(240)
def test_each_stage_in_its_own_process(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    import torch

    threads = torch.get_num_threads()
    requests: dict[str, dict[str, Any]] = {
        fam: {
            "prompt": "a lighthouse at dusk",
            "negative_prompt": "blurry",
            "num_inference_steps": STEPS,
            **TEST_SHAPES[fam],
        }
        for fam in FAMILIES
    }
    prev: dict[str, str | None] = dict.fromkeys(FAMILIES)
    for stage in ("encode", "diffuse", "decode"):
        # One process per stage (serving every family), as three workers would.
        jobs = []
        for fam in FAMILIES:
            out = tmp_path / f"{fam}-{stage}.bin"
            jobs.append(
                {
                    "model": str(tiny_model_dir(fam)),
                    "stage": stage,
                    "params": {**requests[fam], "seed": 5},
                    "threads": threads,
                    "inputs": prev[fam],
                    "outputs": str(out),
                }
            )
            prev[fam] = str(out)
        job_file = tmp_path / f"{stage}.json"
        job_file.write_text(json.dumps(jobs))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(
            [sys.executable, "-m", "tests.pipelines.stage_worker", str(job_file)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    for fam in FAMILIES:
        got = read_tensors(Path(str(prev[fam])))["output"].numpy()
        expected = diffusers_reference(tiny_model_dir(fam), seed=5, **requests[fam])
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5
