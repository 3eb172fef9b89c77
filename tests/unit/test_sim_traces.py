"""Workload traces: built-in traces, arrival processes, the JSON Lines format."""

from __future__ import annotations

import io
import itertools
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trident.sim.traces import (
    FAMILY_SHAPES,
    TRACES,
    TraceError,
    TraceRequest,
    arrival_times,
    dump_trace,
    dumps_trace,
    load_trace,
    loads_trace,
    make_trace,
    to_request_specs,
)

pytestmark = pytest.mark.timeout(60)


def test_paper_traces_have_the_papers_shapes_rates_and_steps() -> None:
    flux = make_trace("flux", duration_s=1800)
    assert len(flux) == 2700  # 1.5 req/s x 30 min
    assert flux[1].arrival_s - flux[0].arrival_s == pytest.approx(1 / 1.5)
    assert {(r.height, r.num_inference_steps) for r in flux} == {
        (s, 28) for s in (128, 256, 512, 1024, 2048)
    }
    cog = make_trace("cogvideox", duration_s=600)
    assert {(r.width, r.num_frames) for r in cog} == {
        (w, f) for w in (1360, 432) for f in (17, 33, 65, 81)
    }
    hy = make_trace("hunyuanvideo", duration_s=600)
    assert len(hy) == 600 and {r.num_inference_steps for r in hy} == {50}
    assert {(r.height, r.width) for r in hy} == {(720, 1280), (960, 544)}
    assert {r.num_frames for r in hy} == {17, 33, 65, 129}
    assert {r.num_inference_steps for r in make_trace("sd3", duration_s=60)} == {20}


def test_traces_are_deterministic_per_seed() -> None:
    a = make_trace("mixed", duration_s=120, seed=4, arrival="poisson")
    assert a == make_trace("mixed", duration_s=120, seed=4, arrival="poisson")
    assert a != make_trace("mixed", duration_s=120, seed=5, arrival="poisson")
    assert {r.model for r in a} == set(FAMILY_SHAPES)


def test_shifting_trace_turns_video_heavy() -> None:
    tr = make_trace("shifting", rate=10, duration_s=600, seed=1)
    n = len(tr)
    first = tr[: n // 5]
    last = tr[-n // 5 :]

    def video_share(rs: list[TraceRequest]) -> float:
        return sum(r.num_frames > 1 for r in rs) / len(rs)

    assert video_share(first) < 0.3 < 0.7 < video_share(last)


@pytest.mark.parametrize("arrival", ["poisson", "bursty"])
def test_arrival_processes_keep_the_mean_rate(arrival: str) -> None:
    rng = random.Random(0)
    times = arrival_times(20000, 2.0, arrival, rng, cv=3.0)  # type: ignore[arg-type]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.1)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1.0 if arrival == "poisson" else 3.0, rel=0.15)


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    tr = make_trace("mixed", duration_s=30, seed=2)
    tr[3] = TraceRequest(
        1.0, "my-flux", 512, 512, 1, 28, slo_s=12.5, guidance_scale=3.5, request_id="custom"
    )
    tr.sort(key=lambda r: r.arrival_s)
    path = tmp_path / "t.jsonl"
    dump_trace(tr, path)
    assert load_trace(path) == tr
    buf = io.StringIO()
    dump_trace(tr, buf)
    assert loads_trace(buf.getvalue()) == tr


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.builds(
            TraceRequest,
            arrival_s=st.floats(0, 1e6, allow_nan=False),
            model=st.sampled_from(["flux", "sd3", "x-y"]),
            height=st.integers(1, 4096),
            width=st.integers(1, 4096),
            num_frames=st.integers(1, 200),
            num_inference_steps=st.integers(1, 100),
            slo_s=st.none() | st.floats(0.001, 1e4),
            guidance_scale=st.none() | st.floats(0, 20),
        ),
        max_size=20,
    )
)
def test_round_trip_property(reqs: list[TraceRequest]) -> None:
    reqs = sorted(reqs, key=lambda r: r.arrival_s)
    assert loads_trace(dumps_trace(reqs)) == reqs


def test_minimal_line_defaults_and_comments() -> None:
    text = '# a comment\n\n{"arrival_s": 0, "model": "flux", "height": 64, "width": 64, "num_inference_steps": 4}\n'
    (r,) = loads_trace(text)
    assert (r.num_frames, r.slo_s, r.guidance_scale) == (1, None, None)
    (spec,) = to_request_specs([r])
    assert spec.request_id == "r000000" and spec.shape.num_frames == 1 and not spec.shape.cfg


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (
            '{"model": "flux", "height": 64, "width": 64, "num_inference_steps": 4}',
            "missing required key(s) arrival_s",
        ),
        (
            '{"arrival_s": 0, "model": "flux", "height": 64, "width": 64, "num_inference_steps": 4, "frames": 3}',
            "unknown key(s) frames",
        ),
        (
            '{"arrival_s": -1, "model": "flux", "height": 64, "width": 64, "num_inference_steps": 4}',
            "'arrival_s' must be a finite number >= 0",
        ),
        (
            '{"arrival_s": 0, "model": "", "height": 64, "width": 64, "num_inference_steps": 4}',
            "'model' must be a non-empty string",
        ),
        (
            '{"arrival_s": 0, "model": "flux", "height": 64.5, "width": 64, "num_inference_steps": 4}',
            "'height' must be an integer",
        ),
        (
            '{"arrival_s": 0, "model": "flux", "height": 64, "width": 0, "num_inference_steps": 4}',
            "'width' must be in 1..16384",
        ),
        (
            '{"arrival_s": 0, "model": "flux", "height": 64, "width": 64, "num_inference_steps": 4, "slo_s": 0}',
            "'slo_s' must be a finite number > 0",
        ),
        (
            '{"arrival_s": 0, "model": "flux", "height": 64, "width": 64, "num_inference_steps": true}',
            "'num_inference_steps' must be an integer",
        ),
    ],
)
def test_bad_lines_name_the_line(line: str, message: str) -> None:
    good = '{"arrival_s": 0, "model": "flux", "height": 64, "width": 64, "num_inference_steps": 4}'
    with pytest.raises(TraceError) as exc:
        loads_trace(f"{good}\n# comment\n{line}\n{good}\n", source="bad.jsonl")
    assert str(exc.value).startswith("bad.jsonl:3: ")
    assert message in str(exc.value)


def test_duplicate_ids_and_missing_file(tmp_path: Path) -> None:
    line = '{"arrival_s": 0, "model": "flux", "height": 64, "width": 64, "num_inference_steps": 4, "request_id": "a"}'
    with pytest.raises(
        TraceError, match=r"<string>:2: duplicate request_id 'a' \(first on line 1\)"
    ):
        loads_trace(f"{line}\n{line}\n")
    with pytest.raises(TraceError, match="cannot read trace file"):
        load_trace(tmp_path / "nope.jsonl")


def test_unknown_trace_and_bad_rate() -> None:
    with pytest.raises(TraceError, match="unknown trace 'nope'"):
        make_trace("nope")
    with pytest.raises(TraceError):
        make_trace("flux", rate=0)
    assert set(TRACES) >= {"flux", "sd3", "cogvideox", "hunyuanvideo", "mixed", "shifting"}
