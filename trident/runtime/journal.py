"""Append-only, fsync'd request journal: accepted requests survive a scheduler crash.

The scheduler daemon journals every request it accepts and every request that ends, so
that after a crash (SIGKILL, power loss) and restart it can re-admit the requests that
were accepted but never answered, instead of losing them silently.

Layout: ``DIR/journal.log`` (0600; ``DIR`` is created 0700), plus ``DIR/journal.lock``,
an ``flock`` that keeps a second daemon from appending to the same log.

Record format: one msgpack map per record, framed as::

    4-byte big-endian payload length | payload | 4-byte big-endian CRC32 of the payload

so that a record torn by a crash is detected. Replay reads records in order and stops
at the first bad one:

* a torn tail (the last record runs past the end of the file, or the rest of the file
  is zeros) is what a crash in the middle of a write leaves: it held nothing that was
  committed, so it is dropped (event ``journal.torn_tail``);
* any other bad record (CRC mismatch, absurd length, undecodable or ill-typed payload)
  is corruption in the middle: replay keeps the records before it, logs a warning
  (event ``journal.corrupt``) and keeps a copy of the damaged file as
  ``journal.log.corrupt-<unix time>`` before the log is rewritten without the rest.

Records (the map's ``"t"`` names the kind):

* ``journal`` {v}: the header, first record of every file this module writes;
* ``accepted`` {request_id, client (bytes: the client socket identity), client_rid,
  model, params, slo_s, batchable, arrival_wall (``time.time()`` at acceptance),
  and, only in compacted files, last_stage / stage_info};
* ``progress`` {request_id, stage, info}: the last finished stage of a request;
* ``ended`` {request_id, outcome ("completed" or an error code)}.

Writes are group-committed: :meth:`RequestJournal.accept`, :meth:`~RequestJournal.progress`
and :meth:`~RequestJournal.end` only buffer a record (and update the in-memory view);
:meth:`~RequestJournal.commit` writes everything buffered with one ``write`` and one
``fsync``. The daemon calls ``commit()`` once per loop turn, before it dispatches the
turn's new requests: a request is durable once ``commit()`` has returned.

Compaction: on open, and in ``commit()`` once the log has grown past ``max_bytes``
(default 64 MiB) and to twice its size after the previous compaction, the log is
rewritten to hold only the unfinished accepted records (with their last progress) and
the last ``ended_keep`` ended ids: written to ``DIR/journal.log.tmp``, fsync'd,
``os.replace``'d over the log and the directory fsync'd, so a crash at any point leaves
either the old or the new log.

Failure handling: a failed ``write`` (disk full) truncates the log back to its committed
length and re-raises, keeping the buffer for the next ``commit()``. A failed ``fsync``
leaves the kernel's page state unknown (a later fsync may succeed without the data
having reached the disk), so it breaks the journal: every later call raises
:class:`JournalError` and the daemon should exit and replay.

Not thread-safe: the daemon's single loop owns it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import msgspec

from trident.errors import TridentError
from trident.log import get_logger

__all__ = [
    "DEFAULT_ENDED_KEEP",
    "DEFAULT_MAX_BYTES",
    "JOURNAL_VERSION",
    "MAX_RECORD_BYTES",
    "AcceptedRecord",
    "JournalError",
    "JournalLockedError",
    "RequestJournal",
    "load_journal",
]

JOURNAL_VERSION: Final = 1
# Largest payload of one record. Far above any request the daemon admits; a bound so a
# damaged length field cannot make replay allocate gigabytes.
MAX_RECORD_BYTES: Final = 8 << 20
# Log size past which commit() compacts (see the module docstring).
DEFAULT_MAX_BYTES: Final = 64 << 20
# How many ended request ids are remembered (in memory and across compactions).
DEFAULT_ENDED_KEEP: Final = 100_000

LOG_NAME: Final = "journal.log"
TMP_NAME: Final = "journal.log.tmp"
LOCK_NAME: Final = "journal.lock"

_HEADER = struct.Struct(">I")
_FRAME_OVERHEAD = 2 * _HEADER.size
_OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


class JournalError(TridentError):
    """The journal cannot be used: a failed fsync, or used after close()."""


class JournalLockedError(JournalError):
    """Another process holds the journal directory (a second daemon on the same state)."""


# ---------------------------------------------------------------------------- records


class AcceptedRecord(
    msgspec.Struct, frozen=True, tag="accepted", tag_field="t", omit_defaults=True
):
    """A request the daemon accepted: everything needed to re-admit it after a restart.

    ``params`` goes through msgpack: tuples come back as lists. ``last_stage`` and
    ``stage_info`` are the last :meth:`RequestJournal.progress` seen for the request.
    """

    request_id: str
    client: bytes  # the client's socket identity, to route the reply
    client_rid: str  # the id the client chose
    model: str
    params: dict[str, Any]
    slo_s: float | None
    batchable: bool
    arrival_wall: float  # time.time() at acceptance
    last_stage: str | None = None
    stage_info: dict[str, Any] | None = None


class _Header(msgspec.Struct, frozen=True, tag="journal", tag_field="t"):
    v: int


class _Progress(msgspec.Struct, frozen=True, tag="progress", tag_field="t", omit_defaults=True):
    request_id: str
    stage: str
    info: dict[str, Any] | None = None


class _Ended(msgspec.Struct, frozen=True, tag="ended", tag_field="t"):
    request_id: str
    outcome: str


_Record = _Header | AcceptedRecord | _Progress | _Ended

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[_Record] = msgspec.msgpack.Decoder(_Record)  # type: ignore[arg-type]


def _encode(rec: _Record) -> tuple[bytes, _Record]:
    """Frame one record, and the record as replay will read it back.

    Refuses (ValueError) what replay could not read: msgspec constructors do not check
    types, so the payload is decoded here, and a wrong type fails now rather than at
    replay after a crash (where a record replay rejects stops replay).
    """
    try:
        payload = _encoder.encode(rec)
    except (TypeError, OverflowError, msgspec.EncodeError) as exc:
        raise ValueError(f"journal record is not msgpack-able: {exc}") from exc
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"journal record of {len(payload)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        decoded = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"journal record would not replay: {exc}") from exc
    crc = zlib.crc32(payload) & 0xFFFFFFFF
    return b"".join((_HEADER.pack(len(payload)), payload, _HEADER.pack(crc))), decoded


def _frame(rec: _Record) -> bytes:
    return _encode(rec)[0]


# ---------------------------------------------------------------------------- reading


@dataclass(slots=True)
class _Scan:
    """What one pass over a log found."""

    unfinished: dict[str, AcceptedRecord]  # insertion order = acceptance order
    ended: OrderedDict[str, str]  # request_id -> outcome, oldest first, bounded
    good_end: int  # offset just past the last good record
    file_size: int
    damage: Literal["none", "torn", "corrupt"] = "none"
    reason: str = ""


def _all_zero(f: BinaryIO) -> bool:
    while chunk := f.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _records(f: BinaryIO, size: int, scan: _Scan) -> Iterator[_Record]:
    """Yield the good records of ``f``; on the first bad one, note why in ``scan``."""
    pos = 0
    while pos < size:
        left = size - pos
        if left < _HEADER.size:
            scan.damage, scan.reason = "torn", f"{left} bytes of a record header"
            return
        (length,) = _HEADER.unpack(f.read(_HEADER.size))
        if length == 0 or length > MAX_RECORD_BYTES:
            if length == 0 and _all_zero(f):
                scan.damage, scan.reason = "torn", "zero-filled tail"
            else:
                scan.damage, scan.reason = "corrupt", f"record length {length}"
            return
        end = pos + _FRAME_OVERHEAD + length
        if end > size:
            scan.damage, scan.reason = (
                "torn",
                f"record of {length} bytes cut at {left - _HEADER.size}",
            )
            return
        payload = f.read(length)
        (crc,) = _HEADER.unpack(f.read(_HEADER.size))
        if zlib.crc32(payload) & 0xFFFFFFFF != crc:
            # A write cut short at the very end is a torn tail; before the end, damage.
            scan.damage = "torn" if end == size else "corrupt"
            scan.reason = "CRC mismatch"
            return
        try:
            rec = _decoder.decode(payload)
        except msgspec.DecodeError as exc:
            scan.damage, scan.reason = "corrupt", f"undecodable record: {exc}"
            return
        yield rec
        pos = scan.good_end = end


def _remember_ended(ended: OrderedDict[str, str], request_id: str, outcome: str, keep: int) -> None:
    ended[request_id] = outcome
    ended.move_to_end(request_id)
    while len(ended) > keep:
        ended.popitem(last=False)


def _apply(scan: _Scan, rec: _Record, keep: int) -> None:
    """Fold one record into the state (replay and live updates share this)."""
    if isinstance(rec, AcceptedRecord):
        scan.ended.pop(rec.request_id, None)  # an id reused after it ended
        scan.unfinished[rec.request_id] = rec
    elif isinstance(rec, _Progress):
        old = scan.unfinished.get(rec.request_id)
        if old is not None:
            scan.unfinished[rec.request_id] = msgspec.structs.replace(
                old, last_stage=rec.stage, stage_info=rec.info
            )
    elif isinstance(rec, _Ended):
        scan.unfinished.pop(rec.request_id, None)
        _remember_ended(scan.ended, rec.request_id, rec.outcome, keep)


def _scan(path: Path, keep: int) -> _Scan:
    scan = _Scan(unfinished={}, ended=OrderedDict(), good_end=0, file_size=0)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return scan
    with f:
        scan.file_size = os.fstat(f.fileno()).st_size
        for rec in _records(f, scan.file_size, scan):
            if isinstance(rec, _Header) and rec.v != JOURNAL_VERSION:
                # Never "repair" (compact away) a log this version cannot read.
                raise JournalError(f"{path} is journal version {rec.v}, not {JOURNAL_VERSION}")
            _apply(scan, rec, keep)
    return scan


def load_journal(directory: str | os.PathLike[str]) -> list[AcceptedRecord]:
    """The unfinished requests of the journal in ``directory``, read-only.

    For inspection (tools, tests): no lock is taken and nothing is repaired or
    compacted, so it may run next to a live daemon (it then sees the last commit).
    """
    return list(_scan(Path(directory) / LOG_NAME, DEFAULT_ENDED_KEEP).unfinished.values())


# ---------------------------------------------------------------------------- the journal


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - regular files do not return 0
            raise OSError(errno.EIO, "short write to the journal")
        view, offset = view[n:], offset + n


class RequestJournal:
    """The daemon's request journal in ``directory`` (see the module docstring).

    Opening replays the log (repairing a torn tail, setting a corrupt one aside),
    compacts it and takes the directory's lock; :meth:`replay` then says which
    requests to re-admit.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ended_keep: int = DEFAULT_ENDED_KEEP,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOG_NAME
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._keep = ended_keep
        self._log = get_logger("journal", path=str(self.path))
        self._buffer: list[bytes] = []
        self._fd = -1
        self._lock_fd = -1
        self._broken: str | None = None
        self._size = 0  # committed length of the log
        self._compact_at = max_bytes

        if not self.directory.exists():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
        self._lock()
        try:
            scan = _scan(self.path, ended_keep)
            self._report_damage(scan)
            self._state = scan
            self._compact()
        except BaseException:
            self._close_fds()
            raise

    # -------------------------------------------------------------- opening

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLockedError(
                f"{self.directory} is held by another process (is a scheduler already running?)"
            ) from None
        self._lock_fd = fd

    def _report_damage(self, scan: _Scan) -> None:
        dropped = scan.file_size - scan.good_end
        if scan.damage == "torn":
            self._log.warning(
                "journal.torn_tail", offset=scan.good_end, dropped_bytes=dropped, reason=scan.reason
            )
        elif scan.damage == "corrupt":
            copy = self.directory / f"{LOG_NAME}.corrupt-{int(time.time())}"
            kept: str | None = str(copy)
            try:
                os.link(self.path, copy)  # a second name for the damaged inode: no copy
            except OSError:
                kept = None
            self._log.warning(
                "journal.corrupt",
                offset=scan.good_end,
                dropped_bytes=dropped,
                reason=scan.reason,
                unfinished=len(scan.unfinished),
                kept_copy=kept,
            )

    # -------------------------------------------------------------- writing

    def _check(self) -> None:
        if self._broken is not None:
            raise JournalError(f"journal unusable: {self._broken}")
        if self._fd < 0:
            raise JournalError("journal is closed")

    def _add(self, rec: _Record) -> None:
        self._check()
        framed, decoded = _encode(rec)  # raises before anything changes
        self._buffer.append(framed)
        # The decoded form, so the live view equals what a replay would give.
        _apply(self._state, decoded, self._keep)

    def accept(self, rec: AcceptedRecord) -> None:
        """Buffer an accepted request; durable after the next :meth:`commit`.

        Raises ValueError for a request id already unfinished, or a record that is not
        msgpack-able, ill-typed or over :data:`MAX_RECORD_BYTES`.
        """
        if rec.request_id in self._state.unfinished:
            raise ValueError(f"request {rec.request_id!r} is already in the journal")
        if rec.last_stage is not None or rec.stage_info is not None:
            rec = msgspec.structs.replace(rec, last_stage=None, stage_info=None)
        self._add(rec)

    def progress(self, request_id: str, stage: str, info: dict[str, Any] | None = None) -> bool:
        """Buffer the last finished stage of an unfinished request (ignored otherwise).

        Returns whether it was recorded.
        """
        if request_id not in self._state.unfinished:
            return False
        self._add(_Progress(request_id=request_id, stage=stage, info=info))
        return True

    def end(self, request_id: str, outcome: str) -> bool:
        """Buffer the end of a request: ``"completed"`` or the error code it failed with.

        Idempotent; a request the journal does not hold unfinished is ignored. Returns
        whether it was recorded.
        """
        if request_id not in self._state.unfinished:
            return False
        self._add(_Ended(request_id=request_id, outcome=outcome))
        return True

    def commit(self) -> int:
        """Make every buffered record durable: one write, one fsync. Returns their count.

        A no-op (no syscall) when nothing is buffered. May compact afterwards.
        """
        self._check()
        if not self._buffer:
            return 0
        data = b"".join(self._buffer)
        try:
            _write_all(self._fd, data, self._size)
        except OSError:
            # Cut a partial group off again, or the next commit would append behind a
            # torn record that replay stops at. The buffer stays for a retry.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        if self._fsync:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._broken = f"fsync failed: {exc}"
                raise JournalError(self._broken) from exc
        count = len(self._buffer)
        self._buffer.clear()
        self._size += len(data)
        if self._size > self._compact_at:
            self._compact()
        return count

    def _compact(self) -> None:
        """Rewrite the log as its live state, atomically (see the module docstring)."""
        started = time.perf_counter()
        before = self._state.file_size if self._fd < 0 else self._size
        parts = [_frame(_Header(v=JOURNAL_VERSION))]
        parts += [_frame(_Ended(request_id=r, outcome=o)) for r, o in self._state.ended.items()]
        parts += [_frame(rec) for rec in self._state.unfinished.values()]
        data = b"".join(parts)
        tmp = self.directory / TMP_NAME
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _OPEN_FLAGS, 0o600)
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, data, 0)
            if self._fsync:
                os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self._fsync:
            try:
                _fsync_dir(self.directory)
            except OSError as exc:
                os.close(fd)
                self._broken = f"directory fsync failed: {exc}"
                raise JournalError(self._broken) from exc
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._size = len(data)
        self._compact_at = max(self._max_bytes, 2 * self._size)
        self._log.info(
            "journal.compacted",
            before_bytes=before,
            after_bytes=self._size,
            unfinished=len(self._state.unfinished),
            ended=len(self._state.ended),
            ms=round((time.perf_counter() - started) * 1e3, 3),
        )

    # -------------------------------------------------------------- reading

    def replay(self) -> list[AcceptedRecord]:
        """The accepted requests with no end, in acceptance order, each with its last
        progress: what the daemon re-admits after a restart."""
        return list(self._state.unfinished.values())

    def ended_ids(self) -> set[str]:
        """The last ``ended_keep`` ended request ids (a copy), so the daemon can refuse a
        duplicate of a request that already finished. Per-request: :meth:`ended_outcome`."""
        return set(self._state.ended)

    def ended_outcome(self, request_id: str) -> str | None:
        """How a recently ended request ended, or None if it is not remembered as ended."""
        return self._state.ended.get(request_id)

    def is_unfinished(self, request_id: str) -> bool:
        """Whether the journal holds ``request_id`` as accepted and not ended."""
        return request_id in self._state.unfinished

    @property
    def size(self) -> int:
        """Committed length of the log in bytes."""
        return self._size

    @property
    def buffered(self) -> int:
        """Records waiting for :meth:`commit`."""
        return len(self._buffer)

    # -------------------------------------------------------------- closing

    def _close_fds(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def close(self) -> None:
        """Commit what is buffered, then close the log and release the lock. Idempotent."""
        if self._fd < 0:
            self._close_fds()
            return
        try:
            if self._broken is None:
                self.commit()
        finally:
            self._close_fds()

    def __enter__(self) -> RequestJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
