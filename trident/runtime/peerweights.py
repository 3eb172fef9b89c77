"""Peer weight copies on one node: a stage's weights in one shared-memory file that
every same-node worker holding the stage keeps a name of.

When the scheduler says a stage loads from a ``peer`` (a same-node device holds it,
:mod:`trident.sched.residency`), the worker looks for that stage's weight file on its
node, maps it and builds the stage's modules around the mapped tensors
(:func:`trident.pipelines.weights.build_modules`): no weight file is read, no tensor
copied on CPU (the mapping is private, copy-on-write: a module that wrote to a weight
would change only its own copy). On a GPU the tensors are copied from the mapping to the
device (``.to(device)``): the worker process sees one GPU, so a device-to-device copy
from the peer is not possible from here; the node's host copy is what it reads.

The first device of a node to load a stage from disk or the page cache publishes the
file (written under a temporary name, then renamed, so a reader never sees half of
it); on CPU it then re-points its own modules at the mapping, so the node holds one
copy of those weights however many devices hold the stage. Each device that loads from
the file hard-links it under its own name, so the file lives exactly as long as some
live device of the node holds the stage:

- names: ``<segment_prefix(node, index, pid)>w<digest>``, digest = the (model, stage,
  dtype) key's hash; a device unlinks its name when it unloads the stage or exits; the
  node unlinks a dead worker's names with its other segments (the same prefix,
  :func:`trident.runtime.shm.unlink_segments`), and a starting node sweeps those of
  dead pids (:func:`trident.runtime.shm.sweep_dead`);
- a mapped file stays valid after every name is gone (POSIX): a device that loaded from
  a peer keeps serving when that peer dies.

Layout: 16-byte header (magic, manifest length), a msgpack manifest (key, tensors as
``[name, dtype, shape, offset, nbytes]``, aliases), each tensor at the same address
modulo 64 as the publisher's own copy (:func:`_place`).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from trident.runtime.shm import SHM_DIR, _owner_pid, _pid_alive, list_segments, node_prefix
from trident.runtime.shm import segment_prefix as _segment_prefix

__all__ = ["PeerWeights", "WeightKey", "peer_weights_enabled"]

_MAGIC = b"TRIDWTS1"
_HEADER = struct.Struct("<8sQ")
_ALIGN = 64
_MAX_MANIFEST = 64 << 20


def peer_weights_enabled() -> bool:
    """Whether workers share stage weights through the node (``TRIDENT_PEER_WEIGHTS``,
    default on)."""
    v = os.environ.get("TRIDENT_PEER_WEIGHTS", "1").strip().lower()
    return v not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class WeightKey:
    model: str
    stage: str
    dtype: str  # torch dtype name: "float32", "bfloat16", "float16"

    @property
    def digest(self) -> str:
        raw = f"{self.model}\0{self.stage}\0{self.dtype}".encode()
        return hashlib.sha1(raw).hexdigest()[:16]

    def as_list(self) -> list[str]:
        return [self.model, self.stage, self.dtype]


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _place(offset: int, t: Any) -> int:
    """Where tensor ``t`` goes at or after ``offset``: at the same address modulo
    ``_ALIGN`` as ``t`` itself (the mapping starts on a page). AVX-512 CPU kernels give
    results that differ in the last bits with a weight's alignment (tiny flux's
    transformer: 8e-7 apart at 0 vs 8 mod 64), and a stage read from the model
    directory has its tensors where the safetensors file put them: a copy at the same
    alignment keeps peer loads and the publisher's own switch to its copy bit-identical
    to a directory load, and so to diffusers."""
    want = t.data_ptr() % _ALIGN if t.numel() else 0
    return _align(offset) + want


def _dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view[: 1 << 30], offset)
        view, offset = view[n:], offset + n


class PeerWeights:
    """One worker's side: publish a stage's weights, find and map a peer's, drop ours."""

    def __init__(self, node_id: str, index: int, pid: int, directory: Path | None = None) -> None:
        self.node_id = node_id
        self.directory = directory or SHM_DIR
        self.prefix = _segment_prefix(node_id, index, pid)
        self.pid = pid

    def _own(self, key: WeightKey) -> Path:
        return self.directory / f"{self.prefix}w{key.digest}"

    def holds(self, key: WeightKey) -> bool:
        """Whether we have a name of ``key``'s file (we published or linked it)."""
        return self._own(key).exists()

    def has_peer(self, key: WeightKey) -> bool:
        """Whether a live same-node peer has ``key``'s file."""
        return bool(self._candidates(key))

    def _candidates(self, key: WeightKey) -> list[Path]:
        """Same-node names of ``key``'s file whose owner is alive, ours excluded."""
        prefix = node_prefix(self.node_id)
        suffix = f"-w{key.digest}"
        out = []
        for name in list_segments(prefix, self.directory):
            rest = name[len(prefix) :]
            if rest.count("-") != 2 or not name.endswith(suffix) or name.startswith(self.prefix):
                continue
            pid = _owner_pid(name)
            if pid is not None and _pid_alive(pid):
                out.append(self.directory / name)
        return out

    # ------------------------------------------------------------------ reading

    def open(self, key: WeightKey) -> Any | None:
        """A peer's copy of ``key`` as a :class:`trident.pipelines.weights.StageTensors`
        over a private mapping, the file linked under our name; None if no live peer of
        this node has published it."""
        for path in self._candidates(key):
            try:
                weights = self._map(path, key)
            except (OSError, ValueError) as exc:
                if isinstance(exc, FileNotFoundError):
                    continue  # its holder let go between the listing and the open
                raise
            own = self._own(key)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(own)
            with contextlib.suppress(FileNotFoundError):
                # Gone since the map: we hold the weights, only without a name for others.
                os.link(path, own)
            return weights
        return None

    def _map(self, path: Path, key: WeightKey) -> Any:
        import torch

        from trident.pipelines.weights import StageTensors

        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise ValueError(f"weight file {path.name}: {size} bytes, no header")
            # Private and writable: pages stay shared until a module writes to one.
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        magic, mlen = _HEADER.unpack_from(mm, 0)
        if magic != _MAGIC or mlen > _MAX_MANIFEST or _HEADER.size + mlen > size:
            raise ValueError(f"weight file {path.name}: bad header")
        manifest = msgpack.unpackb(mm[_HEADER.size : _HEADER.size + mlen], raw=False)
        if manifest.get("key") != key.as_list():
            raise ValueError(f"weight file {path.name}: holds {manifest.get('key')}, not {key}")
        out = StageTensors()
        for name, dtype, shape, offset, nbytes in manifest["tensors"]:
            dt = getattr(torch, str(dtype))
            if not isinstance(dt, torch.dtype) or offset < 0 or offset + nbytes > size:
                raise ValueError(f"weight file {path.name}: bad entry {name!r}")
            if nbytes == 0:
                t = torch.empty(shape, dtype=dt)
            else:
                t = torch.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize, offset=offset)
                t = t.view(shape)
            out.tensors[str(name)] = t
        out.aliases = {str(a): str(b) for a, b in manifest.get("aliases", {}).items()}
        return out

    # ------------------------------------------------------------------ writing

    def publish(self, key: WeightKey, weights: Any) -> Any:
        """Write ``weights`` (a ``StageTensors``, on any device) into our file of
        ``key`` and return them mapped from it (CPU tensors). Raises ``OSError`` when
        the node's shared memory is full (nothing is left behind)."""
        import torch

        entries: list[list[Any]] = []
        sources = []
        offset = 0
        for name, t in weights.tensors.items():
            nbytes = t.numel() * t.element_size()
            at = _place(offset, t)
            entries.append([name, _dtype_name(t), list(t.shape), at, nbytes])
            sources.append(t)
            offset = at + nbytes
        manifest = {"key": key.as_list(), "tensors": entries, "aliases": dict(weights.aliases)}
        # Offsets in the manifest are from the file's start: packed once to size it.
        head = _align(_HEADER.size + len(msgpack.packb(manifest)) + 64 * len(entries) + 64)
        for e in entries:
            e[3] += head
        blob = msgpack.packb(manifest)
        if _HEADER.size + len(blob) > head:
            raise ValueError("weight manifest outgrew its reserved space")
        total = max(head + offset, head + 1)
        final = self._own(key)
        tmp = self.directory / f"{self.prefix}t{key.digest}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            # Plain writes, not a mapping: one pass that allocates and copies, and a full
            # tmpfs is an ENOSPC here instead of a SIGBUS on a mapped page.
            _pwrite_all(fd, _HEADER.pack(_MAGIC, len(blob)) + blob, 0)
            for e, t in zip(entries, sources, strict=True):
                if e[4]:
                    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
                    _pwrite_all(fd, memoryview(raw.numpy()), e[3])
            os.ftruncate(fd, total)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return self._map(final, key)

    def drop(self, key: WeightKey) -> None:
        """Our name of ``key``'s file goes (we no longer hold the stage)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._own(key))

    def close(self) -> None:
        """Unlink every weight file name of ours (a clean exit)."""
        for name in list_segments(self.prefix, self.directory):
            rest = name[len(self.prefix) :]
            if rest.startswith(("w", "t")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
