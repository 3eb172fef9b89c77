"""``trident report`` on scheduler logs written the way the scheduler writes them: the
counts add up, merged tasks are drawn stage by stage, faults and plan changes are
marked, and a file that is not a Trident log is refused with a clear message."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from trident.report import NotATridentLogError, main, summarize

pytestmark = pytest.mark.timeout(60)

T0 = 1_796_000_000.0


class Log:
    """Scheduler JSON lines, in the shapes trident/runtime/scheduler.py logs them."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.t = T0

    def ev(self, event: str, dt: float = 0.01, component: str = "scheduler", **f: Any) -> None:
        self.t += dt
        self.lines.append({"component": component, **f, "event": event, "ts": self.t})

    def arrive(self, rid: str, model: str = "flux") -> None:
        self.ev("request.arrived", request_id=rid, model=model, height=512, width=512)

    def run(self, rid: str, dev: str, secs: dict[str, float], n: int = 1) -> str:
        tid = f"{rid}.{'+'.join(s[:3] for s in secs)}.{n}"
        self.ev("stage.dispatched", request_id=rid, task_id=tid, stages=list(secs), devices=[dev])
        self.ev("stage.started", task_id=tid, device_id=dev, request_id=rid)
        self.ev(
            "stage.finished",
            dt=sum(secs.values()) + 0.01,
            task_id=tid,
            request_id=rid,
            device_id=dev,
            seconds=secs,
            transfer_s=0.0,
            load_s=0.0,
        )
        return tid

    def finish(self, rid: str, total: float = 1.0, met: bool = True) -> None:
        timings = {"queue": 0.1, "encode": 0.1, "diffuse": 0.7, "decode": 0.1, "total": total}
        self.ev("request.finished", request_id=rid, timings=timings, met_slo=met)

    def fail(self, rid: str, error: str, message: str = "", **f: Any) -> None:
        self.ev("request.failed", request_id=rid, error=error, message=message, **f)

    def write(self, path: Path) -> str:
        path.write_text("".join(json.dumps(e) + "\n" for e in self.lines))
        return str(path)


SECS = {"encode": 0.1, "diffuse": 0.6, "decode": 0.2}


def _mixed_log() -> Log:
    """5 completed (2 late), 1 failed stage, 1 cancelled, 2 pending at the end; 3 refused
    at intake (two marked, one from an older log without the mark), 1 refused by the
    core after its arrival, 1 duplicate id refused while the original ran."""
    g = Log()
    g.ev("scheduler.started", policy="trident")
    g.ev("worker.joined", device_id="n0/sim:0")
    g.ev("worker.joined", device_id="n0/sim:1")
    g.ev("placement.changed", reason="devices joined")
    for i in range(5):
        g.arrive(f"r{i}")
    g.fail("x1", "overloaded", "1024 requests in flight (limit 1024)", admission=True)
    g.fail("x2", "unknown_model", "no model named 'nope'", admission=True)
    g.fail("x3", "invalid_request", "height must be a multiple of 16")  # older log: no mark
    g.fail("r0", "invalid_request", "request id 'r0' is already in flight", admission=True)
    for i in range(5):
        g.run(f"r{i}", f"n0/sim:{i % 2}", SECS)
        g.finish(f"r{i}", total=1.0 + i, met=i < 3)
    g.arrive("late")
    g.fail("late", "overloaded", "predicted to miss its deadline by 9.0s")  # the core's shedding
    g.arrive("bad")
    tid = "bad.enc+dif+dec.1"
    g.ev("stage.dispatched", request_id="bad", task_id=tid, stages=list(SECS), devices=["n0/sim:1"])
    g.ev("stage.started", task_id=tid, device_id="n0/sim:1", request_id="bad")
    g.ev(
        "stage.failed",
        task_id=tid,
        request_id="bad",
        device_id="n0/sim:1",
        error="oom",
        stage="diffuse",
    )
    g.fail("bad", "oom", "diffuse failed on n0/sim:1: out of memory")
    g.arrive("gone")
    g.ev("request.cancel", request_id="gone", reason="client")
    g.fail("gone", "cancelled", "cancelled by the client")
    g.arrive("p1")
    g.arrive("p2")
    g.run("p2", "n0/sim:0", {"encode": 0.1}, n=1)  # one stage done, the rest still to come
    return g


def test_counts_add_up_with_rejections_on_their_own_line(tmp_path: Path, capsys) -> None:
    log = _mixed_log().write(tmp_path / "trident.log")
    out_json = tmp_path / "summary.json"
    assert main([log, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert (
        "requests: 9 = completed 5 + failed 1 (oom 1) + cancelled 1 + pending at log end 2" in out
    )
    assert "rejected at admission: 5" in out and "14 submitted in all" in out
    assert "overloaded 2" in out and "invalid_request 2" in out and "unknown_model 1" in out
    assert "SLO attainment: 21.4% (3 met / 14 submitted" in out
    d = json.loads(out_json.read_text())
    failed = sum(d["failed"].values())
    assert d["requests"] == d["completed"] + failed + d["cancelled"] + d["pending"] == 9
    assert d["submitted"] == d["requests"] + sum(d["rejected"].values()) == 14
    assert d["rejected"] == {"overloaded": 2, "unknown_model": 1, "invalid_request": 2}
    assert d["slo_attainment"] == pytest.approx(3 / 14)


def test_a_duplicate_id_refusal_does_not_end_the_request_in_flight(tmp_path: Path) -> None:
    g = Log()
    g.arrive("r0")
    g.fail("r0", "invalid_request", "request id 'r0' is already in flight")  # no mark
    g.run("r0", "n0/sim:0", SECS)
    g.finish("r0")
    s = summarize(g.write(tmp_path / "log"))
    assert (s.requests, s.finished, s.pending, dict(s.rejected)) == (
        1,
        1,
        0,
        {"invalid_request": 1},
    )


def test_merged_task_is_drawn_stage_by_stage(tmp_path: Path, capsys) -> None:
    g = Log()
    g.arrive("r0")
    tid = "r0.enc+dif+dec.1"
    g.ev("stage.dispatched", request_id="r0", task_id=tid, stages=list(SECS), devices=["d0", "d1"])
    g.ev("stage.started", task_id=tid, device_id="d0", request_id="r0")
    started = g.t
    g.ev(
        "stage.finished",
        dt=1.5,
        task_id=tid,
        request_id="r0",
        device_id="d0",
        seconds=SECS,
        load_s=0.5,
    )
    g.finish("r0")
    log = g.write(tmp_path / "log")
    s = summarize(log)
    on_d0 = [b for b in s.bars if b.device == "d0"]
    assert [b.stage for b in on_d0] == ["load", "encode", "diffuse", "decode"]
    assert [round(b.t1 - b.t0, 6) for b in on_d0] == [0.5, 0.1, 0.6, 0.2]
    assert on_d0[0].t0 == pytest.approx(started)
    assert all(a.t1 == pytest.approx(b.t0) for a, b in itertools.pairwise(on_d0))
    assert [b.stage for b in s.bars if b.device == "d1"] == ["load", "encode", "diffuse", "decode"]
    png = tmp_path / "timeline.png"
    assert main([log, "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_death_rerun_and_placement_changes_are_marked(tmp_path: Path, capsys) -> None:
    g = Log()
    g.ev("worker.joined", device_id="n0/sim:0")
    g.ev("worker.joined", device_id="n0/sim:1")
    g.ev("placement.changed", reason="devices joined")
    g.arrive("r0")
    tid = "r0.enc+dif+dec.1"
    g.ev("stage.dispatched", request_id="r0", task_id=tid, stages=list(SECS), devices=["n0/sim:0"])
    g.ev("stage.started", task_id=tid, device_id="n0/sim:0", request_id="r0")
    g.ev("worker.died", dt=0.5, device_id="n0/sim:0", exitcode=-9, restarts=0)
    died = g.t
    g.ev("worker.lost", device_id="n0/sim:0", reason="process exited with -9")
    g.ev("stage.rerun", request_id="r0", reason=f"task {tid} lost with n0/sim:0")
    g.run("r0", "n0/sim:1", SECS, n=2)
    g.finish("r0")
    g.ev("worker.joined", device_id="n0/sim:0")  # its node restarted it
    g.ev("placement.rehomed", device="n0/sim:0", model="flux", stages=["encode"])
    g.ev("node.lost", node_id="n0", reason="node shut down")  # orderly: not a fault
    log = g.write(tmp_path / "log")
    s = summarize(log)
    kinds = [(m.kind, m.device) for m in s.markers]
    assert kinds.count(("worker_died", "n0/sim:0")) == 1  # died + lost: one death
    assert ("rerun", "n0/sim:0") in kinds
    assert ("worker_restarted", "n0/sim:0") in kinds
    assert ("placement", None) in kinds and ("placement", "n0/sim:0") in kinds
    assert not [k for k, _ in kinds if k == "node_lost"]
    # the task cut short by the death is drawn up to it, marked as lost
    lost = [b for b in s.bars if b.outcome == "lost"]
    assert len(lost) == 1 and lost[0].device == "n0/sim:0" and lost[0].t1 == pytest.approx(died)
    assert (s.finished, s.requests) == (1, 1)
    png = tmp_path / "timeline.png"
    assert main([log, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "worker died / lost 1" in out and "re-run / retry 1" in out
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file"),
        ("", "is empty"),
        ("hello\nthis is a plain text file\n", "holds no JSON lines"),
        ('{"a": 1}\n{"level": "info", "msg": "x"}\n', "none of them a Trident event"),
        (
            '{"component": "node", "event": "node.joined", "ts": 1.0}\n',
            "none from the scheduler",
        ),
        ("DIR", "is a directory"),
    ],
    ids=["missing", "empty", "text", "foreign-json", "node-only", "directory"],
)
def test_a_file_that_is_not_a_trident_log_is_an_error(
    tmp_path: Path, capsys, content: str | None, says: str
) -> None:
    path = tmp_path / "some.log"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    png = tmp_path / "t.png"
    assert main([str(path), "--png", str(png)]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("trident report: error: ") and says in cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    assert not png.exists()
    with pytest.raises(NotATridentLogError):
        summarize(path)
