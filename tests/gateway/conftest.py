"""The HTTP gateway as a real process in front of a real local cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from trident.bench.cluster import free_port


class GatewayProc:
    """``trident-gateway`` as a child process (its own session), on a free port."""

    def __init__(
        self,
        scheduler: str,
        state_dir: str | os.PathLike[str],
        *args: str,
        port: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.state_dir = str(state_dir)
        self.args = list(args)
        self.port = port or free_port()
        self.log_dir = Path(log_dir or state_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "gateway.log"

    def start(self, timeout: float = 30.0) -> GatewayProc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "trident.gateway.main",
            "--scheduler",
            self.scheduler,
            "--http-addr",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            self.state_dir,
            "--log-file",
            str(self.log_file),
            *self.args,
        ]
        with open(self.log_dir / "gateway.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError("gateway did not answer /health")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
        code = p.wait()
        self.proc = None
        return code

    def __enter__(self) -> GatewayProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def openai_client(gw: GatewayProc, **kw: Any) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def wait_job(gw: GatewayProc, video_id: str, until: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``GET /v1/videos/{id}`` until ``until(job)`` holds; the last job seen."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{gw.url}/v1/videos/{video_id}", timeout=5.0)
        job = r.json()
        if until(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never got there: {job}")


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Any:
    """Start gateways for a test; all are stopped at its end."""
    started: list[GatewayProc] = []

    def make(scheduler: str, *args: str, state_dir: Path | None = None, **kw: Any) -> GatewayProc:
        gw = GatewayProc(scheduler, state_dir or tmp_path / "state", *args, **kw).start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
