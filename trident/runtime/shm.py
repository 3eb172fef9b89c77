"""Same-node hand-off of kept stage outputs: POSIX shared memory on CPU, CUDA IPC on GPUs.

A worker whose next stage runs on another worker of the **same node** does not send
the output over TCP: on the first same-node ``fetch`` of a kept output the producer
copies it, once, into a shared-memory segment (a file in :data:`SHM_DIR`, ``/dev/shm``)
and answers with the segment's name and layout; the consumer maps it read-only and
rebuilds the tensors over the mapping without a copy (:func:`attach`), exactly as the
TCP path rebuilds them over the received frames (the same :mod:`trident.runtime.serial`
code, so the tensors are bit-identical).

Naming and lifetime (docs/runtime.md, "Same-node hand-off"):

- ``trident-<node>-<index>-<pid>-<seq>``: the producing worker's node id, device index
  and pid, then a counter (:func:`segment_prefix`). One segment per kept output.
- The producer unlinks a segment when its kept output is released (the scheduler's
  ``release``: the stage that consumed it finished, or the request ended), when it
  forgets its outputs (re-registration), and all of its segments at a clean shutdown
  (:meth:`ShmStore.close`). A consumer's mapping outlives the unlink: the kernel frees
  the memory when the last mapping goes.
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
    "list_segments",
    "node_prefix",
    "segment_prefix",
    "shm_enabled",
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


@dataclass(frozen=True)
class ShmSegment:
    """A kept output copied into a segment: what a ``data`` reply says about it."""

    name: str
    size: int
    meta: list[dict[str, Any]]  # serial.pack_tensors' descriptions
    offsets: list[int]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _create(path: Path, tensors: Mapping[str, Any]) -> tuple[int, list[dict[str, Any]], list[int]]:
    """Write ``tensors`` into a new segment at ``path``: (size, meta, offsets)."""
    meta, frames = pack_tensors(tensors)
    offsets, size = [], 0
    for f in frames:
        offsets.append(size)
        size = _align(size + memoryview(f).nbytes)
    size = max(size, ALIGN)  # mmap cannot map an empty file
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # Reserve the pages now: a full tmpfs fails here (ENOSPC) instead of raising
        # SIGBUS on the first write through the mapping.
        os.posix_fallocate(fd, 0, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE) as mm:
            dst = np.frombuffer(mm, dtype=np.uint8)
            for off, f in zip(offsets, frames, strict=True):
                src = np.frombuffer(f, dtype=np.uint8)
                dst[off : off + src.nbytes] = src
            del dst
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)
    return size, meta, offsets


class ShmStore:
    """The producer's side: one segment per kept output, by key.

    :meth:`create` does the copy (callable from a thread); :meth:`adopt`,
    :meth:`release`, :meth:`clear` and :meth:`close` book-keep (the event loop's).
    """

    def __init__(self, prefix: str, directory: Path | None = None) -> None:
        if not NAME_RE.match(prefix + "0"):
            raise ValueError(f"bad segment prefix {prefix!r}")
        self.prefix = prefix
        self.directory = directory or SHM_DIR
        self.segments: dict[str, ShmSegment] = {}
        self._seq = itertools.count()

    def __contains__(self, key: object) -> bool:
        return key in self.segments

    def __len__(self) -> int:
        return len(self.segments)

    def get(self, key: str) -> ShmSegment | None:
        return self.segments.get(key)

    def create(self, tensors: Mapping[str, Any]) -> ShmSegment:
        """A new segment holding ``tensors`` (not yet kept under any key). Raises
        ShmError when the segment cannot be made."""
        name = f"{self.prefix}{next(self._seq)}"
        try:
            size, meta, offsets = _create(self.directory / name, tensors)
        except OSError as exc:
            raise ShmError(f"cannot create segment {name}: {exc}") from exc
        return ShmSegment(name=name, size=size, meta=meta, offsets=offsets)

    def adopt(self, key: str, seg: ShmSegment) -> ShmSegment:
        """Keep ``seg`` under ``key``; if one is kept already, ``seg`` is unlinked and
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / seg.name)

    def release(self, key: str) -> bool:
        """Unlink the segment of ``key`` (its output was released); whether there was one."""
        seg = self.segments.pop(key, None)
        if seg is None:
            return False
        self.discard(seg)
        return True

    def clear(self) -> None:
        for key in list(self.segments):
            self.release(key)

    def close(self) -> None:
        """Clean shutdown: unlink every segment of ours, also any not adopted."""
        self.clear()
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


def attach(
    name: str,
    size: int,
    meta: Sequence[Any],
    offsets: Sequence[int],
    *,
    directory: Path | None = None,
    as_torch: bool | None = None,
) -> dict[str, Any]:
    """The consumer's side: map segment ``name`` read-only and rebuild its tensors over
    the mapping (no copy; read-only, like tensors rebuilt over received frames). The
    mapping lives as long as the tensors do. Raises ShmError."""
    if not NAME_RE.match(name):
        raise ShmError(f"bad segment name {name!r}")
    if len(offsets) != len(meta):
        raise ShmError(f"{len(meta)} tensors described, {len(offsets)} offsets")
    path = (directory or SHM_DIR) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ShmError(f"cannot open segment {name}: {exc}") from exc
    try:
        actual = os.fstat(fd).st_size
        if size <= 0 or size > actual:
            raise ShmError(f"segment {name}: {size} bytes announced, {actual} present")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    except OSError as exc:
        raise ShmError(f"cannot map segment {name}: {exc}") from exc
    finally:
        os.close(fd)
    view = memoryview(mm)
    frames = []
    for desc, off in zip(meta, offsets, strict=True):
        n = _nbytes(desc)
        if off < 0 or off + n > size:
            raise ShmError(f"segment {name}: tensor at {off}+{n} outside {size} bytes")
        frames.append(view[off : off + n])
    try:
        return unpack_tensors(meta, frames, as_torch=as_torch)
    except Exception as exc:
        raise ShmError(f"segment {name}: {exc}") from exc


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
