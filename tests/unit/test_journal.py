"""The request journal: round trips, crash damage (torn tail, corruption, SIGKILL),
compaction, bounds and permissions.

``python tests/unit/test_journal.py [DIR]`` prints commit() latencies with fsync.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from trident.log import get_logger
from trident.runtime import journal as journal_mod
from trident.runtime.journal import (
    MAX_RECORD_BYTES,
    AcceptedRecord,
    JournalError,
    JournalLockedError,
    RequestJournal,
    load_journal,
)

REPO = Path(__file__).resolve().parents[2]


def rec(rid: str, **kw: Any) -> AcceptedRecord:
    fields: dict[str, Any] = {
        "request_id": rid,
        "client": b"\x00\x01client-" + rid.encode(),
        "client_rid": rid,
        "model": "flux",
        "params": {"prompt": f"a cat number {rid}", "seed": 7, "height": 512},
        "slo_s": 12.5,
        "batchable": True,
        "arrival_wall": 1_700_000_000.25,
    }
    fields.update(kw)
    return AcceptedRecord(**fields)


def ids(records: list[AcceptedRecord]) -> list[str]:
    return [r.request_id for r in records]


def frames(path: Path) -> list[tuple[int, int]]:
    """(offset, payload length) of every record in the log."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((pos, length))
        pos += 8 + length
    assert pos == len(data)
    return out


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal"


@pytest.fixture(autouse=True)
def _logging_configured() -> None:
    get_logger("test")  # configure once, so capture_logs() is not overridden later


# ---------------------------------------------------------------------------- basics


def test_round_trip_accept_end_replay(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        assert j.replay() == []
        j.accept(rec("a"))
        j.accept(rec("b", slo_s=None, batchable=False, params={"prompt": ["x", "y"], "b": b"\xff"}))
        j.accept(rec("c"))
        assert j.buffered == 3
        assert j.commit() == 3
        assert j.commit() == 0  # nothing buffered: no write, no fsync
        assert j.end("b", "completed")
        assert not j.end("b", "completed")  # idempotent
        assert not j.end("never-accepted", "overloaded")
        j.commit()
        assert ids(j.replay()) == ["a", "c"]
    with RequestJournal(jdir) as j:
        assert ids(j.replay()) == ["a", "c"]
        assert j.replay()[0] == rec("a")
        assert j.ended_ids() == {"b"}
        assert j.ended_outcome("b") == "completed"
        assert j.ended_outcome("a") is None
        assert j.is_unfinished("a") and not j.is_unfinished("b")
    assert ids(load_journal(jdir)) == ["a", "c"]


def test_unfinished_survive_reopens_with_progress(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        for rid in "abcd":
            j.accept(rec(rid))
        j.progress("b", "encode", {"device": "n0/gpu:1"})
        j.progress("b", "diffuse")
        assert not j.progress("zz", "encode")  # unknown: ignored
        j.end("c", "stage_failed")
    for _ in range(3):  # each open compacts; nothing may drift
        with RequestJournal(jdir) as j:
            got = j.replay()
            assert ids(got) == ["a", "b", "d"]
            assert got[1].last_stage == "diffuse" and got[1].stage_info is None
            assert got[0].last_stage is None
            assert j.ended_outcome("c") == "stage_failed"
    with RequestJournal(jdir) as j:
        j.end("a", "completed")
        j.progress("d", "decode", {"ms": 3.5})
    got = load_journal(jdir)
    assert ids(got) == ["b", "d"]
    assert got[1].last_stage == "decode" and got[1].stage_info == {"ms": 3.5}


def test_live_view_matches_replay(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        j.accept(rec("a", slo_s=3, params={"t": (1, 2)}))  # int slo, tuple param
        live = j.replay()
    assert live == load_journal(jdir)
    assert live[0].slo_s == 3.0 and live[0].params == {"t": [1, 2]}


def test_id_reused_after_it_ended(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        j.accept(rec("a"))
        with pytest.raises(ValueError, match="already"):
            j.accept(rec("a"))
        j.end("a", "completed")
        j.accept(rec("a", model="sd3"))
        assert "a" not in j.ended_ids()
    [again] = load_journal(jdir)
    assert again.model == "sd3"


def test_refuses_bad_records_without_changing_state(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        with pytest.raises(ValueError, match="exceeds"):
            j.accept(rec("big", params={"prompt": "x" * (MAX_RECORD_BYTES + 1)}))
        with pytest.raises(ValueError, match="msgpack"):
            j.accept(rec("obj", params={"x": object()}))
        with pytest.raises(ValueError, match="replay"):
            j.accept(rec("str-client", client="not bytes"))
        with pytest.raises(ValueError):
            j.accept(rec("huge-int", params={"n": 1 << 70}))
        assert j.buffered == 0 and j.replay() == []
        j.accept(rec("ok", params={"prompt": "x" * (1 << 20)}))  # 1 MiB is fine
    assert ids(load_journal(jdir)) == ["ok"]


def test_permissions(jdir: Path) -> None:
    old = os.umask(0o022)
    try:
        with RequestJournal(jdir) as j:
            j.accept(rec("a"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(jdir.stat().st_mode) == 0o700
    for name in ("journal.log", "journal.lock"):
        assert stat.S_IMODE((jdir / name).stat().st_mode) == 0o600, name
    # A log left with looser permissions is rewritten 0600 on open.
    (jdir / "journal.log").chmod(0o644)
    RequestJournal(jdir).close()
    assert stat.S_IMODE((jdir / "journal.log").stat().st_mode) == 0o600
    assert not (jdir / "journal.log.tmp").exists()


def test_second_opener_is_locked_out(jdir: Path) -> None:
    j = RequestJournal(jdir)
    with pytest.raises(JournalLockedError):
        RequestJournal(jdir)
    j.close()
    j.close()  # idempotent
    with pytest.raises(JournalError, match="closed"):
        j.accept(rec("late"))
    RequestJournal(jdir).close()  # the lock went with close()


def test_refuses_a_newer_format(jdir: Path) -> None:
    RequestJournal(jdir).close()
    log = jdir / "journal.log"
    payload = msgspec.msgpack.encode({"t": "journal", "v": 99})
    log.write_bytes(
        struct.pack(">I", len(payload)) + payload + struct.pack(">I", zlib.crc32(payload))
    )
    before = log.read_bytes()
    with pytest.raises(JournalError, match="version 99"):
        RequestJournal(jdir)
    assert log.read_bytes() == before  # not "repaired" away
    with pytest.raises(JournalError, match="version 99"):  # not "locked": no lock leaked
        RequestJournal(jdir)


# ---------------------------------------------------------------------------- damage


def test_torn_tail_loses_only_the_torn_record(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        for rid in "abc":
            j.accept(rec(rid))
            j.commit()
    log = jdir / "journal.log"
    size = log.stat().st_size
    os.truncate(log, size - 3)
    with capture_logs() as logs, RequestJournal(jdir) as j:
        assert ids(j.replay()) == ["a", "b"]
        j.accept(rec("d"))  # appendable afterwards
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["journal.torn_tail"]
    assert ids(load_journal(jdir)) == ["a", "b", "d"]
    assert not list(jdir.glob("journal.log.corrupt-*"))  # a torn tail is no corruption


@pytest.mark.parametrize("damage", ["header", "zeros", "crc_at_end"])
def test_other_torn_tails(jdir: Path, damage: str) -> None:
    with RequestJournal(jdir) as j:
        j.accept(rec("a"))
        j.accept(rec("b"))
    log = jdir / "journal.log"
    last_off, _ = frames(log)[-1]
    data = bytearray(log.read_bytes())
    if damage == "header":  # only part of the next record's length made it
        data += b"\x00\x00"
        expect = ["a", "b"]
    elif damage == "zeros":  # an extended file whose data never reached the disk
        data += bytes(4096)
        expect = ["a", "b"]
    else:  # the last record's bytes are wrong but its length reaches the end
        data[last_off + 8] ^= 0xFF
        expect = ["a"]
    log.write_bytes(bytes(data))
    with RequestJournal(jdir) as j:
        assert ids(j.replay()) == expect
        j.accept(rec("c"))
    assert ids(load_journal(jdir)) == [*expect, "c"]


def test_flipped_byte_in_the_middle_stops_replay_there(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        for rid in "abcde":
            j.accept(rec(rid))
            j.commit()
    log = jdir / "journal.log"
    recs = frames(log)  # header, a, b, c, d, e
    assert len(recs) == 6
    off, length = recs[3]  # "c"
    data = bytearray(log.read_bytes())
    data[off + 4 + length // 2] ^= 0x01
    log.write_bytes(bytes(data))
    damaged = bytes(data)

    assert ids(load_journal(jdir)) == ["a", "b"]  # read-only view agrees
    with capture_logs() as logs, RequestJournal(jdir) as j:
        assert ids(j.replay()) == ["a", "b"]
        j.accept(rec("f"))
    corrupt = [e for e in logs if e["event"] == "journal.corrupt"]
    assert len(corrupt) == 1 and corrupt[0]["log_level"] == "warning"
    assert corrupt[0]["offset"] == off
    [kept] = jdir.glob("journal.log.corrupt-*")  # the evidence is kept
    assert kept.read_bytes() == damaged
    assert ids(load_journal(jdir)) == ["a", "b", "f"]


def test_failed_write_is_cut_off_and_retried(jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = RequestJournal(jdir)
    j.accept(rec("a"))
    j.commit()
    real = os.pwrite
    calls = {"n": 0}

    def half_then_enospc(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "pwrite", half_then_enospc)
    j.accept(rec("b"))
    j.accept(rec("c"))
    with pytest.raises(OSError, match="No space"):
        j.commit()
    assert (jdir / "journal.log").stat().st_size == j.size  # the partial group is gone
    assert j.buffered == 2
    monkeypatch.setattr(journal_mod.os, "pwrite", real)
    assert j.commit() == 2
    j.close()
    assert ids(load_journal(jdir)) == ["a", "b", "c"]


def test_failed_fsync_breaks_the_journal(jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = RequestJournal(jdir)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_mod.os, "fsync", eio)
    j.accept(rec("a"))
    with pytest.raises(JournalError, match="fsync"):
        j.commit()
    monkeypatch.undo()
    with pytest.raises(JournalError, match="unusable"):
        j.accept(rec("b"))
    with pytest.raises(JournalError):
        j.commit()
    j.close()  # no raise, and the lock is released
    RequestJournal(jdir).close()


# ---------------------------------------------------------------------------- compaction


def test_compaction_on_open_keeps_exactly_the_unfinished(jdir: Path) -> None:
    with RequestJournal(jdir) as j:
        for i in range(300):
            j.accept(rec(f"r{i}"))
            if i % 30:
                j.progress(f"r{i}", "encode")
                j.end(f"r{i}", "completed")
            j.commit()
    before = (jdir / "journal.log").stat().st_size
    with RequestJournal(jdir, ended_keep=5) as j:
        after = (jdir / "journal.log").stat().st_size
        assert after < before / 5
        assert ids(j.replay()) == [f"r{i}" for i in range(0, 300, 30)]
        assert len(j.ended_ids()) == 5
    # The compacted file holds: header + 5 ended + 10 accepted, nothing else.
    assert len(frames(jdir / "journal.log")) == 1 + 5 + 10


def test_compaction_when_the_log_grows(jdir: Path) -> None:
    max_bytes = 16 << 10
    with capture_logs() as logs, RequestJournal(jdir, max_bytes=max_bytes, ended_keep=50) as j:
        for i in range(2000):
            j.accept(rec(f"r{i}"))
            if i % 100:
                j.end(f"r{i}", "completed")
            j.commit()
            assert j.size <= max_bytes + 2048  # one commit past the threshold at most
            assert (jdir / "journal.log").stat().st_size == j.size
        live = j.replay()
    compactions = [e for e in logs if e["event"] == "journal.compacted"]
    assert len(compactions) > 5
    assert ids(live) == [f"r{i}" for i in range(0, 2000, 100)]
    assert load_journal(jdir) == live


def test_compaction_does_not_thrash_on_a_big_live_set(jdir: Path) -> None:
    max_bytes = 8 << 10
    with capture_logs() as logs, RequestJournal(jdir, max_bytes=max_bytes) as j:
        for i in range(400):  # ~60 KiB of unfinished requests, far past max_bytes
            j.accept(rec(f"r{i}"))
            j.commit()
    compactions = [e for e in logs if e["event"] == "journal.compacted"]
    assert 2 <= len(compactions) <= 8  # doubling, not once per commit
    assert len(load_journal(jdir)) == 400


def test_ended_ids_bounded(jdir: Path) -> None:
    with RequestJournal(jdir, ended_keep=10) as j:
        for i in range(25):
            j.accept(rec(f"r{i}"))
            j.end(f"r{i}", "completed" if i % 2 else "cancelled")
        assert j.ended_ids() == {f"r{i}" for i in range(15, 25)}
        assert j.ended_outcome("r24") == "cancelled"
        assert j.ended_outcome("r3") is None
    with RequestJournal(jdir, ended_keep=10) as j:  # the same after replay + compaction
        assert j.ended_ids() == {f"r{i}" for i in range(15, 25)}
    with RequestJournal(jdir, ended_keep=3) as j:  # the oldest go first
        assert j.ended_ids() == {"r22", "r23", "r24"}
    with RequestJournal(jdir) as j:
        assert j.ended_ids() == {"r22", "r23", "r24"}  # compaction forgot the rest


# ---------------------------------------------------------------------------- a real crash


def test_sigkill_after_commit_keeps_committed_records(jdir: Path) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from trident.runtime.journal import AcceptedRecord, RequestJournal

        def rec(rid):
            return AcceptedRecord(
                request_id=rid, client=b"\\x00c", client_rid=rid, model="flux",
                params={"prompt": "p" * 100, "seed": 1}, slo_s=None, batchable=True,
                arrival_wall=1.0,
            )

        j = RequestJournal(sys.argv[1])
        for i in range(50):
            j.accept(rec(f"a{i}"))
        j.progress("a7", "encode", {"ms": 2})
        j.end("a0", "completed")
        j.commit()
        j.accept(rec("lost"))  # buffered, never committed
        j.end("a1", "completed")
        os.kill(os.getpid(), 9)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(jdir)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with RequestJournal(jdir) as j:  # the dead process's lock is gone with it
        got = j.replay()
        assert ids(got) == [f"a{i}" for i in range(1, 50)]
        assert got[6].request_id == "a7" and got[6].last_stage == "encode"
        assert j.ended_ids() == {"a0"}


# ---------------------------------------------------------------------------- timings


def _bench(directory: Path) -> None:
    """commit() latency with fsync, 1 and 100 records per commit."""
    j = RequestJournal(directory, max_bytes=1 << 40)
    n = 0
    for batch in (1, 100):
        samples = []
        for _ in range(200 if batch == 1 else 50):
            for _ in range(batch):
                j.accept(rec(f"r{n}"))
                n += 1
            t0 = time.perf_counter()
            j.commit()
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        p50, p99 = samples[len(samples) // 2], samples[int(len(samples) * 0.99)]
        print(
            f"commit of {batch:3d} records: p50 {p50:.3f} ms  p99 {p99:.3f} ms  max {samples[-1]:.3f} ms"
        )
    t0 = time.perf_counter()
    for _ in range(10_000):
        j.accept(rec(f"r{n}"))
        n += 1
    print(f"accept(): {(time.perf_counter() - t0) / 10_000 * 1e6:.1f} us per record (buffering)")
    j.close()
    t0 = time.perf_counter()
    RequestJournal(directory).close()
    print(
        f"open with {n} unfinished records (replay + compaction): {(time.perf_counter() - t0) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    import tempfile

    base = sys.argv[1] if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        _bench(Path(tmp) / "journal")
