"""Client SDK: ``AsyncClient`` (asyncio) and ``Client`` (blocking), one result type.

::

    from trident import Client
    with Client("tcp://127.0.0.1:5555") as c:
        r = c.generate(model="flux", prompt="a red fox", height=64, width=64,
                       num_inference_steps=4, seed=0)
        r.array      # numpy float32, exactly diffusers' output_type="np" for this request
        r.images     # PIL images (image models)
        r = c.generate(model="wan", prompt="waves", output_type="mp4")
        r.data       # the MP4 file's bytes, encoded on the decode worker ("png" for images)
        r.timings    # {"queue", "encode", "diffuse", "decode", "transfer", "load", "total"}
        r.devices    # {"encode": [...], "diffuse": [...], "decode": [...]}

Argument names follow diffusers' pipeline ``__call__``. Failures raise the typed
exceptions of :mod:`trident.errors`:

- the first call raises :class:`~trident.errors.ConnectionError` within
  ``connect_timeout`` when no scheduler answers (:class:`AuthenticationError` when the
  scheduler refused this client's CurveZMQ key);
- parameters are checked before anything is sent (:class:`InvalidRequestError`, never
  an ``OverflowError``; NaN and infinities are refused);
- while requests are in flight the client heartbeats the scheduler; when it stops
  answering for ``scheduler_ttl`` seconds they fail with :class:`UnavailableError`
  (a scheduler restarted from its journal within that time carries them on);
- a request ends at ``timeout`` (finite by default) with
  :class:`RequestTimeoutError`, and a timed-out, cancelled (``asyncio`` cancel,
  Ctrl-C) or closed request is cancelled in the scheduler too: its device is freed at
  the next denoising step.

Batching: the scheduler may run a request's diffuse stage in one call together with
other same-shape requests. A batched output matches the unbatched one within 1e-4 (not
bit for bit: matmuls of another batch size round differently). Pass
``allow_batching=False`` to ``generate`` for outputs bit-for-bit equal to diffusers'.

Progress: ``generate(..., on_progress=fn)`` calls ``fn(ProgressEvent)`` as the diffuse
stage reports its denoising steps (at most every 0.5 s, and the last step; on
``Client`` it is called on the client's loop thread, so it must not block), and
``AsyncClient.generate_events(...)`` is an async iterator of the same events ending
with the :class:`GenerateResult`. Progress is advisory: a report may be dropped under
load, never the request.

``Client`` is a thin blocking wrapper: it runs one ``AsyncClient`` on an event loop
in a background thread, so both behave the same; it is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from trident.errors import (
    AuthenticationError,
    ConnectionError,
    InvalidRequestError,
    ProtocolError,
    RequestTimeoutError,
    TridentError,
    UnavailableError,
    error_from_code,
)
from trident.runtime import protocol
from trident.runtime.serial import unpack_tensors
from trident.runtime.transport import make_socket

__all__ = ["DEFAULT_TIMEOUT_S", "AsyncClient", "Client", "GenerateResult", "ProgressEvent"]

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Largest submit message the SDK sends (the scheduler's default client cap is 1 MiB).
MAX_SUBMIT_BYTES = 512 << 10

T = TypeVar("T")


@dataclass
class GenerateResult:
    """One request's result, in the form ``generate(output_type=...)`` asked for:

    - ``output``: what came over the wire: the float32 array (``"np"``), the uint8 array
      (``"uint8"``), or the encoded file's bytes (``"png"``, ``"mp4"``);
    - ``output_type`` names which; ``shape`` is the decoded array's shape, ``(H, W, 3)``
      or ``(F, H, W, 3)``, whatever the type;
    - ``array``: the pixels as an array: ``output`` itself for ``"np"`` (float32 in
      [0, 1]) and ``"uint8"``, decoded (uint8) from a png (exact) or an mp4 (lossy);
    - ``data``: the file's bytes for ``"png"`` / ``"mp4"`` (``format`` says which).
    """

    request_id: str
    model: str
    output: np.ndarray | bytes
    timings: dict[str, float]
    devices: dict[str, list[str]]
    met_slo: bool | None = None
    slo_s: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    output_type: str = "np"
    shape: tuple[int, ...] = ()
    _decoded: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.shape and isinstance(self.output, np.ndarray):
            self.shape = tuple(int(d) for d in self.output.shape)

    @property
    def format(self) -> str | None:
        """``"png"`` or ``"mp4"`` when ``output`` is an encoded file, else None."""
        return self.output_type if isinstance(self.output, bytes) else None

    @property
    def data(self) -> bytes:
        """The encoded file (``output_type`` ``"png"`` or ``"mp4"``); ValueError for an
        array output."""
        if not isinstance(self.output, bytes):
            raise ValueError(
                f"output_type={self.output_type!r} gives an array (.array), not a file: "
                "ask for 'png' or 'mp4'"
            )
        return self.output

    @property
    def array(self) -> np.ndarray:
        """The pixels: float32 in [0, 1] for ``"np"`` (exactly diffusers'
        ``output_type="np"``), uint8 otherwise (a png or mp4 decoded on first use, with
        Pillow or PyAV)."""
        if isinstance(self.output, np.ndarray):
            return self.output
        if self._decoded is None:
            from trident.runtime.encode import decode_mp4, decode_png

            if self.output_type == "png":
                self._decoded = decode_png(self.output)
            else:
                self._decoded = decode_mp4(self.output, self.shape or None)
            if len(self.shape) == 3 and self._decoded.ndim == 4:
                self._decoded = self._decoded[0]
        return self._decoded

    @property
    def is_video(self) -> bool:
        return len(self.shape) == 4

    @property
    def images(self) -> list[Any]:
        """PIL images: the one image, or every frame of a video."""
        from PIL import Image

        from trident.runtime.encode import to_uint8

        pixels = to_uint8(self.array)
        frames = pixels if pixels.ndim == 4 else pixels[None]
        return [Image.fromarray(f) for f in frames]

    @property
    def latency_s(self) -> float:
        return float(self.timings.get("total", 0.0))


@dataclass(frozen=True)
class ProgressEvent:
    """A running request's progress: ``step`` of ``total`` denoising steps of
    ``stage`` (``"diffuse"``) done."""

    request_id: str
    stage: str
    step: int
    total: int

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


ProgressCallback = Callable[[ProgressEvent], Any]


def _curve(curve_dir: str | None, name: str) -> Any:
    if curve_dir is None:
        return None
    from trident.runtime.security import client_keys

    return client_keys(curve_dir, name)


def _submit_message(
    rid: str,
    model: str,
    params: dict[str, Any],
    slo_s: float | None,
    allow_batching: bool,
    output_type: str = "np",
    fps: int | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """The submit header, validated here with the wire's own bounds, so a bad value
    is an InvalidRequestError naming the parameter before anything is sent."""
    if not isinstance(model, str) or not 0 < len(model) <= 256:
        raise InvalidRequestError(f"model must be a non-empty string, got {model!r}")
    params = {k: v for k, v in params.items() if v is not None or k == "prompt"}
    try:
        typed = msgspec.convert(params, protocol.SubmitParams, strict=False)
        msg = msgspec.convert(
            {
                "id": rid,
                "model": model,
                "params": params,
                "slo_s": slo_s,
                "batch": bool(allow_batching),
                "output_type": output_type,
                "fps": fps,
            },
            protocol.Submit,
            strict=False,
        )
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid parameter: {exc}") from None
    header = protocol.encode(msg)
    if len(header) > MAX_SUBMIT_BYTES:
        raise InvalidRequestError(f"request of {len(header)} bytes exceeds {MAX_SUBMIT_BYTES}")
    return header, typed.to_dict()


def _result_from(
    msg: protocol.Result, frames: list[Any], model: str, params: dict[str, Any]
) -> GenerateResult:
    tensors = unpack_tensors(msg.tensors, frames, as_torch=False)
    out = tensors.get("output")
    if out is None:
        raise ProtocolError("result carries no 'output' tensor", msg.id)
    info = msg.output
    output: np.ndarray | bytes
    if info is None or info.type == "np":
        output = np.array(out, dtype=np.float32, copy=True)  # own the memory, writable
    elif info.type == "uint8":
        output = np.array(out, dtype=np.uint8, copy=True)
    else:
        output = np.asarray(out, dtype=np.uint8).tobytes()  # the file
    return GenerateResult(
        request_id=msg.id,
        model=model,
        output=output,
        output_type=info.type if info is not None else "np",
        shape=tuple(info.shape) if info is not None else (),
        timings={str(k): float(v) for k, v in msg.timings.items()},
        devices={str(k): list(v) for k, v in msg.devices.items()},
        met_slo=msg.met_slo,
        slo_s=msg.slo_s,
        params=params,
    )


class AsyncClient:
    """Asyncio client; many ``generate`` calls may be in flight at once.

    ``timeout``: default seconds a request may take (``generate(timeout=...)`` per
    call). ``connect_timeout``: how long the first call waits for the scheduler.
    ``scheduler_ttl``: in-flight requests fail with UnavailableError when the
    scheduler has not answered a heartbeat for this long.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        scheduler_ttl: float = 15.0,
        curve_dir: str | None = None,
        curve_name: str = "client",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.scheduler_ttl = scheduler_ttl
        self._ctx = zmq.asyncio.Context()
        self._curve = _curve(curve_dir, curve_name)
        self._sock = make_socket(
            self._ctx,
            zmq.DEALER,
            identity=f"cli:{uuid.uuid4().hex}".encode(),
            heartbeat_ms=0,
            curve=self._curve,
        )
        self._watch: Any = None
        if self._curve is not None:
            from trident.runtime.security import HandshakeWatch

            self._watch = HandshakeWatch(self._sock)
        self._sock.connect(address)
        self._waiters: dict[str, asyncio.Future[tuple[Any, list[Any]]]] = {}
        self._progress: dict[str, ProgressCallback] = {}  # request id -> on_progress
        self._callbacks: set[asyncio.Task[Any]] = set()  # async on_progress calls
        self._sent: set[str] = set()
        self._resent: dict[str, int] = {}  # re-sent request -> the last ping nonce before it
        self._last_nonce = 0
        self._pings: dict[int, asyncio.Future[protocol.Pong]] = {}
        self._status_waiters: dict[int, asyncio.Future[protocol.ClusterStatus]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None
        self._seq = itertools.count()
        self._nonces = itertools.count(1)
        self._connected = False
        self._heartbeat_s = 1.0
        self._last_heard = time.monotonic()
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    def _ensure_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read())
        if self._heart is None or self._heart.done():
            self._heart = loop.create_task(self._heartbeat())

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                msg, rest = protocol.decode(frames, protocol.SCHEDULER_TO_CLIENT)
            except ProtocolError:
                continue  # nothing it could be matched to; the request's timeout stands
            self._last_heard = time.monotonic()
            if isinstance(msg, protocol.Pong):
                fut = self._pings.pop(msg.nonce or 0, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                continue
            if isinstance(msg, protocol.Progress):
                self._on_progress(msg)
                continue
            if isinstance(msg, protocol.ClusterStatus):
                status_fut = self._status_waiters.pop(msg.nonce or 0, None)
                if status_fut is not None and not status_fut.done():
                    status_fut.set_result(msg)
                continue
            rid = msg.id
            if (
                isinstance(msg, protocol.Error)
                and msg.code == "unknown_request"
                and rid in self._resent
                and (msg.nonce or 0) <= self._resent[rid]
            ):
                continue  # answers a heartbeat sent before the re-send: stale
            waiter = self._waiters.pop(rid, None) if rid is not None else None
            if waiter is not None and not waiter.done():
                waiter.set_result((msg, rest))
            # An error with no readable id concerns none of our requests in particular
            # (the SDK only sends well-formed ones): it fails nobody.

    def _on_progress(self, msg: protocol.Progress) -> None:
        """Call the request's ``on_progress``; whatever it does (raise, return a
        coroutine) never reaches the reader loop or the request."""
        fn = self._progress.get(msg.id)
        if fn is None:
            return
        event = ProgressEvent(request_id=msg.id, stage=msg.stage, step=msg.step, total=msg.total)
        try:
            out = fn(event)
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                self._callbacks.add(task)
                task.add_done_callback(_callback_done(self._callbacks))
        except Exception:
            pass

    async def _heartbeat(self) -> None:
        """While requests are in flight: ping, and fail them if the scheduler is gone."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            if not self._waiters:
                continue
            nonce = self._last_nonce = next(self._nonces)
            inflight = [rid for rid in self._sent if rid in self._waiters][:10_000]
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(
                    [protocol.encode(protocol.Ping(nonce=nonce, inflight=inflight))],
                    flags=zmq.NOBLOCK,
                ).result()
            self._pings.pop(nonce - 50, None)  # unanswered ones from long ago
            silent = time.monotonic() - self._last_heard
            if silent > self.scheduler_ttl:
                err = UnavailableError(
                    f"scheduler at {self.address} stopped answering ({silent:.0f}s)"
                )
                for rid, fut in list(self._waiters.items()):
                    if not fut.done():
                        fut.set_exception(type(err)(err.message, rid))
                self._waiters.clear()

    def _auth_failure(self) -> str | None:
        return self._watch.poll() if self._watch is not None else None

    async def _connect(self) -> None:
        """The first call proves the scheduler is there, or fails fast and typed."""
        if self._connected:
            return
        deadline = time.monotonic() + self.connect_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                reason = self._auth_failure()
                if reason is not None:
                    raise AuthenticationError(reason)
                raise ConnectionError(
                    f"no scheduler answered at {self.address} within {self.connect_timeout}s"
                )
            try:
                pong = await self._ping(min(left, 0.5))
            except TimeoutError:
                reason = self._auth_failure()
                if reason is not None:
                    raise AuthenticationError(reason) from None
                continue
            self._heartbeat_s = max(0.1, min(5.0, pong.heartbeat_s))
            self._connected = True
            return

    async def _ping(self, timeout: float) -> protocol.Pong:
        self._ensure_tasks()
        nonce = self._last_nonce = next(self._nonces)
        fut: asyncio.Future[protocol.Pong] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = fut
        try:
            await self._send([protocol.encode(protocol.Ping(nonce=nonce))], timeout)
            return await self._await_watching(fut, timeout)
        finally:
            self._pings.pop(nonce, None)

    async def _send(self, frames: list[bytes], timeout: float) -> None:
        """Send without ever blocking for good: a socket with no working connection
        (nobody listening, handshake refused) takes nothing, and that is a TimeoutError
        here after ``timeout``, not a hang."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK).result()
                return
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                reason = self._auth_failure()
                if reason is not None:
                    raise AuthenticationError(reason) from None
                await asyncio.sleep(0.02)

    async def _await_watching(self, fut: asyncio.Future[T], timeout: float) -> T:
        """``fut``'s result within ``timeout`` (TimeoutError otherwise), failing at once
        with AuthenticationError when the handshake was refused meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                return await asyncio.wait_for(asyncio.shield(fut), min(left, 0.2))
            except TimeoutError:
                reason = self._auth_failure()
                if reason is not None:
                    fut.cancel()
                    raise AuthenticationError(reason) from None

    # ------------------------------------------------------------------ API

    async def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        """The scheduler's served models, devices and nodes, and whether it is ready."""
        try:
            pong = await self._ping(timeout)
        except TimeoutError:
            reason = self._auth_failure()
            if reason is not None:
                raise AuthenticationError(reason) from None
            raise ConnectionError(f"no answer from {self.address} within {timeout}s") from None
        return msgspec.structs.asdict(pong)

    async def status(self, timeout: float = 5.0) -> protocol.ClusterStatus:
        """The live cluster as the scheduler sees it: nodes, devices (what each holds
        and runs), each model's queue and recent SLO attainment (``trident status``)."""
        self._ensure_tasks()
        nonce = next(self._nonces)
        fut: asyncio.Future[protocol.ClusterStatus] = asyncio.get_running_loop().create_future()
        self._status_waiters[nonce] = fut
        try:
            await self._send([protocol.encode(protocol.StatusQuery(nonce=nonce))], timeout)
            return await self._await_watching(fut, timeout)
        except TimeoutError:
            raise ConnectionError(f"no status from {self.address} within {timeout}s") from None
        finally:
            self._status_waiters.pop(nonce, None)

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
        on_progress: ProgressCallback | None = None,
        output_type: protocol.OutputType = "np",
        fps: int | None = None,
    ) -> GenerateResult:
        """Generate one image or video; raises the typed errors of :mod:`trident.errors`.

        ``output_type``: the result's form, made on the decode worker so that less
        crosses the network: ``"np"`` (float32 array, exact; the default), ``"uint8"``
        (``(x * 255).round()`` pixels, 4x smaller), ``"png"`` (image models) or ``"mp4"``
        (video models; H.264 at ``fps``, default the family's). Anything else, or a type
        the model cannot give, raises :class:`~trident.errors.InvalidRequestError`. See
        :class:`GenerateResult` for where the output is.

        ``allow_batching``: the scheduler may run this request's diffuse stage in one
        call with other same-shape requests; the output then matches an unbatched run
        within 1e-4. Pass False for outputs bit-for-bit equal to diffusers'.

        ``on_progress``: called with a :class:`ProgressEvent` for each progress report
        of the diffuse stage (on the event loop: it must not block; a coroutine it
        returns is run as a task; whatever it raises is ignored).
        """
        if self._closed:
            raise TridentError("client is closed")
        rid = f"{next(self._seq)}-{uuid.uuid4().hex[:8]}"
        header, params = _submit_message(
            rid,
            model,
            {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "height": height,
                "width": width,
                "num_frames": num_frames,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "seed": seed,
            },
            slo_s,
            allow_batching,
            output_type,
            fps,
        )
        limit = timeout if timeout is not None else self.timeout
        if limit is not None and not limit > 0:
            raise InvalidRequestError(f"timeout must be positive, got {limit!r}")
        await self._connect()
        self._ensure_tasks()
        fut: asyncio.Future[tuple[Any, list[Any]]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        if on_progress is not None:
            self._progress[rid] = on_progress
        self._last_heard = max(self._last_heard, time.monotonic() - self._heartbeat_s)
        try:
            try:
                await self._send([header], self.connect_timeout)
            except TimeoutError:
                raise ConnectionError(
                    f"scheduler at {self.address} takes no requests (not connected)"
                ) from None
            self._sent.add(rid)  # heartbeats name it only once the submit is on the wire
            reply, frames = await asyncio.wait_for(fut, limit)
            if isinstance(reply, protocol.Error) and reply.code == "unknown_request":
                # The submit never reached a scheduler (sent into a connection that was
                # dying as the scheduler restarted): sending it again is safe, since the
                # scheduler refuses an id it already holds or has ended. Once.
                fut = asyncio.get_running_loop().create_future()
                self._waiters[rid] = fut
                self._resent[rid] = self._last_nonce
                await self._send([header], self.connect_timeout)
                reply, frames = await asyncio.wait_for(fut, limit)
        except TimeoutError:
            await self._cancel(rid)
            raise RequestTimeoutError(f"no result within {limit}s", rid) from None
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel(rid))
            raise
        finally:
            self._waiters.pop(rid, None)
            self._progress.pop(rid, None)
            self._sent.discard(rid)
            self._resent.pop(rid, None)
        if isinstance(reply, protocol.Error):
            raise error_from_code(reply.code, reply.message, reply.id)
        return _result_from(reply, frames, model, params)

    async def generate_events(
        self, model: str, prompt: str, *args: Any, **kwargs: Any
    ) -> AsyncIterator[ProgressEvent | GenerateResult]:
        """:meth:`generate` as an async iterator: a :class:`ProgressEvent` per progress
        report, then the :class:`GenerateResult` (a failure raises its typed error).
        Leaving the loop early (``break``, cancel) cancels the request in the scheduler.

        ::

            async for event in client.generate_events(model="wan", prompt="waves"):
                if isinstance(event, ProgressEvent):
                    print(f"{event.fraction:.0%}")
                else:
                    video = event.array
        """
        if "on_progress" in kwargs:
            raise TypeError("generate_events reports progress itself: pass no on_progress")
        events: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        task = asyncio.ensure_future(
            self.generate(model, prompt, *args, on_progress=events.put_nowait, **kwargs)
        )
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            elif not task.cancelled():
                task.exception()  # seen (raised above, or dropped with the loop)

    async def _cancel(self, rid: str) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart(
                [protocol.encode(protocol.Cancel(id=rid))], flags=zmq.NOBLOCK
            ).result()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for rid in list(self._waiters):
            await self._cancel(rid)
        for task in (self._reader, self._heart):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._watch is not None:
            self._watch.close()
        self._sock.close(0)
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _callback_done(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # an on_progress coroutine's failure is its own

    return done


class Client:
    """Blocking client: an :class:`AsyncClient` on a private event loop thread.
    Thread-safe (calls from several threads run concurrently); not fork-safe."""

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        scheduler_ttl: float = 15.0,
        curve_dir: str | None = None,
        curve_name: str = "client",
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="trident-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(
                address,
                timeout=timeout,
                connect_timeout=connect_timeout,
                scheduler_ttl=scheduler_ttl,
                curve_dir=curve_dir,
                curve_name=curve_name,
            )

        try:
            self._async = self._call(make())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if os.getpid() != self._pid:
            coro.close()
            raise TridentError("a Client cannot be used across fork(); make one per process")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            if not fut.done():  # interrupted (Ctrl-C): cancel the request too
                fut.cancel()
                with contextlib.suppress(BaseException):
                    fut.result(timeout=2.0)
            raise

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._call(self._async.ping(timeout))

    def status(self, timeout: float = 5.0) -> protocol.ClusterStatus:
        """See :meth:`AsyncClient.status`."""
        return self._call(self._async.status(timeout))

    def generate(self, model: str, prompt: str, *args: Any, **kwargs: Any) -> GenerateResult:
        """Same arguments as :meth:`AsyncClient.generate`; blocks until done.
        ``on_progress`` is called on the client's loop thread (keep it quick)."""
        return self._call(self._async.generate(model, prompt, *args, **kwargs))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if os.getpid() == self._pid and self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._async.close(), self._loop).result(
                    timeout=5.0
                )
        self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
