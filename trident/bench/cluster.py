"""Start a real local cluster — a scheduler and nodes as separate processes on
loopback — for the demo, tests and live benchmarks, and take it down cleanly.

Each daemon runs in its own session (process group) so teardown reaches the workers
too: SIGTERM first (cooperative), SIGKILL to the group after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trident.client import Client
from trident.errors import TridentError

__all__ = ["LocalCluster", "NodeSpec", "free_port"]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range. A port from that range
    (what binding port 0 gives) invites a TCP self-connect: a node started before its
    scheduler binds retries its connect, and once in a while the kernel picks the
    target port itself as the source port, joining the node's socket to itself; the
    scheduler then never hears that node (a cluster-start flake seen about once per
    suite run: "nodes [] after 60 s")."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # nothing free below the range: any port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeSpec:
    devices: str  # cpu:N | sim:N | cuda:0,1,... (a list of ordinals; not "all")
    node_id: str | None = None
    time_scale: float = 1.0
    sim_memory_gb: float = 80.0
    threads: int | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Devices this node brings up: N for cpu:N / sim:N, one per listed cuda ordinal
        (``cuda:0`` is one device, not zero)."""
        kind, _, rest = self.devices.partition(":")
        if kind == "cuda":
            return len([x for x in rest.split(",") if x])
        return int(rest)


class LocalCluster:
    def __init__(
        self,
        models: list[str],
        nodes: list[NodeSpec],
        *,
        policy: str = "trident",
        log_dir: str | os.PathLike[str] | None = None,
        scheduler_args: list[str] | None = None,
        startup_timeout: float = 60.0,
        curve_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.curve_dir = str(curve_dir) if curve_dir else None
        self.models = models
        self.nodes = nodes
        self.policy = policy
        self.log_dir = Path(log_dir) if log_dir else None
        self.scheduler_args = scheduler_args or []
        self.startup_timeout = startup_timeout
        port_a, port_b = free_port(), free_port()
        self.client_addr = f"tcp://127.0.0.1:{port_a}"
        self.node_addr = f"tcp://127.0.0.1:{port_b}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.node_procs: list[subprocess.Popen[bytes]] = []

    @property
    def log_file(self) -> str | None:
        return str(self.log_dir / "trident.log") if self.log_dir else None

    def _popen(self, args: list[str]) -> subprocess.Popen[bytes]:
        stderr: Any = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log_dir / "stderr.log", "ab")  # noqa: SIM115 - closed at teardown by the OS
        p = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def start(self) -> LocalCluster:
        log = ["--log-file", self.log_file] if self.log_file else []
        sched = [
            "trident.runtime.scheduler",
            "--client-addr",
            self.client_addr,
            "--node-addr",
            self.node_addr,
            "--policy",
            self.policy,
        ]
        scales = {n.time_scale for n in self.nodes if n.devices.startswith("sim")}
        if len(scales) == 1:
            sched += ["--time-scale", str(scales.pop())]
        for m in self.models:
            sched += ["--model", m]
        if self.curve_dir:
            sched += ["--curve-dir", self.curve_dir]
        self._scheduler_cmd = sched + log + self.scheduler_args
        self.scheduler = self._popen(self._scheduler_cmd)
        for i, n in enumerate(self.nodes):
            self.start_node(n, i, log)
        try:
            self.wait_ready(sum(n.count for n in self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def restart_scheduler(self) -> subprocess.Popen[bytes]:
        """Start the scheduler again on the same addresses (after it died or was
        killed); nodes and clients reconnect on their own."""
        if self.scheduler is not None and self.scheduler.poll() is None:
            raise TridentError("the scheduler is still running")
        self.scheduler = self._popen(self._scheduler_cmd)
        return self.scheduler

    def start_node(
        self, n: NodeSpec, i: int, log: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = log if log is not None else (["--log-file", self.log_file] if self.log_file else [])
        args = [
            "trident.runtime.node",
            "--scheduler",
            self.node_addr,
            "--devices",
            n.devices,
            "--node-id",
            n.node_id or f"n{i}",
            "--time-scale",
            str(n.time_scale),
            "--sim-memory-gb",
            str(n.sim_memory_gb),
        ]
        if n.threads:
            args += ["--threads", str(n.threads)]
        if self.curve_dir:
            args += ["--curve-dir", self.curve_dir]
        p = self._popen(args + n.extra + log)
        self.node_procs.append(p)
        return p

    def wait_ready(self, devices: int, timeout: float | None = None) -> dict[str, Any]:
        limit = timeout or self.startup_timeout
        deadline = time.monotonic() + limit
        pong: dict[str, Any] | None = None
        with Client(self.client_addr, curve_dir=self.curve_dir) as c:
            while time.monotonic() < deadline:
                if self.scheduler is not None and self.scheduler.poll() is not None:
                    raise TridentError(
                        f"scheduler exited with {self.scheduler.returncode}{self._diagnosis()}"
                    )
                with contextlib.suppress(TridentError):
                    pong = c.ping(timeout=1.0)
                    if len(pong.get("devices", [])) >= devices:
                        return pong
                time.sleep(0.1)
        seen = (
            "the scheduler never answered"
            if pong is None
            else f"nodes {pong.get('nodes')}, devices {pong.get('devices')}"
        )
        raise TridentError(
            f"cluster not ready: fewer than {devices} devices after {limit:.0f} s ({seen})"
            f"{self._diagnosis()}"
        )

    def _diagnosis(self, lines: int = 40) -> str:
        """What a failed start leaves to read: daemon exit codes and the logs' last
        lines, so a startup failure in CI says why without its temp dir."""
        out = []
        for p in self.node_procs:
            if p.poll() is not None:
                out.append(f"node pid {p.pid} exited with {p.returncode}")
        if self.log_dir is not None:
            err = self.log_dir / "stderr.log"
            if err.exists():
                tail = err.read_text(errors="replace").splitlines()[-lines:]
                out += ["stderr.log:", *tail]
            log = self.log_dir / "trident.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out += ["trident.log:", *(ln[:400] for ln in tail)]
        return ("\n" + "\n".join(out)) if out else ""

    def stop(self, grace: float = 10.0) -> None:
        # Nodes first (they stop their workers), then the scheduler.
        for group in (self.node_procs, [self.scheduler] if self.scheduler else []):
            for p in group:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # anything left in its session
            if p.poll() is None:
                p.kill()
                p.wait()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
