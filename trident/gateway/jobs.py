"""The video job runner: claims queued jobs from the store, runs each through the
AsyncClient, keeps its progress and lease up to date, and stops it when it is cancelled.

One loop, every ``TICK_S`` (or at once when a job is added or ends):

- writes the running jobs' progress (from the SDK's ``on_progress``: denoising steps
  done, as 0-99; 100 is for completed jobs) and renews their leases;
- cancels the running jobs the store says to stop (a DELETE on this gateway or on
  another one sharing the state directory): cancelling the SDK call cancels the request
  in the scheduler, whose device is freed at the next denoising step;
- claims runnable jobs up to ``max_running``;
- deletes expired jobs and files now and then.

Failures: ``overloaded`` puts the job back in the queue for a second (the scheduler's
admission control is the queue's back pressure); ``unavailable`` and a lost scheduler
are retried up to ``MAX_ATTEMPTS`` runs, with a growing pause; any other error fails
the job with its code. A job older than ``job_timeout_s`` fails with ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from trident.client import AsyncClient, GenerateResult, ProgressEvent
from trident.errors import (
    ConnectionError,
    OverloadedError,
    RequestError,
    RequestTimeoutError,
    TridentError,
    UnavailableError,
)
from trident.gateway.encode import encode_mp4, write_atomic
from trident.gateway.store import Job, JobStore

__all__ = ["MAX_ATTEMPTS", "JobRunner"]

TICK_S = 0.5
SWEEP_EVERY_S = 30.0
MAX_ATTEMPTS = 3

T = TypeVar("T")


async def db(fn: Callable[..., T], *args: Any) -> T:
    """A store call off the event loop (SQLite waits for locks and the disk)."""
    return await asyncio.to_thread(fn, *args)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        client: AsyncClient,
        *,
        log: Any,
        max_running: int = 64,
        lease_s: float = 15.0,
        job_timeout_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.client = client
        self.log = log
        self.max_running = max_running
        self.lease_s = lease_s
        self.job_timeout_s = job_timeout_s
        self.owner = f"gw-{uuid.uuid4().hex[:12]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self.progress: dict[str, int] = {}  # job id -> progress not yet written
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._last_renew = 0.0
        self._last_sweep = 0.0
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="jobs")

    async def stop(self) -> None:
        """Stop every running job (their requests are cancelled in the scheduler) and
        hand them back to the queue, claimable at once by the next gateway."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        tasks = list(self.running.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        released = await db(self.store.release, self.owner)
        if released:
            self.log.info("jobs.released", jobs=released, owner=self.owner)

    async def _loop(self) -> None:
        while True:
            try:
                await self._turn()
            except Exception as exc:  # the store is busy or the disk full: next turn
                self.log.error("jobs.turn_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()

    async def _turn(self) -> None:
        now = time.time()
        ids = list(self.running)
        updates, self.progress = self.progress, {}
        await db(self.store.set_progress, self.owner, updates)
        if ids and now - self._last_renew >= self.lease_s / 3:
            await db(self.store.renew, self.owner, ids, self.lease_s, now)
            self._last_renew = now
        for job_id in await db(self.store.cancelled_of, self.owner, ids):
            task = self.running.get(job_id)
            if task is not None and not task.done():
                self.log.info("job.stopping", job_id=job_id, reason="cancelled")
                task.cancel()
        free = self.max_running - len(self.running)
        if free > 0 and not self._stopping:
            for job in await db(self.store.claim, self.owner, self.lease_s, free, now):
                self._start(job)
        if now - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = now
            swept = await db(self.store.sweep, now)
            if swept:
                self.log.info("jobs.expired", jobs=swept)

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self._run(job), name=f"job:{job.id}")
        self.running[job.id] = task
        task.add_done_callback(functools.partial(self._ended, job.id))
        self.log.info("job.started", job_id=job.id, model=job.model, attempt=job.attempts)

    def _ended(self, job_id: str, _task: Any = None) -> None:
        self.running.pop(job_id, None)
        self.progress.pop(job_id, None)
        self.wake()

    async def _run(self, job: Job) -> None:
        left = job.created_at + self.job_timeout_s - time.time()
        if left <= 0:
            await self._fail(job, RequestTimeoutError(f"no result within {self.job_timeout_s}s"))
            return

        def on_progress(event: ProgressEvent) -> None:
            self.progress[job.id] = max(0, min(99, int(100 * event.step / max(1, event.total))))

        fps = int(job.info.get("fps") or 16)
        try:
            # The decode worker encodes the MP4: no float32 frames cross the network.
            result = await self.client.generate(
                **job.request, timeout=left, on_progress=on_progress, output_type="mp4", fps=fps
            )
        except asyncio.CancelledError:
            return  # DELETE (the row says cancelled) or shutdown (released back)
        except OverloadedError:
            await db(self.store.requeue, self.owner, job.id, time.time() + 1.0)
            return
        except (ConnectionError, UnavailableError) as exc:
            if job.attempts < MAX_ATTEMPTS:
                self.log.warning("job.retry", job_id=job.id, error=repr(exc))
                await db(self.store.requeue, self.owner, job.id, time.time() + 2.0 * job.attempts)
            else:
                await self._fail(job, exc)
            return
        except Exception as exc:
            await self._fail(job, exc)
            return
        try:
            await self._complete(job, result)
        except Exception as exc:  # encoding or the disk
            self.log.error("job.output_failed", job_id=job.id, error=repr(exc))
            await self._fail(job, TridentError(f"could not write the video: {exc}"))

    async def _complete(self, job: Job, result: GenerateResult) -> None:
        name = f"{job.id}.mp4"
        path = self.store.outputs / name
        if result.format == "mp4":
            await asyncio.to_thread(write_atomic, result.data, path)
        else:
            fps = float(job.info.get("fps") or 16)
            await asyncio.to_thread(encode_mp4, result.array, path, fps)
        info = dict(job.info)
        info.update(
            timings=result.timings,
            devices=result.devices,
            met_slo=result.met_slo,
            frames=int(result.shape[0]) if result.is_video else 1,
        )
        if await db(self.store.complete, self.owner, job.id, name, info, time.time()):
            self.log.info("job.completed", job_id=job.id, seconds=result.latency_s)
        else:  # cancelled or deleted meanwhile
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _fail(self, job: Job, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, RequestError) else "internal"
        if isinstance(exc, ConnectionError):
            code = "unavailable"
        message = str(getattr(exc, "message", None) or exc) or type(exc).__name__
        if await db(self.store.fail, self.owner, job.id, code, message, time.time()):
            self.log.info("job.failed", job_id=job.id, error=code, message=message[:500])
