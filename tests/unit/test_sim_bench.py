"""``trident bench sim`` (trident.bench.sim.main): table, JSON, plots, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trident.bench.sim import main
from trident.sim.traces import TraceRequest, dump_trace

pytestmark = pytest.mark.timeout(120)

SMALL = ["--nodes", "1", "--gpus-per-node", "4", "--duration", "40", "--policies", "fifo"]


def test_json_has_the_documented_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    rc = main(["--trace", "flux", *SMALL, "--rate", "1", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    doc = json.loads(out.read_text())
    row = doc["policies"]["fifo"]
    for key in ("slo_attainment", "mean_latency_s", "p95_latency_s", "completed", "failed", "oom"):
        assert key in row
    assert row["completed"] + row["failed"] == 40
    assert doc["config"]["trace"] == "flux" and doc["config"]["nodes"] == 1
    assert png.stat().st_size > 1000
    text = capsys.readouterr().out
    assert "SLO" in text and "fifo" in text


def test_sweep_writes_points_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    png = tmp_path / "s.png"
    rc = main(["--trace", "sd3", *SMALL, "--sweep", "slo_scale=1,4", "--json", str(out),
               "--plot", str(png)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    pts = doc["sweep"]["points"]
    assert [p["value"] for p in pts] == [1.0, 4.0]
    # A looser SLO can only raise attainment (same trace, same schedule).
    assert (
        pts[1]["policies"]["fifo"]["slo_attainment"] >= pts[0]["policies"]["fifo"]["slo_attainment"]
    )
    assert png.stat().st_size > 1000


def test_trace_file_with_served_names(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    dump_trace(
        [
            TraceRequest(0.0, "my-flux", 512, 512, 1, 28),
            TraceRequest(0.5, "flux-dev", 1024, 1024, 1, 28, slo_s=0.5),
            TraceRequest(1.0, "cogvideox", 768, 432, 17, 50),
        ],
        trace,
    )
    out = tmp_path / "r.json"
    base = [
        "--trace-file",
        str(trace),
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--policies",
        "fifo",
    ]
    assert main([*base, "--json", str(out)]) == 2  # my-flux: unknown family
    assert main([*base, "--model", "my-flux=flux", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["policies"]["fifo"]
    assert row["completed"] == 3
    assert row["slo_attainment"] <= 2 / 3  # the 0.5 s budget is missed


def test_bad_trace_file_reports_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"arrival_s": 0, "model": "flux", "height": 64}\n')
    assert main(["--trace-file", str(trace), "--policies", "fifo"]) == 2
    assert (
        f"{trace}:1: missing required key(s) width, num_inference_steps" in capsys.readouterr().err
    )


def test_bad_sweep_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        main(["--sweep", "nodes=1,2"])


def test_a_labelled_run_of_a_policy_takes_its_own_options(tmp_path: Path) -> None:
    """Ablations: ``nobatch=trident`` is trident under another name, with the options
    scoped to that name; on a queueing small-image trace the two differ."""
    out = tmp_path / "ab.json"
    rc = main(["--trace", "small-images", "--nodes", "1", "--gpus-per-node", "2", "--duration",
               "30", "--rate", "4", "--policies", "trident,nobatch=trident", "--policy-opt",
               "nobatch.max_batch=1", "--tick", "0.5", "--json", str(out)])  # fmt: skip
    assert rc == 0
    runs = json.loads(out.read_text())["policies"]
    assert set(runs) == {"trident", "nobatch"}
    assert runs["trident"]["completed"] == runs["nobatch"]["completed"] == 120
    assert runs["trident"]["mean_latency_s"] < runs["nobatch"]["mean_latency_s"]
