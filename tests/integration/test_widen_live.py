"""Widening through the real daemons (trident-scheduler, one trident-node with two sim
devices, the production policy): the simulator's scenario of tests/unit/test_widen.py
replayed live on 80 GB devices, at 1/50 of its time. The long clip starts alone on one device, pauses
when the other frees, resumes on both at degree 2, and ends on time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trident.bench.live import run_live
from trident.bench.sim import BenchConfig, run_policies

from .conftest import read_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_live_diffuse_widens_onto_the_device_that_frees_and_ends_on_time(
    tmp_path: Path,
) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"arrival_s": 0.0, "model": "wan", "height": 480, "width": 832, "num_frames": 33},
        {"arrival_s": 0.5, "model": "wan", "height": 480, "width": 832, "num_frames": 81},
    ]
    trace.write_text("".join(json.dumps({**r, "num_inference_steps": 50}) + "\n" for r in rows))
    # 80 GB devices (an L20's 48 GB cannot hold this clip's diffuse at degree 1 or 2).
    cfg = BenchConfig(
        trace=None,
        trace_file=str(trace),
        nodes=1,
        gpus_per_node=2,
        gpu="a100",
        policies=("trident",),
    )
    logs = tmp_path / "logs"
    live = run_live(cfg, "trident", time_scale=0.02, log_dir=str(logs))
    assert live["requests"] == live["completed"] == 2
    assert live["slo_attainment"] == 1.0
    # The simulator widens the same way (tests/unit/test_widen.py): the live latencies
    # follow it, not those of the clip left alone on one device (mean 597 s against 479 s simulated).
    sim = run_policies(cfg)[0]["trident"]
    assert math.isclose(live["mean_latency_s"], sim.mean_latency_s, rel_tol=0.05), (live, sim)
    events = read_log(logs / "trident.log")
    widening = [e for e in events if e.get("event") == "dispatch.widening"]
    widened = [e for e in events if e.get("event") == "dispatch.widened"]
    assert len(widening) == 1 and len(widened) == 1
    assert widening[0]["request_id"] == widened[0]["request_id"]
    assert len(widening[0]["from_devices"]) == 1
    assert widened[0]["degree"] == 2 and len(widened[0]["devices"]) == 2
    assert 0 < widened[0]["steps_done"] < 50
    paused = [e for e in events if e.get("event") == "stage.paused"]
    assert [e["request_id"] for e in paused] == [widened[0]["request_id"]]
