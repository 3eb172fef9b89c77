"""The gateway's HTTP API (FastAPI): OpenAI's images and videos endpoints over Trident.

Routes::

    POST   /v1/images/generations     images, answered when done (b64_json or url)
    GET    /v1/images/{id}/content    an image kept for a url response
    POST   /v1/videos                 a video job (JSON or multipart form)
    GET    /v1/videos                 jobs, newest first (after, limit, order)
    GET    /v1/videos/{id}            one job: status and progress
    GET    /v1/videos/{id}/content    the MP4 (variant=thumbnail: its first frame, PNG)
    DELETE /v1/videos/{id}            cancel a queued or running job; delete a finished one
    GET    /v1/models[/{id}]          served models
    GET    /health                    the process is alive
    GET    /ready                     scheduler reachable, every model has a device
    GET    /metrics                   Prometheus: HTTP requests by route and status

The gateway keeps no state but its job store: every request goes to the scheduler
through one :class:`~trident.client.AsyncClient`, so HTTP trouble (slow clients, bad
bodies, disconnects) stays in this process. An image request whose HTTP client goes
away is cancelled in the scheduler.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from trident.client import AsyncClient, GenerateResult
from trident.errors import TridentError
from trident.gateway.encode import MEDIA_TYPES, encode_image
from trident.gateway.errors import GatewayError, error_body, from_trident
from trident.gateway.jobs import JobRunner, db
from trident.gateway.schemas import (
    ImageRequest,
    VideoRequest,
    frames_for,
    invalid,
    parse_model,
    resolve_size,
    video_info,
    video_object,
)
from trident.gateway.store import ACTIVE, Job, JobStore
from trident.log import get_logger
from trident.runtime.metrics import CONTENT_TYPE_LATEST, GatewayMetrics, HttpMetricsMiddleware

__all__ = ["GatewaySettings", "create_app"]

T = TypeVar("T")


@dataclass
class GatewaySettings:
    scheduler: str = "tcp://127.0.0.1:5555"
    state_dir: str = "trident-gateway"
    curve_dir: str | None = None
    curve_name: str | None = None
    retention_s: float = 86_400.0
    request_timeout_s: float = 600.0  # an image request
    job_timeout_s: float = 3600.0  # a video job, from its creation
    max_body_bytes: int = 1 << 20
    max_running_jobs: int = 64
    max_queued_jobs: int = 1000
    lease_s: float = 15.0
    public_url: str | None = None  # base of url responses (default: the request's)
    connect_timeout_s: float = 5.0


class Catalog:
    """The scheduler's served models (its ``ping``), cached for a moment."""

    def __init__(self, client: AsyncClient, ttl_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s  # a ping's wait: then the scheduler is unreachable
        self._pong: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def pong(self, fresh: bool = False, timeout: float | None = None) -> dict[str, Any]:
        async with self._lock:
            if fresh or self._pong is None or time.monotonic() - self._at > self.ttl_s:
                self._pong = await self.client.ping(timeout=timeout or self.timeout_s)
                self._at = time.monotonic()
            return self._pong

    async def model(self, name: str | None, video: bool) -> tuple[str, dict[str, Any]]:
        models: dict[str, dict[str, Any]] = (await self.pong())["models"]
        kind = "video" if video else "image"
        if name is None:
            fitting = sorted(n for n, m in models.items() if bool(m.get("is_video")) == video)
            if len(fitting) != 1:
                raise invalid("model", f"model is required; {kind} models served: {fitting}")
            name = fitting[0]
        info = models.get(name)
        if info is None:
            raise GatewayError(
                404,
                f"no model named {name!r}; served: {sorted(models)}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        if bool(info.get("is_video")) != video:
            other = "/v1/videos" if info.get("is_video") else "/v1/images/generations"
            raise invalid("model", f"{name!r} does not make {kind}s: use POST {other}")
        return name, info


class _BodyTooLarge(GatewayError):
    pass


def _too_large(limit: int) -> _BodyTooLarge:
    return _BodyTooLarge(
        413,
        f"request body exceeds {limit} bytes",
        "invalid_request_error",
        "request_too_large",
    )


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413, by its
    Content-Length up front or once that many bytes arrived."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await _send_error(send, _too_large(self.max_bytes))
                    return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Any, err: GatewayError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(err: GatewayError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise invalid(None, "the request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise invalid(None, f"the request body is not valid JSON: {exc}") from None


async def _until_disconnected(request: Request) -> None:
    """Returns when the HTTP client has gone away (after the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _while_connected(request: Request, work: Awaitable[T]) -> T:
    """``work``, cancelled (with its requests in the scheduler) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise GatewayError(499, "the client closed the request", "invalid_request_error")
    return task.result()


async def _all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run together; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's ASGI app (its lifespan opens the client, store and job runner)."""
    log = get_logger("gateway")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = AsyncClient(
            settings.scheduler,
            timeout=None,
            connect_timeout=settings.connect_timeout_s,
            curve_dir=settings.curve_dir,
            curve_name=settings.curve_name or "client",
        )
        store = await asyncio.to_thread(JobStore, settings.state_dir, settings.retention_s)
        runner = JobRunner(
            store,
            client,
            log=log,
            max_running=settings.max_running_jobs,
            lease_s=settings.lease_s,
            job_timeout_s=settings.job_timeout_s,
        )
        state.update(
            client=client,
            store=store,
            runner=runner,
            catalog=Catalog(client, timeout_s=min(2.0, settings.connect_timeout_s)),
        )
        state["started"] = int(time.time())
        await runner.start()
        log.info("gateway.started", scheduler=settings.scheduler, state_dir=settings.state_dir)
        try:
            yield
        finally:
            await runner.stop()
            await client.close()
            await asyncio.to_thread(store.close)
            log.info("gateway.stopped")

    app = FastAPI(title="Trident gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    metrics = GatewayMetrics()
    # Outermost: it sees every answer, the body limit's 413s included.
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(TridentError)
    async def _trident_error(request: Request, exc: TridentError) -> JSONResponse:
        return _error_response(from_trident(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ())]
        param = loc[-1] if loc else None
        return _error_response(invalid(param, f"{param}: {first.get('msg', 'invalid value')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(GatewayError(exc.status_code, str(exc.detail), kind, code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("handler.failed", path=request.url.path, error=repr(exc))
        return JSONResponse(
            error_body(f"internal error: {exc!r}", "server_error", None, "internal"),
            status_code=500,
        )

    def client() -> AsyncClient:
        c: AsyncClient = state["client"]
        return c

    def store() -> JobStore:
        s: JobStore = state["store"]
        return s

    def catalog() -> Catalog:
        c: Catalog = state["catalog"]
        return c

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    async def trident_call(fn: Callable[[], Awaitable[T]], renames: dict[str, str]) -> T:
        try:
            return await fn()
        except TridentError as exc:
            raise from_trident(exc, renames) from None

    # ------------------------------------------------------------------ health

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body = await asyncio.to_thread(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        try:
            pong = await catalog().pong(fresh=True, timeout=1.0)
        except TridentError as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        models = sorted(pong.get("models", {}))
        unavailable = sorted(pong.get("unavailable", []))
        devices = pong.get("devices", [])
        ok = bool(pong.get("ready")) and bool(devices) and not unavailable
        body = {
            "status": "ready" if ok else "unavailable",
            "models": models,
            "unavailable": unavailable,
            "devices": len(devices),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    # ------------------------------------------------------------------ models

    def model_object(name: str, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": state["started"],
            "owned_by": "trident",
            "trident": info,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        models = (await trident_call(catalog().pong, {}))["models"]
        return {"object": "list", "data": [model_object(n, m) for n, m in sorted(models.items())]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        models = (await trident_call(catalog().pong, {}))["models"]
        if model_id not in models:
            raise GatewayError(
                404, f"no model named {model_id!r}", "invalid_request_error", "model_not_found"
            )
        return model_object(model_id, models[model_id])

    # ------------------------------------------------------------------ images

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> JSONResponse:
        req: ImageRequest = parse_model(ImageRequest, await _json_body(request))
        name, info = await trident_call(lambda: catalog().model(req.model, video=False), {})
        width, height = resolve_size(req.size, info)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        fmt = req.output_format or "png"
        kwargs: dict[str, Any] = {
            "model": name,
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "height": height,
            "width": width,
            "num_inference_steps": req.num_inference_steps,
            "guidance_scale": req.guidance_scale,
            "slo_s": req.slo_s,
            "timeout": settings.request_timeout_s,
            # PNG is made on the decode worker; jpeg / webp here from its uint8 pixels
            # (a quarter of the float32 bytes).
            "output_type": "png" if fmt == "png" else "uint8",
        }
        seeds = [(seed + i) % 2**63 for i in range(req.n)]

        async def run() -> list[GenerateResult]:
            return await _all([client().generate(seed=s, **kwargs) for s in seeds])

        results = await trident_call(lambda: _while_connected(request, run()), {})
        encoded = [
            r.data
            if r.format == fmt
            else await asyncio.to_thread(encode_image, r.array, fmt, req.output_compression)
            for r in results
        ]
        now = time.time()
        data: list[dict[str, Any]] = []
        for blob in encoded:
            if req.response_format == "url":
                image_id = f"img_{uuid.uuid4().hex}"
                file_name = f"{image_id}.{fmt}"
                await db(store().write_output, file_name, blob)
                job = Job(
                    id=image_id,
                    kind="image",
                    model=name,
                    status="completed",
                    created_at=int(now),
                    request={},
                    info={"output_format": fmt},
                    progress=100,
                    completed_at=int(now),
                    expires_at=store().expiry(now),
                    output=file_name,
                )
                await db(store().add, job)
                data.append({"url": f"{base_url(request)}/v1/images/{image_id}/content"})
            else:
                data.append({"b64_json": base64.b64encode(blob).decode()})
        return JSONResponse(
            {
                "created": int(now),
                "data": data,
                "output_format": fmt,
                "size": f"{width}x{height}",
                "trident": {
                    "model": name,
                    "seeds": seeds,
                    "request_ids": [r.request_id for r in results],
                    "timings": [r.timings for r in results],
                    "devices": [r.devices for r in results],
                    "met_slo": [r.met_slo for r in results],
                },
            }
        )

    @app.get("/v1/images/{image_id}/content")
    async def image_content(image_id: str) -> Response:
        job = await db(store().get, image_id, "image")
        path = store().path_of(job) if job is not None else None
        if job is None or path is None or not path.exists():
            raise GatewayError(404, f"no image {image_id!r}", "invalid_request_error", "not_found")
        fmt = str(job.info.get("output_format", "png"))
        return FileResponse(path, media_type=MEDIA_TYPES.get(fmt, "application/octet-stream"))

    # ------------------------------------------------------------------ videos

    async def video_fields(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            try:
                form = await request.form()
            except GatewayError:
                raise
            except Exception as exc:
                raise invalid(None, f"the form could not be read: {exc}") from None
            fields: dict[str, Any] = {}
            for key, value in form.multi_items():
                if not isinstance(value, str):
                    raise invalid(key, f"{key}: file uploads are not supported")
                fields[key] = value
            return fields
        data = await _json_body(request)
        if isinstance(data, dict) and "input_reference" in data:
            raise invalid("input_reference", "input_reference is not supported")
        return data  # type: ignore[no-any-return]

    def get_job_or_404(job: Job | None, video_id: str) -> Job:
        if job is None:
            raise GatewayError(404, f"no video {video_id!r}", "invalid_request_error", "not_found")
        return job

    @app.post("/v1/videos")
    async def create_video(request: Request) -> JSONResponse:
        fields = await video_fields(request)
        if isinstance(fields, dict) and "input_reference" in fields:
            raise invalid("input_reference", "input_reference is not supported")
        req: VideoRequest = parse_model(VideoRequest, fields)
        name, info = await trident_call(lambda: catalog().model(req.model, video=True), {})
        width, height = resolve_size(req.size, info)
        num_frames, fps, note = frames_for(req, info)
        if await db(store().count_active, "video") >= settings.max_queued_jobs:
            raise GatewayError(
                429,
                f"{settings.max_queued_jobs} video jobs queued or running; retry later",
                "rate_limit_error",
                "overloaded",
            )
        now = time.time()
        job = Job(
            id=f"video_{uuid.uuid4().hex}",
            kind="video",
            model=name,
            status="queued",
            created_at=int(now),
            request={
                "model": name,
                "prompt": req.prompt,
                "negative_prompt": req.negative_prompt,
                "height": height,
                "width": width,
                "num_frames": num_frames,
                "num_inference_steps": req.num_inference_steps,
                "guidance_scale": req.guidance_scale,
                "seed": req.seed,
                "slo_s": req.slo_s,
            },
            info=video_info(req, width, height, num_frames, fps, note),
        )
        await db(store().add, job)
        state["runner"].wake()
        log.info("job.created", job_id=job.id, model=name, size=job.info["size"])
        return JSONResponse(video_object(job))

    @app.get("/v1/videos")
    async def list_videos(
        after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise invalid("limit", f"limit={limit}: must be in [1, 100]")
        if order not in ("asc", "desc"):
            raise invalid("order", f"order={order!r}: must be 'asc' or 'desc'")
        try:
            jobs, more = await db(store().page, "video", after, limit, order)
        except KeyError:
            raise invalid("after", f"after={after!r}: no such video") from None
        data = [video_object(j) for j in jobs]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str) -> dict[str, Any]:
        job = get_job_or_404(await db(store().get, video_id, "video"), video_id)
        return video_object(job)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video") -> Response:
        job = get_job_or_404(await db(store().get, video_id, "video"), video_id)
        if variant not in ("video", "thumbnail"):
            raise invalid("variant", f"variant={variant!r}: 'video' or 'thumbnail'")
        path = store().path_of(job)
        if job.status != "completed" or path is None or not path.exists():
            raise GatewayError(
                409,
                f"video {video_id!r} is {job.status}: its content exists once completed",
                "invalid_request_error",
                "not_ready",
            )
        if variant == "thumbnail":
            png = await asyncio.to_thread(_first_frame_png, str(path))
            return Response(png, media_type="image/png")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> dict[str, Any]:
        job = get_job_or_404(await db(store().get, video_id, "video"), video_id)
        if job.status in ACTIVE:
            cancelled = await db(store().cancel, video_id, time.time())
            if cancelled is not None:
                runner: JobRunner = state["runner"]
                task = runner.running.get(video_id)
                if task is not None:
                    task.cancel()  # at once here; another gateway's runner sees the row
                log.info("job.cancelled", job_id=video_id)
                return {
                    "id": video_id,
                    "object": "video.deleted",
                    "deleted": True,
                    "status": "cancelled",
                }
        await db(store().delete, video_id)
        log.info("job.deleted", job_id=video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True, "status": "deleted"}

    app.state.settings = settings
    app.state.gateway = state
    return app


def _first_frame_png(path: str) -> bytes:
    import av

    from trident.gateway.encode import encode_image

    with av.open(path) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            return encode_image(rgb.astype("float32") / 255.0, "png")
    raise TridentError("the video has no frames")
