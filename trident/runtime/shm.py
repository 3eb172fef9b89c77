"""Same-node hand-off of kept stage outputs: POSIX shared memory on CPU, CUDA IPC on GPUs.

A worker whose next stage runs on another worker of the **same node** does not send
the output over TCP: when it keeps the output (:func:`eager_export_enabled`), or else on
the first same-node ``fetch`` of it, the producer copies it, once, into a shared-memory
segment (a file in :data:`SHM_DIR`, ``/dev/shm``); the segment's name and layout reach
the consumer (through the scheduler's ``run_task``, or in the ``fetch`` reply), which
maps it read-only and rebuilds the tensors over the mapping without a copy
(:func:`attach`), exactly as the TCP path rebuilds them over the received frames (the
same :mod:`trident.runtime.serial` code, so the tensors are bit-identical).

Naming and lifetime (docs/runtime.md, "Same-node hand-off"):

- ``trident-<node>-<index>-<pid>-<seq>``: the producing worker's node id, device index
  and pid, then a counter (:func:`segment_prefix`). A reply names ``<file>.<gen>``: the
  file and its generation (also in the segment's header).
- Recycling: when a kept output is released (the scheduler's ``release``: the stage
  that consumed it finished, or the request ended) or forgotten (re-registration), its
  segment goes back to the producer's bounded pool (:class:`ShmStore`, power-of-two
  size classes, LRU-trimmed to :func:`pool_cap`) and is rewritten, already faulted in,
  for a later output under a new generation. The consumer caches its read-only
  mappings (:func:`attach`), so a recycled segment maps for free; a kept output that
  aliases a mapping must be copied out first (:func:`detach`), as the bytes change
  when the producer recycles. At a clean shutdown the producer unlinks all of its
  segments, pooled ones included (:meth:`ShmStore.close`).
- A worker that dies unlinks nothing; its node does, by the dead pid's prefix
  (:func:`unlink_segments`), and a node starting up removes any segment of its node id
  whose pid is gone (:func:`sweep_dead`, after a node crash).

Nothing here imports torch at module level, so ``sim`` workers stay light; the CUDA
path (:func:`cuda_ipc_export`, :func:`cuda_ipc_import`) imports it only when called.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trident.runtime.serial import _TORCH_ONLY, pack_tensors, unpack_tensors

__all__ = [
    "SHM_DIR",
    "ShmError",
    "ShmSegment",
    "ShmStore",
    "attach",
    "cuda_ipc_export",
    "cuda_ipc_import",
    "detach",
    "drop_mappings",
    "eager_export_enabled",
    "in_segment",
    "list_segments",
    "node_prefix",
    "pool_cap",
    "segment_prefix",
    "shm_enabled",
    "size_class",
    "split_ref",
    "sweep_dead",
    "unlink_segments",
]

# Where segments live: tmpfs on Linux (what shm_open uses). TRIDENT_SHM_DIR overrides it
# (tests); TRIDENT_SHM=0 turns the same-node path off (every fetch goes over TCP).
SHM_DIR = Path(os.environ.get("TRIDENT_SHM_DIR", "/dev/shm"))
ALIGN = 64  # every tensor starts on a cache line
NAME_RE = re.compile(r"^trident-[A-Za-z0-9_.-]{1,200}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")


class ShmError(Exception):
    """A segment could not be made or mapped (full tmpfs, gone, malformed)."""


def shm_enabled() -> bool:
    """Whether same-node fetches may use shared memory (``TRIDENT_SHM``, default on)."""
    return os.environ.get("TRIDENT_SHM", "1").strip().lower() not in ("0", "false", "no", "off")


def eager_export_enabled() -> bool:
    """Whether a worker writes a kept output into a segment when its task finishes
    (``TRIDENT_SHM_EAGER``, default on; with ``TRIDENT_SHM`` on), so that a consumer
    on its node attaches it with no fetch. Off: the segment is made on the first
    same-node fetch, as before."""
    eager = os.environ.get("TRIDENT_SHM_EAGER", "1").strip().lower()
    return shm_enabled() and eager not in ("0", "false", "no", "off")


def _safe(node_id: str) -> str:
    # Node ids have no '/' or ':' (the node checks); anything else odd becomes '_', and
    # '-' too, so the name splits back into its fields from the right.
    return _UNSAFE.sub("_", node_id) or "_"


def node_prefix(node_id: str) -> str:
    """The prefix of every segment of ``node_id``'s workers."""
    return f"trident-{_safe(node_id)}-"


def segment_prefix(node_id: str, index: int, pid: int) -> str:
    """The prefix of the segments of the worker ``pid`` serving device ``index``."""
    return f"{node_prefix(node_id)}{int(index)}-{int(pid)}-"


def _owner_pid(name: str) -> int | None:
    """The pid a segment's name carries (``...-<pid>-<seq>``), None if malformed."""
    parts = name.rsplit("-", 3)
    if len(parts) != 4:
        return None
    try:
        return int(parts[2])
    except ValueError:
        return None


def list_segments(prefix: str, directory: Path | None = None) -> list[str]:
    """Names of the segments starting with ``prefix``."""
    d = directory or SHM_DIR
    try:
        return sorted(n for n in os.listdir(d) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def unlink_segments(prefix: str, directory: Path | None = None) -> list[str]:
    """Unlink every segment starting with ``prefix`` (a dead worker's); their names."""
    d = directory or SHM_DIR
    gone = []
    for name in list_segments(prefix, d):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / name)
            gone.append(name)
    return gone


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead(node_id: str, directory: Path | None = None) -> list[str]:
    """Unlink ``node_id``'s segments whose owner pid is no longer alive (a node that
    crashed left them); segments of live workers are kept."""
    d = directory or SHM_DIR
    prefix = node_prefix(node_id)
    gone = []
    for name in list_segments(prefix, d):
        rest = name[len(prefix) :]
        if rest.count("-") != 2:  # another node whose id extends ours
            continue
        pid = _owner_pid(name)
        if pid is not None and not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / name)
                gone.append(name)
    return gone


# ---------------------------------------------------------------------- segments

# Every segment starts with a header: magic, the generation it holds now, the bytes in
# use. The tensors follow at ALIGN-aligned offsets.
_MAGIC = b"TRIDSHM1"
_HEADER = struct.Struct("<8sQQ")
HEADER_BYTES = ALIGN
MIN_CLASS = 1 << 16  # smallest pooled segment (64 KiB)
POOL_MAX_BYTES = 2 << 30
POOL_SHM_FRACTION = 0.25  # of /dev/shm's free space when the store starts


def pool_cap(directory: Path | None = None) -> int:
    """Bytes of released segments a worker keeps for reuse: ``TRIDENT_SHM_POOL_BYTES``,
    else min(2 GiB, a quarter of the directory's free space); 0 turns reuse off."""
    env = os.environ.get("TRIDENT_SHM_POOL_BYTES", "").strip()
    if env:
        return max(0, int(env))
    try:
        st = os.statvfs(directory or SHM_DIR)
        free = st.f_bavail * st.f_frsize
    except OSError:
        return 0
    return int(min(POOL_MAX_BYTES, free * POOL_SHM_FRACTION))


def size_class(nbytes: int) -> int:
    """The file size a segment holding ``nbytes`` gets: the next power of two (at least
    :data:`MIN_CLASS`), so released segments fit later outputs of similar size."""
    return max(MIN_CLASS, 1 << max(0, int(nbytes) - 1).bit_length())


@dataclass(frozen=True)
class ShmSegment:
    """A kept output copied into a segment: what a ``data`` reply says about it."""

    name: str  # the file's name
    size: int  # bytes in use (header + tensors); the file may be larger (its class)
    meta: list[dict[str, Any]]  # serial.pack_tensors' descriptions
    offsets: list[int]
    gen: int = 0  # how many times the file was written, this one included

    @property
    def ref(self) -> str:
        """The name a ``data`` reply carries: ``<file>.<gen>`` (ShmRef.name's pattern
        allows the dot; the file's last field is digits only)."""
        return f"{self.name}.{self.gen}"


def split_ref(ref: str) -> tuple[str, int | None]:
    """(file name, generation) of a reply's segment name; generation None if absent."""
    head, dash, last = ref.rpartition("-")
    seq, dot, gen = last.partition(".")
    if dash and dot and seq.isdigit() and gen.isdigit():
        return f"{head}-{seq}", int(gen)
    return ref, None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(frames: Sequence[Any]) -> tuple[int, list[int]]:
    offsets, size = [], HEADER_BYTES
    for f in frames:
        offsets.append(size)
        size = _align(size + memoryview(f).nbytes)
    return size, offsets


@dataclass
class _Slot:
    """A segment file of ours, mapped writable (already faulted in) for reuse."""

    name: str
    capacity: int
    mm: mmap.mmap
    view: Any  # uint8 numpy view of mm
    gen: int = 0


def _new_slot(path: Path, capacity: int) -> _Slot:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # Reserve the pages now: a full tmpfs fails here (ENOSPC) instead of raising
        # SIGBUS on the first write through the mapping.
        os.posix_fallocate(fd, 0, capacity)
        mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)
    return _Slot(name=path.name, capacity=capacity, mm=mm, view=np.frombuffer(mm, np.uint8))


def _close_slot(slot: _Slot, path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    slot.view = None
    with contextlib.suppress(BufferError, ValueError):
        slot.mm.close()


class ShmStore:
    """The producer's side: one segment per kept output, by key, from a pool.

    A released output's segment goes back to a free pool (LRU, at most :func:`pool_cap`
    bytes) instead of being unlinked; the next output of its size class is written into
    it (pages already faulted in, the fetchers' mappings cached) with the generation
    bumped. :meth:`create` does the copy (callable from a thread); :meth:`adopt`,
    :meth:`release`, :meth:`clear` and :meth:`close` book-keep (the event loop's).
    """

    def __init__(
        self, prefix: str, directory: Path | None = None, *, pool_bytes: int | None = None
    ) -> None:
        if not NAME_RE.match(prefix + "0"):
            raise ValueError(f"bad segment prefix {prefix!r}")
        self.prefix = prefix
        self.directory = directory or SHM_DIR
        self.segments: dict[str, ShmSegment] = {}
        self.pool_bytes = pool_cap(self.directory) if pool_bytes is None else pool_bytes
        self._slots: dict[str, _Slot] = {}  # every file of ours, in use or free
        self._free: OrderedDict[str, _Slot] = OrderedDict()  # LRU first
        self._free_bytes = 0
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.reused = 0  # outputs written into a recycled segment (bench, tests)

    def __contains__(self, key: object) -> bool:
        return key in self.segments

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def pooled(self) -> list[str]:
        """Names of the free (released, kept for reuse) segments."""
        with self._lock:
            return list(self._free)

    def get(self, key: str) -> ShmSegment | None:
        return self.segments.get(key)

    def _take(self, capacity: int) -> _Slot | None:
        with self._lock:
            for name in reversed(self._free):  # the most recently used: warmest
                slot = self._free[name]
                if slot.capacity == capacity:
                    del self._free[name]
                    self._free_bytes -= capacity
                    return slot
        return None

    def create(self, tensors: Mapping[str, Any]) -> ShmSegment:
        """A segment holding ``tensors`` (not yet kept under any key): a free one of its
        size class, else a new one. Raises ShmError when the segment cannot be made."""
        meta, frames = pack_tensors(tensors)
        size, offsets = _layout(frames)
        capacity = size_class(size)
        slot = self._take(capacity)
        if slot is None:
            name = f"{self.prefix}{next(self._seq)}"
            try:
                slot = _new_slot(self.directory / name, capacity)
            except OSError as exc:
                raise ShmError(f"cannot create segment {name}: {exc}") from exc
            with self._lock:
                self._slots[name] = slot
        else:
            self.reused += 1
        slot.gen += 1
        dst = slot.view
        for off, f in zip(offsets, frames, strict=True):
            src = np.frombuffer(f, dtype=np.uint8)
            dst[off : off + src.nbytes] = src
        # The header last: a fetcher checks the generation it was told against it.
        _HEADER.pack_into(slot.mm, 0, _MAGIC, slot.gen, size)
        return ShmSegment(name=slot.name, size=size, meta=meta, offsets=offsets, gen=slot.gen)

    def adopt(self, key: str, seg: ShmSegment) -> ShmSegment:
        """Keep ``seg`` under ``key``; if one is kept already, ``seg`` is discarded and
        the kept one returned."""
        kept = self.segments.get(key)
        if kept is not None:
            self.discard(seg)
            return kept
        self.segments[key] = seg
        return seg

    def export(self, key: str, tensors: Mapping[str, Any]) -> ShmSegment:
        """The segment kept for ``key``, made from ``tensors`` on first use."""
        return self.segments.get(key) or self.adopt(key, self.create(tensors))

    def discard(self, seg: ShmSegment) -> None:
        """A segment no output holds any more: back to the pool (its LRU end), or
        unlinked when the pool would exceed its cap; then the pool is trimmed."""
        gone: list[_Slot] = []
        with self._lock:
            slot = self._slots.get(seg.name)
            if slot is None or seg.name in self._free:
                return
            if slot.capacity > self.pool_bytes:
                del self._slots[seg.name]
                gone.append(slot)
            else:
                self._free[seg.name] = slot
                self._free_bytes += slot.capacity
                while self._free_bytes > self.pool_bytes:
                    _, old = self._free.popitem(last=False)
                    self._free_bytes -= old.capacity
                    del self._slots[old.name]
                    gone.append(old)
        for old in gone:
            _close_slot(old, self.directory / old.name)

    def release(self, key: str) -> bool:
        """Recycle the segment of ``key`` (its output was released); whether there was one."""
        seg = self.segments.pop(key, None)
        if seg is None:
            return False
        self.discard(seg)
        return True

    def clear(self) -> None:
        for key in list(self.segments):
            self.release(key)

    def close(self) -> None:
        """Clean shutdown: unlink every segment of ours (kept, pooled, or never adopted)."""
        self.segments.clear()
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
            self._free.clear()
            self._free_bytes = 0
        for slot in slots:
            _close_slot(slot, self.directory / slot.name)
        unlink_segments(self.prefix, self.directory)


def _nbytes(desc: Any) -> int:
    """The bytes a tensor description needs (serial's rules)."""
    get = desc.get if isinstance(desc, Mapping) else lambda k: getattr(desc, k, None)
    try:
        dtype = str(get("dtype"))
        width = _TORCH_ONLY.get(dtype) or np.dtype(dtype).itemsize
        count = 1
        for d in get("shape") or ():
            count *= int(d)
    except (TypeError, ValueError) as exc:
        raise ShmError(f"malformed tensor description {desc!r}") from exc
    return count * width


# ---------------------------------------------------------------------- the consumer


@dataclass
class _Mapping:
    path: Path
    ino: tuple[int, int]  # (st_dev, st_ino): a name reused for another file misses
    size: int
    mm: mmap.mmap
    view: memoryview


MAP_CACHE_ENTRIES = 64
_cache: OrderedDict[str, _Mapping] = OrderedDict()  # by path, LRU first
_cache_bytes = 0
# Every live read-only mapping of a segment this process made (cached or evicted), by
# start address: (end, the mmap, weakly). Tensors whose memory lies in one of them alias
# a producer's segment that may be rewritten after its release (:func:`detach`).
_regions: dict[int, tuple[int, weakref.ref[mmap.mmap]]] = {}
_cache_lock = threading.Lock()


def _map_cap() -> int:
    env = os.environ.get("TRIDENT_SHM_MAP_CACHE_BYTES", "").strip()
    return max(0, int(env)) if env else POOL_MAX_BYTES


def _evict(path: str) -> None:
    global _cache_bytes
    m = _cache.pop(path, None)
    if m is not None:
        _cache_bytes -= m.size  # the mapping itself lives while tensors use it


def _map(path: Path, name: str, size: int) -> _Mapping:
    """A read-only mapping of the segment file at ``path`` (whole file), cached: the
    same file (device + inode) is mapped once, so a recycled segment costs no page
    faults. Stale entries (file gone or replaced) are dropped on every call."""
    global _cache_bytes
    key = str(path)
    with _cache_lock:
        for k in list(_cache):
            m = _cache[k]
            try:
                st = os.stat(m.path, follow_symlinks=False)
                alive = (st.st_dev, st.st_ino) == m.ino
            except OSError:
                alive = False
            if not alive:
                _evict(k)
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            if size > hit.size:
                raise ShmError(f"segment {name}: {size} bytes announced, {hit.size} present")
            return hit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ShmError(f"cannot open segment {name}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if size <= 0 or size > st.st_size:
            raise ShmError(f"segment {name}: {size} bytes announced, {st.st_size} present")
        mm = mmap.mmap(
            fd, st.st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ
        )
    except OSError as exc:
        raise ShmError(f"cannot map segment {name}: {exc}") from exc
    finally:
        os.close(fd)
    m = _Mapping(path, (st.st_dev, st.st_ino), st.st_size, mm, memoryview(mm))
    start = int(np.frombuffer(mm, np.uint8).ctypes.data)
    with _cache_lock:
        for s in [s for s, (_, ref) in _regions.items() if ref() is None]:
            del _regions[s]
        _regions[start] = (start + m.size, weakref.ref(mm))
        cap = _map_cap()
        if m.size <= cap:
            _cache[key] = m
            _cache_bytes += m.size
            while _cache_bytes > cap or len(_cache) > MAP_CACHE_ENTRIES:
                _evict(next(iter(_cache)))
    return m


def drop_mappings() -> None:
    """Forget every cached mapping (tests; the mappings live while tensors use them)."""
    with _cache_lock:
        for k in list(_cache):
            _evict(k)


def attach(
    name: str,
    size: int,
    meta: Sequence[Any],
    offsets: Sequence[int],
    *,
    directory: Path | None = None,
    as_torch: bool | None = None,
) -> dict[str, Any]:
    """The consumer's side: map segment ``name`` (``<file>.<gen>`` as
    :attr:`ShmSegment.ref` gives, or a plain file name) read-only and rebuild its
    tensors over the mapping (no copy; read-only, like tensors rebuilt over received
    frames). The mapping is cached and lives as long as the tensors do; the generation,
    when given, must match the segment's header (else it was recycled). The tensors may
    be overwritten once the producer's output is released: whoever keeps them past the
    task passes them through :func:`detach`. Raises ShmError."""
    if not NAME_RE.match(name):
        raise ShmError(f"bad segment name {name!r}")
    if len(offsets) != len(meta):
        raise ShmError(f"{len(meta)} tensors described, {len(offsets)} offsets")
    file, gen = split_ref(name)
    m = _map((directory or SHM_DIR) / file, name, size)
    if gen is not None:
        try:
            magic, have, _ = _HEADER.unpack_from(m.mm, 0)
        except struct.error as exc:
            raise ShmError(f"segment {name}: no header") from exc
        if magic != _MAGIC or have != gen:
            raise ShmError(f"segment {name}: holds generation {have}, not {gen} (recycled)")
    frames = []
    for desc, off in zip(meta, offsets, strict=True):
        n = _nbytes(desc)
        if off < 0 or off + n > size:
            raise ShmError(f"segment {name}: tensor at {off}+{n} outside {size} bytes")
        frames.append(m.view[off : off + n])
    try:
        return unpack_tensors(meta, frames, as_torch=as_torch)
    except Exception as exc:
        raise ShmError(f"segment {name}: {exc}") from exc


def _low_address(value: Any) -> int | None:
    """Where a tensor's memory starts (torch: its storage; numpy: its lowest byte)."""
    if isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        low, _ = np.lib.array_utils.byte_bounds(value)
        return int(low)
    storage = getattr(value, "untyped_storage", None)
    if storage is None or getattr(getattr(value, "device", None), "type", "cpu") != "cpu":
        return None
    st = storage()
    return int(st.data_ptr()) if st.nbytes() else None


def in_segment(value: Any) -> bool:
    """Whether ``value``'s memory lies inside a segment mapping of this process."""
    addr = _low_address(value)
    if addr is None:
        return False
    with _cache_lock:
        regions = list(_regions.items())
    return any(start <= addr < end and ref() is not None for start, (end, ref) in regions)


def detach(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` with every tensor that aliases a producer's segment copied out, so
    it survives the producer recycling the segment (a kept output that passes an input
    through; docs/runtime.md). The others are returned as they are (no copy)."""
    if not _regions:
        return dict(tensors)
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        if in_segment(v):
            v = v.copy() if isinstance(v, np.ndarray) else v.clone()
        out[k] = v
    return out


# ---------------------------------------------------------------------- CUDA IPC


def cuda_ipc_export(tensors: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """CUDA tensors as plain (msgpack-able) CUDA IPC descriptions, through torch's
    CUDA IPC (``storage._share_cuda_()``, what ``torch.multiprocessing`` sends); None
    when any tensor is not on a CUDA device, so CPU tensors take the shared-memory
    path and nothing on it imports torch.cuda. The producer keeps the tensors alive (its
    kept output) until ``release``.

    Not exercised without a GPU (see docs/runtime.md): the consumer must see the
    producer's device, which it does not under one-GPU-per-worker
    ``CUDA_VISIBLE_DEVICES``.
    """
    if not tensors or any(
        getattr(getattr(t, "device", None), "type", None) != "cuda" for t in tensors.values()
    ):
        return None
    out = []
    for name, value in tensors.items():
        t = value.detach()
        storage = t.untyped_storage()
        device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = (
            storage._share_cuda_()
        )
        out.append(
            {
                "name": name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "stride": list(t.stride()),
                "offset": int(t.storage_offset()),
                "device": int(device),
                "handle": bytes(handle),
                "storage_bytes": int(size),
                "storage_offset": int(offset),
                "ref_counter_handle": bytes(rc_handle),
                "ref_counter_offset": int(rc_offset),
                "event_handle": bytes(ev_handle) if ev_handle else b"",
                "event_sync_required": bool(ev_sync),
            }
        )
    return out


def cuda_ipc_import(handles: Sequence[Mapping[str, Any]], device: Any) -> dict[str, Any]:
    """Tensors from :func:`cuda_ipc_export`'s descriptions, copied onto ``device`` (so
    the producer may free its memory at ``release``). Raises ShmError when a handle
    cannot be opened (e.g. the producer's GPU is not visible here)."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    out: dict[str, Any] = {}
    try:
        for h in handles:
            t = rebuild_cuda_tensor(
                torch.Tensor,
                torch.Size(h["shape"]),
                tuple(h["stride"]),
                h["offset"],
                torch.storage.TypedStorage,
                getattr(torch, h["dtype"]),
                h["device"],
                h["handle"],
                h["storage_bytes"],
                h["storage_offset"],
                False,
                h["ref_counter_handle"],
                h["ref_counter_offset"],
                h["event_handle"] or None,
                h["event_sync_required"],
            )
            out[h["name"]] = t.to(device, copy=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ShmError(f"cannot open CUDA IPC handles: {exc}") from exc
    return out
