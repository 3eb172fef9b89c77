"""``trident status [--watch]``: the live cluster in the terminal.

::

    trident status                                 one snapshot
    trident status --watch [--interval 1]          redrawn until Ctrl-C
    trident status --scheduler tcp://HOST:5555 [--curve-dir KEYS/clients/NAME]

It asks the scheduler for a :class:`~trident.runtime.protocol.ClusterStatus` (a
``status_query`` on the client channel, :meth:`trident.client.Client.status`) and
draws, with ``rich``: the nodes; each device with the model stages resident on it and
the tasks it runs; each model's queue, running requests and SLO attainment over the
scheduler's recent window.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trident.cliformat import DefaultsHelpFormatter
from trident.runtime.protocol import ClusterStatus, DeviceStatus, ModelStatus

__all__ = ["build_parser", "main", "render", "render_text"]

# Stage initials, as the planner writes placement types (<EDC>, <D>, ...).
_INITIAL = {"encode": "E", "diffuse": "D", "decode": "C"}


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _resident(dev: DeviceStatus) -> str:
    """``flux <EDC>, wan <D>``: each model's resident stages."""
    by_model: dict[str, str] = {}
    for r in dev.resident:
        by_model[r.model] = by_model.get(r.model, "") + _INITIAL.get(r.stage, "?")
    order = "EDC"
    return ", ".join(
        f"{m} <{''.join(sorted(st, key=order.index))}>" for m, st in sorted(by_model.items())
    )


def _running(dev: DeviceStatus) -> Text:
    """Each task sent to the device: ``flux:diffuse`` (dim while it waits in the
    worker's queue)."""
    out = Text()
    for i, t in enumerate(dev.running):
        if i:
            out.append(", ")
        label = f"{t.model}:{'+'.join(t.stages)}"
        out.append(label, style="bold" if t.started else "dim")
    return out


def _slo(m: ModelStatus) -> Text:
    if not m.recent_finished:
        return Text("-", style="dim")
    share = m.recent_on_time / m.recent_finished
    style = "green" if share >= 0.9 else "yellow" if share >= 0.5 else "red"
    return Text(f"{share:.0%} ({m.recent_on_time}/{m.recent_finished})", style=style)


def render(status: ClusterStatus) -> RenderableType:
    """The status as rich tables: header, nodes, devices, models."""
    live_devices = sum(1 for d in status.devices if d.up)
    header = Text.assemble(
        ("Trident cluster", "bold"),
        f"  policy {status.policy or '?'}  up {_duration(status.uptime_s)}  ",
        ("ready" if status.ready else "not ready", "green" if status.ready else "red"),
        f"  {sum(1 for n in status.nodes if n.up)}/{len(status.nodes)} nodes, "
        f"{live_devices}/{len(status.devices)} devices",
    )
    nodes = Table(title="Nodes", title_justify="left", expand=False)
    for col in ("node", "state", "devices"):
        nodes.add_column(col)
    for n in status.nodes:
        nodes.add_row(
            n.node_id,
            Text("up", style="green") if n.up else Text("lost", style="red"),
            str(len(n.devices)),
        )
    devices = Table(title="Devices", title_justify="left", expand=False)
    for col in ("device", "kind", "state", "memory", "resident", "weights", "runs", "busy"):
        devices.add_column(col, no_wrap=col in ("device", "memory", "weights", "busy"))
    for d in status.devices:
        devices.add_row(
            d.device_id,
            d.kind,
            Text("up", style="green") if d.up else Text("lost", style="red"),
            _gib(d.memory_bytes),
            _resident(d) or Text("-", style="dim"),
            _gib(d.resident_bytes),
            _running(d) if d.running else Text("idle", style="dim"),
            f"{d.busy_s:.1f}s",
        )
    models = Table(title="Models", title_justify="left", expand=False)
    for col in ("model", "state", "queued", "running", f"SLO ({_duration(status.slo_window_s)})"):
        models.add_column(col)
    for m in status.models:
        models.add_row(
            m.name,
            Text("available", style="green") if m.available else Text("unavailable", style="red"),
            str(m.queued),
            str(m.running),
            _slo(m),
        )
    return Group(header, nodes, devices, models)


def render_text(status: ClusterStatus, width: int = 140) -> str:
    """:func:`render` as plain text (no colors), ``width`` columns wide."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(render(status))
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trident status",
        description="The live Trident cluster: nodes, devices, queues.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--scheduler", default="tcp://127.0.0.1:5555", help="the scheduler's client address"
    )
    p.add_argument("--watch", action="store_true", help="redraw every --interval until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument(
        "--curve-dir", help="a client's CurveZMQ key directory (default: none, plain TCP)"
    )
    p.add_argument("--curve-name", default="client", help="the key's name")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    ns = p.parse_args(argv)
    if not ns.interval > 0 or not ns.timeout > 0:
        p.error("--interval and --timeout must be positive")
    return ns


def _watch(fetch: Callable[[], ClusterStatus], interval: float, console: Console) -> int:
    from trident.errors import TridentError

    with Live(console=console, auto_refresh=False, transient=False) as live:
        try:
            while True:
                try:
                    view: RenderableType = render(fetch())
                except TridentError as exc:  # keep watching: the scheduler may come back
                    view = Text(f"trident status: {exc}", style="red")
                live.update(view, refresh=True)
                time.sleep(interval)
        except KeyboardInterrupt:
            return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    from trident.client import Client
    from trident.errors import TridentError

    console = Console()
    try:
        with Client(
            ns.scheduler,
            connect_timeout=ns.timeout,
            curve_dir=ns.curve_dir,
            curve_name=ns.curve_name,
        ) as client:
            if ns.watch:
                return _watch(lambda: client.status(ns.timeout), ns.interval, console)
            console.print(render(client.status(ns.timeout)))
    except TridentError as exc:
        print(f"trident status: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
