"""Structured logging: structlog JSON lines with stable event names and bound ids.

Event names are part of the interface (``trident report`` and users' dashboards read
them): ``request.arrived``, ``request.finished``, ``request.failed``,
``stage.dispatched``, ``stage.started``, ``stage.finished``, ``stage.failed``,
``stage.loaded``, ``stage.unloaded``, ``placement.changed``, ``node.joined``,
``node.lost``, ``worker.joined``, ``worker.died``, ``worker.restarted``,
``protocol.error``, ``dispatch.solved``. Every line has ``ts`` (unix seconds),
``component`` and the ids it concerns (``request_id``, ``task_id``, ``device_id``...).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging", "flush_logs", "get_logger"]

_configured = False
_out: TextIO | None = None


class _Stderr:
    """Whatever ``sys.stderr`` is at each write (not the stream of the moment logging was
    configured: a test runner swaps and closes its captured streams)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    log_file: str | None = None,
    *,
    level: str = "info",
    stream: TextIO | None = None,
    buffered: bool = False,
) -> None:
    """JSON lines to ``log_file`` (appending) or ``stream`` (default stderr).

    ``buffered``: block-buffer the file (the daemons' hot path writes several lines per
    request); the owner must call :func:`flush_logs` periodically and at exit.
    """
    global _configured, _out
    out: TextIO
    if log_file:
        out = open(log_file, "a", buffering=(1 << 16) if buffered else 1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        _out = out
    else:
        out = stream or _Stderr()  # type: ignore[assignment]  # a TextIO for print()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt=None, key="ts"),  # unix seconds, float
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _configured = True


def flush_logs() -> None:
    if _out is not None:
        _out.flush()


def get_logger(component: str, **bound: Any) -> Any:
    if not _configured:
        configure_logging()
    return structlog.get_logger().bind(component=component, **bound)
