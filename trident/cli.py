"""The ``trident`` command: one entry point for the daemons, the demo and the tools.

``trident --help`` lists the commands; ``trident COMMAND --help`` describes one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

__all__ = ["BENCHMARKS", "COMMANDS", "PARSERS", "SUMMARIES", "build_parser", "main", "usage"]

# One line per command for ``trident --help`` (a command missing here is listed bare).
SUMMARIES: dict[str, str] = {
    "demo": "start an embedded local cluster, send mixed requests, print a table",
    "scheduler": "run the central scheduler daemon (= trident-scheduler)",
    "node": "run a node daemon that spawns one worker per device (= trident-node)",
    "gateway": "run the OpenAI-compatible HTTP gateway (= trident-gateway)",
    "serve": "run a scheduler, one node and the gateway on this machine, in the foreground",
    "tiny-model": "write a tiny random-weight diffusers pipeline (for tests and demos)",
    "profile": "measure a pipeline's per-stage latency and memory for the cost model",
    "bench": "run a benchmark (trident bench --help lists them; see bench/README.md)",
    "report": "SLO attainment, latency, failures and a timeline, from a scheduler log",
    "status": "the live cluster: nodes, devices, what each holds and runs, queues, SLO",
    "keys": "make CurveZMQ keys (--curve-dir on every daemon)",
}

# benchmark -> (module with main() and build_parser(), one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "planner": (
        "trident.bench.planner",
        "solve time of the orchestrator and the dispatcher at scale",
    ),
    "sim": (
        "trident.bench.sim",
        "every policy on the same trace and simulated cluster, side by side",
    ),
    "runtime": (
        "trident.bench.runtime",
        "the real daemons' control plane and data plane, measured",
    ),
    "live": (
        "trident.bench.live",
        "one trace through the simulator and the real daemons (sim GPUs)",
    ),
    "replacement": (
        "trident.bench.replacement",
        "dynamic re-placement against a frozen plan on a shifting workload",
    ),
    "chaos": (
        "trident.bench.chaos",
        "reliability scenarios (overload, fuzz, chaos) against real daemons",
    ),
}

# command -> the module whose build_parser() returns its ArgumentParser
PARSERS: dict[str, str] = {
    "demo": "trident.demo",
    "scheduler": "trident.runtime.scheduler",
    "node": "trident.runtime.node",
    "gateway": "trident.gateway.main",
    "serve": "trident.serve",
    "tiny-model": "trident.pipelines.tiny",
    "profile": "trident.pipelines.profile",
    "report": "trident.report",
    "status": "trident.status",
    "keys": "trident.runtime.security",
    **{f"bench {name}": module for name, (module, _) in BENCHMARKS.items()},
}


def _scheduler(argv: list[str]) -> int:
    from trident.runtime.scheduler import main as m

    return m(argv)


def _node(argv: list[str]) -> int:
    from trident.runtime.node import main as m

    return m(argv)


def _gateway(argv: list[str]) -> int:
    from trident.gateway.main import main as m

    return m(argv)


def _serve(argv: list[str]) -> int:
    from trident.serve import main as m

    return m(argv)


def _demo(argv: list[str]) -> int:
    from trident.demo import main as m

    return m(argv)


def _tiny(argv: list[str]) -> int:
    from trident.pipelines.tiny import main as m

    return int(m(argv) or 0)


def _profile(argv: list[str]) -> int:
    from trident.pipelines.profile import main as m

    return int(m(argv) or 0)


def _keys(argv: list[str]) -> int:
    from trident.runtime.security import main as m

    return m(argv)


def _status(argv: list[str]) -> int:
    from trident.status import main as m

    return m(argv)


def _report(argv: list[str]) -> int:
    from trident.report import main as m

    return m(argv)


def _bench_usage() -> str:
    width = max(len(n) for n in BENCHMARKS)
    lines = [
        "usage: trident bench BENCHMARK [options]",
        "",
        "benchmarks (trident bench BENCHMARK --help for its options):",
    ]
    lines += [f"  {n:<{width}}  {summary}" for n, (_, summary) in BENCHMARKS.items()]
    return "\n".join(lines)


def _bench(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(_bench_usage())
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        if argv:
            print(f"trident bench: unknown benchmark {argv[0]!r}", file=sys.stderr)
        print(_bench_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "scheduler": _scheduler,
    "node": _node,
    "gateway": _gateway,
    "serve": _serve,
    "tiny-model": _tiny,
    "profile": _profile,
    "bench": _bench,
    "report": _report,
    "status": _status,
    "keys": _keys,
}


def usage() -> str:
    """``trident --help``: the commands, one line each."""
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: trident COMMAND [options]",
        "",
        "Trident: serving diffusion pipelines stage by stage across devices.",
        "",
        "commands (trident COMMAND --help for its options):",
    ]
    lines += [f"  {n:<{width}}  {SUMMARIES.get(n, '')}".rstrip() for n in COMMANDS]
    return "\n".join(lines)


def build_parser(command: str) -> argparse.ArgumentParser:
    """The ArgumentParser of ``command`` ("report", "bench sim", ...), for help and tests."""
    return importlib.import_module(PARSERS[command]).build_parser()  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help") and len(args) == 1:
        print(usage())
        return 0
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] not in COMMANDS:
        print(f"trident: unknown command {args[0]!r}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    return COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
