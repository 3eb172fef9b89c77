"""``trident-node``: one per machine. Registers its devices, spawns one worker process
per device, restarts a worker that dies (with exponential backoff), and heartbeats.

The node reports a worker's death to the scheduler the moment the process exits (the
fast channel); the scheduler's heartbeat TTL is the slow one. Shutdown is cooperative
(SIGTERM to workers) with escalation (SIGKILL after a grace period); workers also exit
on their own if the node disappears (they watch their parent pid).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from trident.cliformat import DefaultsHelpFormatter
from trident.errors import ConfigError, ProtocolError
from trident.log import configure_logging, get_logger
from trident.runtime import protocol
from trident.runtime.devices import DeviceSpec, parse_devices
from trident.runtime.protocol import SCHEDULER_TO_NODE
from trident.runtime.shm import segment_prefix, sweep_dead, unlink_segments
from trident.runtime.supervise import supervised
from trident.runtime.transport import make_socket

__all__ = ["NodeArgs", "NodeDaemon", "main"]

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0  # a worker up this long has its backoff reset
WAITING_WARN_S = 15.0  # how often a node still waiting for its scheduler says so
GRACE_S = 5.0


@dataclass
class NodeArgs:
    scheduler: str
    devices: str
    node_id: str
    host: str = "127.0.0.1"
    time_scale: float = 1.0
    sim_memory_gb: float = 80.0
    memory_gb: float | None = None
    speed: float = 1.0
    threads: int | None = None
    log_file: str | None = None
    curve_dir: str | None = None
    heartbeat_s: float = 1.0
    # 0: wait for the scheduler as long as it takes (a node started before its
    # scheduler, or across a scheduler's slow start, joins when it answers).
    handshake_timeout_s: float = 0.0


@dataclass
class _Slot:
    spec: DeviceSpec
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START_S
    restart_at: float | None = None
    killing: bool = False  # a kill is under way (SIGTERM sent)


class NodeDaemon:
    def __init__(self, args: NodeArgs) -> None:
        self.args = args
        self.specs = parse_devices(
            args.devices,
            sim_memory_gb=args.sim_memory_gb,
            speed=args.speed,
            memory_gb=args.memory_gb,
        )
        self.slots = [_Slot(spec=s) for s in self.specs]
        self.log = get_logger("node", node_id=args.node_id)
        self.ctx = zmq.asyncio.Context()
        self.sock: Any = None
        self.stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.exit_code = 0

    @property
    def kind(self) -> str:
        return self.specs[0].kind

    def device_id(self, slot: _Slot) -> str:
        return f"{self.args.node_id}/{slot.spec.kind}:{slot.spec.index}"

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        keys = None
        if self.args.curve_dir:
            from trident.runtime.security import daemon_keys

            keys = daemon_keys(self.args.curve_dir)
        self._keys = keys
        self.sock = self._scheduler_socket()
        try:
            if not await self._handshake():
                return 3
            # Shared-memory segments a crashed node's dead workers left behind.
            stale = sweep_dead(self.args.node_id)
            if stale:
                self.log.warning("shm.swept", segments=len(stale))
            for slot in self.slots:
                self._spawn(slot)
            loops = [
                asyncio.create_task(self._supervised("recv", self._recv_loop)),
                asyncio.create_task(self._supervised("supervise", self._supervise_loop)),
                asyncio.create_task(self._supervised("heartbeat", self._heartbeat_loop)),
            ]
            await self.stopping.wait()
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send_multipart(
                    [protocol.encode(protocol.NodeBye(node_id=self.args.node_id))]
                )
            return self.exit_code
        finally:
            await self._stop_workers()
            self.sock.close(0)
            self.ctx.term()

    def _hello(self) -> bytes:
        return protocol.encode(
            protocol.NodeHello(
                version=protocol.PROTOCOL_VERSION,
                node_id=self.args.node_id,
                host=socket.gethostname(),
                devices=[
                    protocol.NodeDevice(
                        index=s.index,
                        kind=s.kind,  # type: ignore[arg-type]
                        memory_bytes=s.memory_bytes,
                        speed=s.speed,
                    )
                    for s in self.specs
                ],
            )
        )

    def _supervised(
        self, name: str, loop_fn: Callable[[], Coroutine[Any, Any, None]]
    ) -> Coroutine[Any, Any, None]:
        # A loop that dies takes the process down (exit 1): its supervisor restarts it.
        return supervised(
            name, loop_fn, log=self.log, stopping=self.stopping, on_crash=self._crashed
        )

    def _crashed(self, exc: BaseException) -> None:
        self.exit_code = 1
        self.stopping.set()

    def _scheduler_socket(self) -> zmq.asyncio.Socket:
        sock = make_socket(
            self.ctx, zmq.DEALER, identity=f"node:{self.args.node_id}".encode(), curve=self._keys
        )
        sock.connect(self.args.scheduler)
        return sock

    async def _handshake(self) -> bool:
        hello = self._hello()
        start = time.monotonic()
        limit = self.args.handshake_timeout_s
        deadline = start + limit if limit > 0 else float("inf")
        warn_at = start + WAITING_WARN_S
        while time.monotonic() < deadline and not self.stopping.is_set():
            await self.sock.send_multipart([hello])
            if not await self.sock.poll(1000):
                if time.monotonic() >= warn_at:
                    warn_at += WAITING_WARN_S
                    waited = round(time.monotonic() - start)
                    self.log.warning(
                        "node.waiting_for_scheduler", scheduler=self.args.scheduler, waited_s=waited
                    )
                    # A fresh connection: whatever became of the old one (a scheduler
                    # that answers its clients but never heard this node's hellos for a
                    # minute was seen in CI, about once per suite run), the next hello
                    # goes over a new one. Unsent hellos go with the old socket.
                    self.sock.close(linger=0)
                    self.sock = self._scheduler_socket()
                continue
            try:
                msg, _ = protocol.decode(await self.sock.recv_multipart(), SCHEDULER_TO_NODE)
            except ProtocolError as exc:
                self.log.warning("protocol.rejected", channel="scheduler", error=exc.message)
                continue
            if isinstance(msg, protocol.Reject):
                self.log.error("node.rejected", reason=msg.reason)
                print(f"trident-node: rejected by scheduler: {msg.reason}", file=sys.stderr)
                return False
            if isinstance(msg, protocol.NodeWelcome):
                self.args.heartbeat_s = float(msg.heartbeat_s)
                self.log.info("node.joined", scheduler=self.args.scheduler, devices=len(self.specs))
                return True
        print(f"trident-node: no answer from scheduler at {self.args.scheduler}", file=sys.stderr)
        self.log.error("node.no_scheduler", scheduler=self.args.scheduler)
        return False

    # ------------------------------------------------------------------ workers

    def _spawn(self, slot: _Slot) -> None:
        a = self.args
        cmd = [
            sys.executable,
            "-m",
            "trident.runtime.worker",
            "--scheduler",
            a.scheduler,
            "--node-id",
            a.node_id,
            "--kind",
            slot.spec.kind,
            "--index",
            str(slot.spec.index),
            "--ordinal",
            str(slot.spec.ordinal),
            "--memory-bytes",
            str(slot.spec.memory_bytes),
            "--speed",
            str(slot.spec.speed),
            "--host",
            a.host,
            "--time-scale",
            str(a.time_scale),
            "--parent-pid",
            str(os.getpid()),
        ]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        if a.log_file:
            cmd += ["--log-file", a.log_file]
        if a.curve_dir:
            cmd += ["--curve-dir", a.curve_dir]
        env = dict(os.environ)
        if slot.spec.kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(slot.spec.ordinal)
            cmd[cmd.index("--ordinal") + 1] = "0"
        slot.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        slot.started = time.monotonic()
        slot.restart_at = None
        slot.killing = False
        self.log.info(
            "worker.spawned",
            device_id=self.device_id(slot),
            pid=slot.proc.pid,
            restarts=slot.restarts,
        )

    async def _supervise_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for slot in self.slots:
                proc = slot.proc
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    slot.proc = None
                    self._unlink_segments(slot, proc.pid)
                    if now - slot.started > STABLE_AFTER_S:
                        slot.backoff = BACKOFF_START_S
                    slot.restart_at = now + slot.backoff
                    self.log.warning(
                        "worker.died",
                        device_id=self.device_id(slot),
                        exitcode=code,
                        restart_in_s=slot.backoff,
                        restarts=slot.restarts,
                    )
                    slot.backoff = min(BACKOFF_MAX_S, slot.backoff * 2)
                    with contextlib.suppress(zmq.ZMQError):
                        await self.sock.send_multipart(
                            [
                                protocol.encode(
                                    protocol.WorkerExited(
                                        node_id=self.args.node_id,
                                        index=slot.spec.index,
                                        device_id=self.device_id(slot),
                                        exitcode=code,
                                        restarts=slot.restarts,
                                    )
                                )
                            ]
                        )
                    if code in (3,):  # rejected by the scheduler: restarting will not help
                        slot.restart_at = None
                        self.log.error(
                            "worker.not_restarted", device_id=self.device_id(slot), exitcode=code
                        )
                elif proc is None and slot.restart_at is not None and now >= slot.restart_at:
                    slot.restarts += 1
                    self.log.info(
                        "worker.restarted", device_id=self.device_id(slot), restarts=slot.restarts
                    )
                    self._spawn(slot)

    async def _stop_workers(self) -> None:
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                self.log.warning("worker.killed", pid=p.pid)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        for s in self.slots:
            if s.proc is not None:
                self._unlink_segments(s, s.proc.pid)
            s.proc = None

    def _unlink_segments(self, slot: _Slot, pid: int) -> None:
        """A worker that is gone frees nothing itself: unlink its shared-memory
        segments (named by its pid, trident/runtime/shm.py)."""
        try:
            gone = unlink_segments(segment_prefix(self.args.node_id, slot.spec.index, pid))
        except OSError as exc:
            self.log.warning("shm.unlink_failed", device_id=self.device_id(slot), error=repr(exc))
            return
        if gone:
            self.log.info(
                "shm.unlinked", device_id=self.device_id(slot), pid=pid, segments=len(gone)
            )

    # ------------------------------------------------------------------ scheduler

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat_s)
            workers = {
                str(s.spec.index): protocol.WorkerStatus(
                    pid=s.proc.pid if s.proc else None,
                    alive=s.proc is not None,
                    restarts=s.restarts,
                )
                for s in self.slots
            }
            await self.sock.send_multipart(
                [
                    protocol.encode(
                        protocol.NodeHeartbeat(node_id=self.args.node_id, workers=workers)
                    )
                ]
            )

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                msg, _ = protocol.decode(frames, SCHEDULER_TO_NODE)
            except ProtocolError as exc:
                self.log.warning("protocol.rejected", channel="scheduler", error=exc.message)
                continue
            if isinstance(msg, protocol.Shutdown):
                self.log.info("node.shutdown", reason="scheduler asked")
                self.stopping.set()
                return
            if isinstance(msg, protocol.Reregister):
                # The scheduler restarted or forgot us: say hello again.
                await self.sock.send_multipart([self._hello()])
            elif isinstance(msg, protocol.KillWorker):
                slot = next((s for s in self.slots if s.spec.index == msg.index), None)
                if slot is not None:
                    self._kill(slot, msg.reason)

    def _kill(self, slot: _Slot, reason: str) -> None:
        """A worker the scheduler declared lost (hung, stopped): SIGTERM, then SIGKILL
        after the grace; the supervise loop restarts it once it is gone."""
        proc = slot.proc
        if proc is None or proc.poll() is not None or slot.killing:
            return
        slot.killing = True
        self.log.warning(
            "worker.killing", device_id=self.device_id(slot), pid=proc.pid, reason=reason
        )
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            # A stopped process handles no SIGTERM until continued.
            proc.send_signal(signal.SIGCONT)

        async def escalate() -> None:
            await asyncio.sleep(GRACE_S)
            if proc.poll() is None:
                self.log.warning("worker.killed", device_id=self.device_id(slot), pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

        task = asyncio.get_running_loop().create_task(escalate())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def build_parser() -> argparse.ArgumentParser:
    """The node's command line (``trident node --help``)."""
    p = argparse.ArgumentParser(
        prog="trident-node",
        description="Trident node daemon: one per machine.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--scheduler", default="tcp://127.0.0.1:5556", help="the scheduler's node address"
    )
    p.add_argument(
        "--devices",
        required=True,
        help="the devices to serve: cpu:N, sim:N or cuda:0,1,... (required)",
    )
    p.add_argument("--node-id", default=None, help="unique node name (default: HOSTNAME-PID)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address workers bind their data-plane sockets on"
    )
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="sim devices: multiply simulated stage times"
    )
    p.add_argument(
        "--sim-memory-gb", type=float, default=80.0, help="sim devices: memory per simulated GPU"
    )
    p.add_argument(
        "--device-memory-gb",
        type=float,
        default=None,
        help="memory each device reports to the planner (default: the device's own)",
    )
    p.add_argument(
        "--speed", type=float, default=1.0, help="relative device speed reported to the planner"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cpu devices: torch threads per worker (default: torch's own, one per core)",
    )
    p.add_argument(
        "--log-file", default=None, help="append the JSON-lines log to this file (default: stderr)"
    )
    p.add_argument(
        "--curve-dir",
        default=None,
        help="CurveZMQ key directory, the scheduler's (default: none, plain TCP)",
    )
    p.add_argument(
        "--handshake-timeout-s",
        type=float,
        default=0.0,
        help="give up (exit 3) when the scheduler has not answered this long; 0 waits "
        "for it as long as it takes, warning every 15 s",
    )
    return p


def _parse(argv: list[str] | None) -> NodeArgs:
    ns = build_parser().parse_args(argv)
    node_id = ns.node_id or f"{socket.gethostname()}-{os.getpid()}"
    if "/" in node_id or ":" in node_id:
        raise ConfigError("--node-id must not contain '/' or ':'")
    return NodeArgs(
        scheduler=ns.scheduler,
        devices=ns.devices,
        node_id=node_id,
        host=ns.host,
        time_scale=ns.time_scale,
        sim_memory_gb=ns.sim_memory_gb,
        memory_gb=ns.device_memory_gb,
        speed=ns.speed,
        threads=ns.threads,
        log_file=ns.log_file,
        curve_dir=ns.curve_dir,
        handshake_timeout_s=ns.handshake_timeout_s,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
        configure_logging(args.log_file)
        daemon = NodeDaemon(args)
    except ConfigError as exc:
        print(f"trident-node: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def _main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stopping.set)
        return await daemon.run()

    return asyncio.run(_main())


if __name__ == "__main__":
    sys.exit(main())
