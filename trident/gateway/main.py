"""``trident-gateway``: the HTTP gateway process (uvicorn serving :mod:`trident.gateway.app`).

::

    trident-gateway --scheduler tcp://SCHEDULER:5555 --http-addr 0.0.0.0:8000 \\
                    --state-dir /var/lib/trident-gateway [--curve-dir KEYS/clients/NAME]

SIGTERM / SIGINT: uvicorn stops taking connections and finishes the open ones (5 s at
most); running video jobs are cancelled in the scheduler and handed back to the queue
in the job store, where the next gateway on that state directory takes them up.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from trident.cliformat import DefaultsHelpFormatter
from trident.gateway.app import GatewaySettings, create_app
from trident.log import configure_logging

__all__ = ["build_parser", "default_state_dir", "main", "parse_args", "split_addr"]


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "trident" / "gateway")


def split_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http-addr {addr!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    """The gateway's command line (``trident gateway --help``)."""
    p = argparse.ArgumentParser(
        prog="trident-gateway",
        description="OpenAI-compatible HTTP API (images, videos) over a Trident scheduler.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--scheduler", default="tcp://127.0.0.1:5555", help="the scheduler's client address"
    )
    p.add_argument("--http-addr", default="127.0.0.1:8000", help="HOST:PORT to listen on")
    p.add_argument(
        "--state-dir",
        default=None,
        help=f"job store (SQLite) and outputs (default: {default_state_dir()})",
    )
    p.add_argument(
        "--curve-dir",
        help="a client's CurveZMQ key directory (`trident keys DIR --client NAME` makes "
        "DIR/clients/NAME; default: none, plain TCP)",
    )
    p.add_argument("--curve-name", help="the key's name (default: the directory's name)")
    p.add_argument(
        "--retention-s",
        type=float,
        default=86_400.0,
        help="seconds to keep finished jobs and their outputs (default: 86400, 1 day)",
    )
    p.add_argument(
        "--request-timeout-s",
        type=float,
        default=600.0,
        help="an image request's time limit, seconds",
    )
    p.add_argument(
        "--job-timeout-s",
        type=float,
        default=3600.0,
        help="a video job's time limit in seconds, from its creation",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted, bytes"
    )
    p.add_argument(
        "--max-running-jobs", type=int, default=64, help="video jobs this gateway runs at once"
    )
    p.add_argument(
        "--max-queued-jobs", type=int, default=1000, help="past this many active jobs: 429"
    )
    p.add_argument(
        "--lease-s",
        type=float,
        default=15.0,
        help="a running job's lease, seconds: another gateway takes it up this long after its "
        "gateway died",
    )
    p.add_argument(
        "--public-url", help="base of the links in url responses (default: the request's)"
    )
    p.add_argument(
        "--connect-timeout-s",
        type=float,
        default=5.0,
        help="seconds a request waits for an unreachable scheduler before a 503",
    )
    p.add_argument("--log-file", help="append the JSON-lines log to this file (default: stderr)")
    return p


def parse_args(argv: list[str] | None) -> tuple[GatewaySettings, argparse.Namespace]:
    p = build_parser()
    ns = p.parse_args(argv)
    curve_dir = ns.curve_dir
    settings = GatewaySettings(
        scheduler=ns.scheduler,
        state_dir=ns.state_dir or default_state_dir(),
        curve_dir=curve_dir,
        curve_name=ns.curve_name or (Path(curve_dir).name if curve_dir else None),
        retention_s=ns.retention_s,
        request_timeout_s=ns.request_timeout_s,
        job_timeout_s=ns.job_timeout_s,
        max_body_bytes=ns.max_body_bytes,
        max_running_jobs=ns.max_running_jobs,
        max_queued_jobs=ns.max_queued_jobs,
        lease_s=ns.lease_s,
        public_url=ns.public_url,
        connect_timeout_s=ns.connect_timeout_s,
    )
    for name in (
        "retention_s",
        "request_timeout_s",
        "job_timeout_s",
        "lease_s",
        "connect_timeout_s",
    ):
        if not getattr(settings, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("max_body_bytes", "max_running_jobs", "max_queued_jobs"):
        if getattr(settings, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        split_addr(ns.http_addr)
    except ValueError as exc:
        p.error(str(exc))
    return settings, ns


def main(argv: list[str] | None = None) -> int:
    settings, ns = parse_args(argv)
    configure_logging(ns.log_file)
    import uvicorn

    host, port = split_addr(ns.http_addr)
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover
        loop = "asyncio"
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        loop=loop,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)

    def stop(signum: int, frame: Any) -> None:
        # Ours around uvicorn's: a signal before uvicorn listens still stops it, and
        # the one uvicorn re-raises after its graceful shutdown ends here (exit 0).
        server.handle_exit(signum, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits on a port it cannot bind
        return int(exc.code or 1)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
