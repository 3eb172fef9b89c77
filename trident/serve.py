"""``trident serve``: scheduler, one node and the HTTP gateway on this machine, as one
foreground command (like ``vllm serve``).

::

    trident serve --model flux=/models/FLUX.1-dev --devices cuda:all
    trident serve                       # tiny random-weight flux + wan it makes itself, on CPU
    trident serve --devices sim:4       # simulated GPUs (flux, wan), no weights at all

It starts the three daemons as child processes, each in a session of its own (a
terminal's Ctrl-C reaches this command only), waits until the gateway is ready and
says where everything is, and supervises them: when one exits on its own the others
are stopped and the command exits 1. SIGINT / SIGTERM / SIGHUP stop them in order —
the gateway (it hands its running jobs back to its store), the node (it stops its
workers), the scheduler — each with SIGTERM and a grace period, then SIGKILL to each
child's whole process group, so no process is left behind. A second Ctrl-C skips the
grace periods.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from trident.cliformat import DefaultsHelpFormatter

__all__ = ["build_parser", "main"]

GRACE_S = {"gateway": 10.0, "node": 12.0, "scheduler": 8.0}
TINY_FAMILIES = ("flux", "wan")


def _default_devices() -> str:
    return "cuda:all" if shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists() else "cpu:1"


def build_parser() -> argparse.ArgumentParser:
    """``trident serve``'s command line."""
    p = argparse.ArgumentParser(
        prog="trident serve",
        description="Run a scheduler, one node and the HTTP gateway on this machine.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the diffusers pipeline in DIR as NAME (repeatable; NAME=sim:FAMILY for "
        "sim devices). Default: tiny random-weight flux and wan made under --state-dir "
        "(sim devices: simulated flux and wan)",
    )
    p.add_argument(
        "--devices",
        default=None,
        help="cuda:all | cuda:0,1,... | cpu:N | sim:N (default: cuda:all when a GPU is "
        "visible, else cpu:1)",
    )
    p.add_argument("--http-addr", default="127.0.0.1:8000", help="the gateway's HOST:PORT")
    p.add_argument("--client-addr", default="tcp://127.0.0.1:5555", help="the SDK's address")
    p.add_argument(
        "--node-addr", default="tcp://127.0.0.1:5556", help="the address the node connects to"
    )
    p.add_argument(
        "--state-dir",
        default="trident-serve",
        help="job store, tiny models and logs (default ./trident-serve)",
    )
    p.add_argument(
        "--policy",
        default="trident",
        help="scheduling policy: trident, trident-static, b1, b4, b6, authors, fifo",
    )
    p.add_argument("--time-scale", type=float, default=1.0, help="sim devices: time scale")
    p.add_argument(
        "--startup-timeout-s",
        type=float,
        default=180.0,
        help="seconds to wait for the cluster to be up before giving up",
    )
    p.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed on to trident-gateway (repeatable), e.g. --gateway-arg=--retention-s=600 "
        "(default: none)",
    )
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class _Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_requested = 0  # signals received
        self.pgids: dict[str, int] = {}

    def output(self, name: str) -> Path:
        return self.log_dir / f"{name}.out"

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.output(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def spawn(self, name: str, module: str, args: list[str]) -> subprocess.Popen[bytes]:
        # Its output (progress bars, warnings) goes to LOG_DIR/NAME.out, shown when it
        # dies; the structured log is LOG_DIR/trident.log.
        with open(self.output(name), "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we forward signals
            )
        self.procs[name] = proc
        self.pgids[name] = proc.pid
        return proc

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested += 1

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early for a signal."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def shutdown(self) -> None:
        """Gateway, node, scheduler: SIGTERM and a grace period each (none after a
        second signal), then SIGKILL to every child's process group."""
        for name in ("gateway", "node", "scheduler"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S[name]
            while proc.poll() is None and time.monotonic() < deadline:
                if self.stop_requested > 1:
                    break
                time.sleep(0.05)
        for name, pgid in self.pgids.items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)  # stragglers: a worker, a hung daemon
            proc = self.procs[name]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)


def _tiny_models(state_dir: Path, sup: _Supervisor) -> list[str]:
    models = []
    for family in TINY_FAMILIES:
        out = state_dir / "models" / f"tiny-{family}"
        if not (out / "model_index.json").exists():
            print(f"trident serve: making a tiny random-weight {family} pipeline in {out}")
            with open(sup.output("tiny-model"), "ab") as log:
                proc = subprocess.run(
                    [sys.executable, "-m", "trident.cli", "tiny-model", family, str(out)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
            if proc.returncode != 0:
                print(sup.tail("tiny-model"), file=sys.stderr)
                raise SystemExit(f"trident serve: could not make tiny-{family} ({proc.returncode})")
        models.append(f"tiny-{family}={out}")
    return models


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    from trident.gateway.main import split_addr

    try:
        host, port = split_addr(ns.http_addr)
    except ValueError as exc:
        print(f"trident serve: {exc}", file=sys.stderr)
        return 2
    devices = ns.devices or _default_devices()
    state_dir = Path(ns.state_dir).resolve()
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sup = _Supervisor(log_dir)
    sup.install()
    models = list(ns.model)
    if not models:
        models = (
            ["flux", "wan=sim:wan"] if devices.startswith("sim") else _tiny_models(state_dir, sup)
        )
    log = ["--log-file", str(log_dir / "trident.log")]
    sched_args = ["--client-addr", ns.client_addr, "--node-addr", ns.node_addr]
    sched_args += ["--policy", ns.policy, "--time-scale", str(ns.time_scale)]
    for m in models:
        sched_args += ["--model", m]
    node_args = ["--scheduler", ns.node_addr, "--devices", devices, "--node-id", "local"]
    node_args += ["--time-scale", str(ns.time_scale)]
    gateway_args = ["--scheduler", ns.client_addr, "--http-addr", ns.http_addr]
    gateway_args += ["--state-dir", str(state_dir / "gateway"), *ns.gateway_arg]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    code = 0
    try:
        sup.spawn("scheduler", "trident.runtime.scheduler", sched_args + log)
        sup.spawn("node", "trident.runtime.node", node_args + log)
        sup.spawn("gateway", "trident.gateway.main", gateway_args + log)
        print(
            f"trident serve: {', '.join(m.split('=')[0] for m in models)} on {devices}; "
            f"logs in {log_dir} (trident.log, and each daemon's output in NAME.out)",
            flush=True,
        )
        deadline = time.monotonic() + ns.startup_timeout_s
        announced = False
        while not sup.stop_requested:
            gone = sup.exited()
            if gone is not None:
                print(
                    f"trident serve: {gone[0]} exited with {gone[1]}; stopping. Its last "
                    f"output ({sup.output(gone[0])}):\n{sup.tail(gone[0])}",
                    file=sys.stderr,
                )
                code = 1
                break
            if not announced and _ready(f"{url}/ready"):
                announced = True
                print(
                    f"trident serve: ready. OpenAI API at {url}/v1 (e.g. POST {url}/v1/images/"
                    f"generations); SDK at {ns.client_addr}. Ctrl-C to stop.",
                    flush=True,
                )
            elif not announced and time.monotonic() > deadline:
                announced = True
                print(
                    f"trident serve: not ready after {ns.startup_timeout_s:.0f}s (see {log_dir})",
                    file=sys.stderr,
                )
            sup.sleep(0.5 if not announced else 0.2)
    finally:
        print("trident serve: stopping", flush=True)
        sup.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
