"""Client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio), one result type.

::

    from trident import Client
    with Client("tcp://127.0.0.1:5555") as c:
        r = c.generate(model="flux", prompt="a red fox", height=64, width=64,
                       num_inference_steps=4, seed=0)
        r.array      # numpy float32, exactly diffusers' output_type="np" for this request
        r.images     # PIL images (image models)
        r.timings    # {"queue", "encode", "diffuse", "decode", "transfer", "load", "total"}
        r.devices    # {"encode": [...], "diffuse": [...], "decode": [...]}

Argument names follow diffusers' pipeline ``__call__``. Failures raise the typed
exceptions of :mod:`trident.errors`.

Batching: the scheduler may run a request's diffuse stage in one call together with
other same-shape requests. A batched output matches the unbatched one within 1e-4 (not
bit for bit: matmuls of another batch size round differently). Pass
``allow_batching=False`` to ``generate`` for outputs bit-for-bit equal to diffusers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from trident.errors import ProtocolError, RequestTimeoutError, TridentError, error_from_code
from trident.runtime import protocol
from trident.runtime.serial import unpack_tensors
from trident.runtime.transport import make_socket

__all__ = ["AsyncClient", "Client", "GenerateResult"]


@dataclass
class GenerateResult:
    request_id: str
    model: str
    array: np.ndarray
    timings: dict[str, float]
    devices: dict[str, list[str]]
    met_slo: bool | None = None
    slo_s: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        return self.array.ndim == 4

    @property
    def images(self) -> list[Any]:
        """PIL images: the one image, or every frame of a video."""
        from PIL import Image

        frames = self.array if self.is_video else self.array[None]
        return [Image.fromarray((np.clip(f, 0.0, 1.0) * 255).round().astype(np.uint8)) for f in frames]

    @property
    def latency_s(self) -> float:
        return float(self.timings.get("total", 0.0))


def _curve(curve_dir: str | None, name: str) -> Any:
    if curve_dir is None:
        return None
    from trident.runtime.security import client_keys

    return client_keys(curve_dir, name)


def _submit_header(
    rid: str,
    model: str,
    prompt: str,
    *,
    negative_prompt: str | None,
    height: int | None,
    width: int | None,
    num_frames: int | None,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    seed: int | None,
    slo_s: float | None,
    allow_batching: bool = True,
) -> tuple[bytes, dict[str, Any]]:
    params: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    params = {k: v for k, v in params.items() if v is not None or k == "prompt"}
    header = protocol.encode("submit", id=rid, model=model, params=params, slo_s=slo_s, batch=bool(allow_batching))
    return header, params


def _result_from(header: dict[str, Any], frames: list[Any], model: str, params: dict[str, Any]) -> GenerateResult:
    tensors = unpack_tensors(header["tensors"], frames, as_torch=False)
    out = tensors.get("output")
    if out is None:
        raise ProtocolError("result carries no 'output' tensor")
    return GenerateResult(
        request_id=str(header["id"]),
        model=model,
        array=np.array(out, dtype=np.float32, copy=True),  # own the memory, writable
        timings={str(k): float(v) for k, v in dict(header["timings"]).items()},
        devices={str(k): list(v) for k, v in dict(header["devices"]).items()},
        met_slo=header.get("met_slo"),
        slo_s=header.get("slo_s"),
        params=params,
    )


def _raise_error(header: dict[str, Any]) -> None:
    raise error_from_code(str(header["code"]), str(header["message"]), header.get("id"))


class AsyncClient:
    """Asyncio client; many ``generate`` calls may be in flight at once."""

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        timeout: float | None = None,
        curve_dir: str | None = None,
        curve_name: str = "client",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._ctx = zmq.asyncio.Context()
        self._sock = make_socket(
            self._ctx, zmq.DEALER, identity=f"cli:{uuid.uuid4().hex}".encode(), heartbeat_ms=0,
            curve=_curve(curve_dir, curve_name),
        )
        self._sock.connect(address)
        self._waiters: dict[str, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._pong: asyncio.Future[dict[str, Any]] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._seq = itertools.count()

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                header, rest = protocol.decode(frames)
            except ProtocolError:
                continue
            if header["t"] == "pong":
                if self._pong is not None and not self._pong.done():
                    self._pong.set_result(header)
                continue
            rid = header.get("id")
            fut = self._waiters.pop(str(rid), None) if rid is not None else None
            if fut is not None and not fut.done():
                fut.set_result((header, rest))
            elif rid is None and header["t"] == "error":
                # A protocol error about something we sent: fail everyone waiting.
                for w in list(self._waiters.values()):
                    if not w.done():
                        w.set_result((header, rest))
                self._waiters.clear()

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        """The scheduler's served models, devices and nodes."""
        self._ensure_reader()
        self._pong = asyncio.get_running_loop().create_future()
        await self._sock.send_multipart([protocol.encode("ping")])
        try:
            return await asyncio.wait_for(self._pong, timeout)
        except TimeoutError:
            raise RequestTimeoutError(f"no answer from {self.address} within {timeout}s") from None

    async def generate(
        self,
        model: str,
        prompt: str,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        *,
        slo_s: float | None = None,
        timeout: float | None = None,
        allow_batching: bool = True,
    ) -> GenerateResult:
        """Generate one image or video; raises the typed errors of :mod:`trident.errors`.

        ``allow_batching``: the scheduler may run this request's diffuse stage in one
        call with other same-shape requests; the output then matches an unbatched run
        within 1e-4. Pass False for outputs bit-for-bit equal to diffusers'.
        """
        self._ensure_reader()
        rid = f"{next(self._seq)}-{uuid.uuid4().hex[:8]}"
        header, params = _submit_header(
            rid, model, prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_frames=num_frames, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, slo_s=slo_s, allow_batching=allow_batching,
        )
        fut: asyncio.Future[tuple[dict[str, Any], list[Any]]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        await self._sock.send_multipart([header])
        limit = timeout if timeout is not None else self.timeout
        try:
            reply, frames = await asyncio.wait_for(fut, limit)
        except TimeoutError:
            self._waiters.pop(rid, None)
            with contextlib.suppress(zmq.ZMQError):
                await self._sock.send_multipart([protocol.encode("cancel", id=rid)])
            raise RequestTimeoutError(f"no result within {limit}s", rid) from None
        if reply["t"] == "error":
            _raise_error(reply)
        return _result_from(reply, frames, model, params)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._sock.close(0)
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """Blocking client. Thread-safe: calls from several threads are serialised."""

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        timeout: float | None = None,
        curve_dir: str | None = None,
        curve_name: str = "client",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = make_socket(
            self._ctx, zmq.DEALER, identity=f"cli:{uuid.uuid4().hex}".encode(), heartbeat_ms=0,
            curve=_curve(curve_dir, curve_name),
        )
        self._sock.connect(address)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._pid = os.getpid()

    def _recv_until(self, want: str | None, deadline: float | None) -> tuple[dict[str, Any], list[Any]]:
        while True:
            wait_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(wait_ms):
                raise TimeoutError
            frames = self._sock.recv_multipart(copy=False)
            try:
                header, rest = protocol.decode(frames)
            except ProtocolError:
                continue
            if want is None and header["t"] == "pong":
                return header, rest
            if want is not None and (header.get("id") == want or (header["t"] == "error" and header.get("id") is None)):
                return header, rest
            # a late reply to an earlier, timed-out request: drop it

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        with self._lock:
            self._sock.send_multipart([protocol.encode("ping")])
            try:
                header, _ = self._recv_until(None, time.monotonic() + timeout)
            except TimeoutError:
                raise RequestTimeoutError(f"no answer from {self.address} within {timeout}s") from None
            return header

    def generate(
        self,
        model: str,
        prompt: str,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        *,
        slo_s: float | None = None,
        timeout: float | None = None,
        allow_batching: bool = True,
    ) -> GenerateResult:
        """Generate one image or video; raises the typed errors of :mod:`trident.errors`.

        ``allow_batching``: the scheduler may run this request's diffuse stage in one
        call with other same-shape requests; the output then matches an unbatched run
        within 1e-4. Pass False for outputs bit-for-bit equal to diffusers'.
        """
        if os.getpid() != self._pid:
            raise TridentError("a Client cannot be used across fork(); make one per process")
        rid = f"{next(self._seq)}-{uuid.uuid4().hex[:8]}"
        header, params = _submit_header(
            rid, model, prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_frames=num_frames, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, slo_s=slo_s, allow_batching=allow_batching,
        )
        limit = timeout if timeout is not None else self.timeout
        with self._lock:
            self._sock.send_multipart([header])
            try:
                reply, frames = self._recv_until(rid, None if limit is None else time.monotonic() + limit)
            except TimeoutError:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart([protocol.encode("cancel", id=rid)])
                raise RequestTimeoutError(f"no result within {limit}s", rid) from None
        if reply["t"] == "error":
            _raise_error(reply)
        return _result_from(reply, frames, model, params)

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
