"""``trident serve``: one foreground command runs scheduler, node and gateway; it
answers over HTTP and the SDK, and Ctrl-C (SIGINT) or SIGTERM stops everything, leaving
no process (checked in /proc); a child that dies takes the command down (exit 1)."""

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

from tests.gateway.conftest import openai_client
from tests.integration.conftest import pid_alive
from trident import Client
from trident.bench.cluster import free_port

pytestmark = pytest.mark.timeout(120)


def _descendants(root: int) -> set[int]:
    """Every live process below ``root`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class Serve:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.http = f"127.0.0.1:{free_port()}"
        self.client_addr = f"tcp://127.0.0.1:{free_port()}"
        node_addr = f"tcp://127.0.0.1:{free_port()}"
        self.out = tmp / "serve.out"
        cmd = [sys.executable, "-m", "trident.cli", "serve", "--http-addr", self.http]
        cmd += ["--client-addr", self.client_addr, "--node-addr", node_addr]
        cmd += ["--state-dir", str(tmp / "state"), *args]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.seen: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://{self.http}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.out.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"not ready: {self.out.read_text()}")
        # the announcement comes within a poll or two of readiness
        deadline = time.monotonic() + 5
        while "ready." not in self.out.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.seen = _descendants(self.proc.pid)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def left_behind(self) -> set[int]:
        time.sleep(0.2)
        return {p for p in self.seen if pid_alive(p)}

    def kill_all(self) -> None:
        for p in self.seen | {self.proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def test_serve_answers_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    s = Serve(tmp_path, "--devices", "sim:2", "--time-scale", "0.01")
    try:
        s.wait_ready(60)
        # scheduler, node, its two workers, gateway
        assert len(s.seen) >= 5, s.seen
        assert "ready." in s.out.read_text() and f"{s.url}/v1" in s.out.read_text()
        r = openai_client_for(s).images.generate(model="flux", prompt="x", size="256x256")
        assert r.data[0].b64_json
        with Client(s.client_addr, timeout=30) as c:  # the SDK's address, printed too
            assert c.generate(model="flux", prompt="y", height=256, width=256).array.ndim == 3
        s.proc.send_signal(signal.SIGINT)
        assert s.wait(60) == 0, s.out.read_text()
        assert not s.left_behind(), s.out.read_text()
        assert "stopping" in s.out.read_text()
    finally:
        s.kill_all()


def test_serve_stops_everything_when_a_child_dies(tmp_path: Path) -> None:
    s = Serve(tmp_path, "--devices", "sim:1", "--time-scale", "0.01")
    try:
        s.wait_ready(60)
        scheduler = [p for p in s.seen if "trident.runtime.scheduler" in _cmdline(p)]
        assert len(scheduler) == 1
        os.kill(scheduler[0], signal.SIGKILL)
        assert s.wait(60) == 1
        assert "scheduler exited" in s.out.read_text()
        assert not s.left_behind(), s.out.read_text()
    finally:
        s.kill_all()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_with_no_model_makes_tiny_ones_and_serves_them_on_cpu(tmp_path: Path) -> None:
    """The README's main command: ``trident serve`` alone (here on a free port)."""
    s = Serve(tmp_path, "--devices", "cpu:1")
    try:
        s.wait_ready(240)
        client = openai_client_for(s)
        assert {m.id for m in client.models.list()} == {"tiny-flux", "tiny-wan"}
        r = client.images.generate(
            model="tiny-flux", prompt="a fox", size="32x32", extra_body={"num_inference_steps": 2}
        )
        assert r.data[0].b64_json
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait(60) == 0, s.out.read_text()
        assert not s.left_behind(), s.out.read_text()
    finally:
        s.kill_all()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def openai_client_for(s: Serve) -> Any:
    class _Url:  # what openai_client needs of a gateway
        url = s.url

    return openai_client(_Url())  # type: ignore[arg-type]
