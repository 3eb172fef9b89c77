"""Supervision of a daemon's long-lived loops (scheduler, node, worker alike).

A loop that raises is logged (``task.crashed`` with its traceback) and reported to
the daemon, which exits non-zero so that its own supervisor (the node for a worker,
systemd or Kubernetes for the daemons) restarts it: never a live process that quietly
stopped serving. A loop that returns while the daemon is not stopping counts as a
crash too.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from trident.log import flush_logs

__all__ = ["supervised"]


async def supervised(
    name: str,
    loop_fn: Callable[[], Coroutine[Any, Any, None]],
    *,
    log: Any,
    stopping: asyncio.Event,
    on_crash: Callable[[BaseException], None],
) -> None:
    try:
        await loop_fn()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        log.critical(
            "task.crashed", task=name, error=repr(exc), traceback=traceback.format_exc(limit=20)
        )
        flush_logs()
        on_crash(exc)
        return
    if not stopping.is_set():
        log.critical("task.crashed", task=name, error="loop returned")
        flush_logs()
        on_crash(RuntimeError(f"loop {name} returned"))
