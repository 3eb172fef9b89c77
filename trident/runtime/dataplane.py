"""Worker-to-worker data plane: kept stage outputs served to the next stage's worker.

A :class:`PeerServer` (ROUTER) answers ``fetch`` for the outputs its worker keeps, with
zero-copy tensor frames; a :class:`PeerClient` keeps one DEALER per peer address and
matches replies to requests by id. Degree-k barriers (``barrier`` -> ``go``) ride the
same sockets. Nothing here decides anything: what to keep and release is the
scheduler's call.
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
from trident.runtime.transport import CurveKeys, bound_address, make_socket

__all__ = ["FetchMissing", "PeerClient", "PeerServer"]

FETCH_TIMEOUT_S = 120.0


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

    async def send_go(self, ident: bytes, task_id: str) -> None:
        await self._send([ident, protocol.encode(protocol.Go(task_id=task_id))])

    async def _send(self, frames: list[Any]) -> None:
        # The fetcher went away, or does not read (its queue is full): never wait on
        # it; a real fetcher whose reply is lost times out and the stage re-runs.
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False).result()

    def close(self) -> None:
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
        self, addr: str, key: str, *, timeout: float = FETCH_TIMEOUT_S
    ) -> tuple[dict[str, Any], float]:
        """(tensors, seconds): the output ``key`` kept at ``addr``. Raises FetchMissing."""
        conn = self._conn(addr)
        rid = str(next(self._ids))
        fut: asyncio.Future[tuple[Any, list[Any]]] = asyncio.get_running_loop().create_future()
        conn.waiting[rid] = fut
        t0 = time.perf_counter()
        try:
            await conn.sock.send_multipart([protocol.encode(protocol.Fetch(key=key, rid=rid))])
            msg, frames = await asyncio.wait_for(fut, timeout)
        finally:
            conn.waiting.pop(rid, None)
        if isinstance(msg, protocol.Missing):
            raise FetchMissing(key)
        return unpack_tensors(msg.tensors, frames), time.perf_counter() - t0

    async def barrier(self, addr: str, task_id: str, rank: int) -> None:
        await self._conn(addr).sock.send_multipart(
            [protocol.encode(protocol.Barrier(task_id=task_id, rank=rank))]
        )

    def close(self) -> None:
        for c in self.conns.values():
            c.reader.cancel()
            c.sock.close(0)
        self.conns.clear()
