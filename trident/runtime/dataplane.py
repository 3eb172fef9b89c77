"""Worker-to-worker data plane: kept stage outputs served to the next stage's worker.

A :class:`PeerServer` (ROUTER) answers ``fetch`` for the outputs its worker keeps, with
zero-copy tensor frames; a :class:`PeerClient` keeps one DEALER per peer address and
matches replies to requests by id. Degree-k barriers (``barrier`` -> ``go``) ride the
same sockets. Nothing here decides anything: what to keep and release is the
scheduler's call.

Same node: a fetcher on the holder's node asks ``fetch(shm=True)``; the holder copies
the output once into a shared-memory segment (:mod:`trident.runtime.shm`; recycled from
its pool when one of the size is free) and answers with its name and generation instead
of frames, and the fetcher maps it (its mappings are cached). Either side falls back to the
frames when the segment cannot be made or mapped. A worker keeping an output exports it
at once (:meth:`PeerServer.export`) and reports the segment with ``task_finished``; the
scheduler hands it to the consumer, which attaches it with no fetch at all
(:func:`shm_output`, :func:`attach_output`; docs/runtime.md, "Same-node hand-off").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from trident.errors import ProtocolError
from trident.runtime import protocol
from trident.runtime.serial import pack_tensors, unpack_tensors
from trident.runtime.shm import ShmError, ShmSegment, ShmStore, attach, node_prefix
from trident.runtime.transport import CurveKeys, bound_address, make_socket

__all__ = ["FetchMissing", "PeerClient", "PeerServer", "attach_output", "shm_output"]

FETCH_TIMEOUT_S = 120.0
INLINE_COPY_BYTES = 8 << 20  # smaller shm exports are copied on the event loop


def _nbytes(tensors: Mapping[str, Any]) -> int:
    return sum(int(getattr(t, "nbytes", 0) or 0) for t in tensors.values())


def shm_output(seg: ShmSegment) -> protocol.ShmOutput:
    """What ``task_finished`` (and then the consumer's ``InputAddr``) says about an
    eagerly exported output: the segment's name with its generation, its layout, and
    the tensors' descriptions."""
    return protocol.ShmOutput(
        name=seg.ref,
        size=seg.size,
        offsets=list(seg.offsets),
        tensors=[protocol.TensorDesc(**m) for m in seg.meta],
    )


def attach_output(ref: protocol.ShmOutput, holder_node: str) -> dict[str, Any]:
    """The tensors of an eagerly exported output, over a (cached) read-only mapping of
    its segment; no request to the holder. Raises ShmError when the segment is not one
    of ``holder_node``'s, is gone, or holds another generation (it was recycled after
    the output's release): the caller fetches instead, and never reads the wrong output."""
    if not ref.name.startswith(node_prefix(holder_node)):
        raise ShmError(f"segment {ref.name} is not one of node {holder_node}'s")
    return attach(ref.name, ref.size, ref.tensors, ref.offsets)


class FetchMissing(Exception):
    """The peer no longer keeps the requested output."""


class PeerServer:
    """Serves ``store[key]`` (a dict of tensors) to whoever fetches ``key``."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        host: str,
        store: Mapping[str, Mapping[str, Any]],
        *,
        on_barrier: Callable[[str, int, bytes], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        curve: CurveKeys | None = None,
        shm: ShmStore | None = None,
    ) -> None:
        # Only cluster members may fetch stage outputs (never a client key).
        self.sock = make_socket(
            ctx,
            zmq.ROUTER,
            curve=curve,
            curve_server=True,
            zap_domain="cluster" if curve is not None else None,
        )
        self.sock.bind(f"tcp://{host}:*")
        self.address = bound_address(self.sock)
        self.store = store
        self.on_barrier = on_barrier
        self.on_error = on_error
        self.shm = shm
        self.shm_failures = 0
        self._exports: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            ident, body = frames[0].bytes, frames[1:]
            try:
                msg, _ = protocol.decode(body, protocol.PEER_REQUEST)
            except ProtocolError as exc:
                if self.on_error:
                    self.on_error(exc.message)
                await self._send([ident, protocol.error_message("protocol", exc.message)])
                continue
            if isinstance(msg, protocol.Fetch):
                kept = self.store.get(msg.key)
                if kept is None:
                    await self._send(
                        [ident, protocol.encode(protocol.Missing(key=msg.key, rid=msg.rid))]
                    )
                elif msg.shm and self.shm is not None:
                    # The copy runs in a thread; barriers and other fetches go on.
                    task = asyncio.create_task(self._send_shm(ident, msg, kept))
                    self._exports.add(task)
                    task.add_done_callback(self._exports.discard)
                else:
                    meta, tensor_frames = pack_tensors(kept)
                    head = protocol.encode(
                        protocol.Data(
                            key=msg.key,
                            rid=msg.rid,
                            tensors=[protocol.TensorDesc(**m) for m in meta],
                        )
                    )
                    await self._send([ident, head, *tensor_frames])
            elif isinstance(msg, protocol.Barrier) and self.on_barrier is not None:
                self.on_barrier(msg.task_id, msg.rank, ident)

    async def _create(self, kept: Mapping[str, Any]) -> ShmSegment | None:
        """A new segment holding ``kept`` (copied on the loop when small, else in a
        thread); None when it cannot be made (counted, the first one reported)."""
        assert self.shm is not None
        try:
            if _nbytes(kept) <= INLINE_COPY_BYTES:  # a thread hop costs more
                return self.shm.create(kept)
            return await asyncio.to_thread(self.shm.create, kept)
        except ShmError as exc:
            self.shm_failures += 1
            if self.on_error and self.shm_failures == 1:
                self.on_error(f"shared memory unavailable, using tcp: {exc}")
            return None

    async def export(self, key: str) -> ShmSegment | None:
        """The kept output ``key``'s segment, made now if it has none (the worker's
        eager export when a task keeps its output); None when shm is off, ``key`` is
        not kept (or was released or replaced while copying) or no segment can be made."""
        if self.shm is None:
            return None
        kept = self.store.get(key)
        if kept is None:
            return None
        seg = self.shm.get(key)
        if seg is not None:
            return seg
        made = await self._create(kept)
        if made is None:
            return None
        if self.store.get(key) is not kept:  # released (or replaced) while we copied
            self.shm.discard(made)
            return None
        return self.shm.adopt(key, made)

    async def _send_shm(self, ident: bytes, msg: protocol.Fetch, kept: Mapping[str, Any]) -> None:
        """Answer a same-node fetch with the output's segment (made on first use)."""
        assert self.shm is not None
        seg = self.shm.get(msg.key)
        if seg is None:
            made = await self._create(kept)
            if made is None:
                meta, frames = pack_tensors(kept)
                head = protocol.Data(
                    key=msg.key, rid=msg.rid, tensors=[protocol.TensorDesc(**m) for m in meta]
                )
                await self._send([ident, protocol.encode(head), *frames])
                return
            if self.store.get(msg.key) is None:  # released while we copied
                self.shm.discard(made)
                await self._send(
                    [ident, protocol.encode(protocol.Missing(key=msg.key, rid=msg.rid))]
                )
                return
            seg = self.shm.adopt(msg.key, made)
        head = protocol.Data(
            key=msg.key,
            rid=msg.rid,
            tensors=[protocol.TensorDesc(**m) for m in seg.meta],
            shm=protocol.ShmRef(name=seg.ref, size=seg.size, offsets=list(seg.offsets)),
        )
        await self._send([ident, protocol.encode(head)])

    async def send_go(self, ident: bytes, task_id: str) -> None:
        await self._send([ident, protocol.encode(protocol.Go(task_id=task_id))])

    async def _send(self, frames: list[Any]) -> None:
        # The fetcher went away, or does not read (its queue is full): never wait on
        # it; a real fetcher whose reply is lost times out and the stage re-runs.
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False).result()

    def close(self) -> None:
        for task in self._exports:
            task.cancel()
        self.sock.close(0)


@dataclass
class _Conn:
    sock: Any
    reader: asyncio.Task[None]
    waiting: dict[str, asyncio.Future[tuple[Any, list[Any]]]] = field(default_factory=dict)


class PeerClient:
    """Fetches kept outputs from peers; one DEALER per peer address."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        on_go: Callable[[str], None] | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self.ctx = ctx
        self.curve = curve
        self.conns: dict[str, _Conn] = {}
        self.on_go = on_go
        self._ids = itertools.count()

    def _conn(self, addr: str) -> _Conn:
        conn = self.conns.get(addr)
        if conn is None:
            sock = make_socket(self.ctx, zmq.DEALER, curve=self.curve)
            sock.connect(addr)
            conn = _Conn(sock=sock, reader=asyncio.create_task(self._read(addr, sock)))
            self.conns[addr] = conn
        return conn

    async def _read(self, addr: str, sock: Any) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                msg, rest = protocol.decode(frames, protocol.PEER_REPLY)
            except ProtocolError:
                continue
            if isinstance(msg, protocol.Go):
                if self.on_go is not None:
                    self.on_go(msg.task_id)
                continue
            if isinstance(msg, protocol.Error):
                continue  # the peer could not read our request: its fetch times out
            waiter = self.conns[addr].waiting.get(msg.rid)
            if waiter is not None and not waiter.done():
                waiter.set_result((msg, rest))

    async def fetch(
        self, addr: str, key: str, *, timeout: float = FETCH_TIMEOUT_S, shm: bool = False
    ) -> tuple[dict[str, Any], float]:
        """(tensors, seconds): the output ``key`` kept at ``addr``. Raises FetchMissing.
        ``shm``: the holder is on this node; take shared memory if it offers it."""
        tensors, secs, _ = await self.fetch_via(addr, key, timeout=timeout, shm=shm)
        return tensors, secs

    async def fetch_via(
        self, addr: str, key: str, *, timeout: float = FETCH_TIMEOUT_S, shm: bool = False
    ) -> tuple[dict[str, Any], float, str]:
        """:meth:`fetch`, and how the tensors came: ``"shm"`` or ``"tcp"``."""
        t0 = time.perf_counter()
        msg, frames = await self._request(addr, key, timeout, shm)
        if isinstance(msg, protocol.Missing):
            raise FetchMissing(key)
        if msg.shm is None:
            return unpack_tensors(msg.tensors, frames), time.perf_counter() - t0, "tcp"
        ref = msg.shm
        try:
            tensors = attach(ref.name, ref.size, msg.tensors, ref.offsets)
        except ShmError:
            # Unlinked under us (its holder died) or unreadable: the bytes over tcp.
            msg, frames = await self._request(addr, key, timeout, False)
            if isinstance(msg, protocol.Missing):
                raise FetchMissing(key) from None
            return unpack_tensors(msg.tensors, frames), time.perf_counter() - t0, "tcp"
        return tensors, time.perf_counter() - t0, "shm"

    async def _request(
        self, addr: str, key: str, timeout: float, shm: bool
    ) -> tuple[Any, list[Any]]:
        conn = self._conn(addr)
        rid = str(next(self._ids))
        fut: asyncio.Future[tuple[Any, list[Any]]] = asyncio.get_running_loop().create_future()
        conn.waiting[rid] = fut
        try:
            await conn.sock.send_multipart(
                [protocol.encode(protocol.Fetch(key=key, rid=rid, shm=shm))]
            )
            return await asyncio.wait_for(fut, timeout)
        finally:
            conn.waiting.pop(rid, None)

    async def barrier(self, addr: str, task_id: str, rank: int) -> None:
        await self._conn(addr).sock.send_multipart(
            [protocol.encode(protocol.Barrier(task_id=task_id, rank=rank))]
        )

    def close(self) -> None:
        for c in self.conns.values():
            c.reader.cancel()
            c.sock.close(0)
        self.conns.clear()
