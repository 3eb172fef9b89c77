"""The ``trident`` command.

::

    trident demo [--devices N] [--sim] [--out DIR]     embedded local cluster, mixed requests
    trident scheduler ...                              = trident-scheduler
    trident node ...                                   = trident-node
    trident gateway ...                                = trident-gateway (OpenAI HTTP API)
    trident serve [--model NAME=DIR ...] [--devices cuda:all|cpu:N|sim:N]
                                                       scheduler + node + gateway, foreground
    trident tiny-model FAMILY OUT_DIR [--seed N]       tiny random-weight diffusers pipeline
    trident profile --model DIR --device cpu|cuda ...  per-stage latency / memory profile
    trident bench planner|sim|runtime|live|replacement|chaos benchmarks (see bench/README.md)
    trident report LOGFILE                             SLO attainment and latency from logs
    trident keys DIR                                   CurveZMQ keys (--curve-dir on every daemon)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["main"]


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


def _report(argv: list[str]) -> int:
    from trident.report import main as m

    return m(argv)


def _bench(argv: list[str]) -> int:
    targets: dict[str, Callable[[list[str]], int]] = {}

    def planner(a: list[str]) -> int:
        from trident.bench.planner import main as m

        return int(m(a) or 0)

    def sim(a: list[str]) -> int:
        from trident.bench.sim import main as m

        return int(m(a) or 0)

    def runtime(a: list[str]) -> int:
        from trident.bench.runtime import main as m

        return int(m(a) or 0)

    def live(a: list[str]) -> int:
        from trident.bench.live import main as m

        return int(m(a) or 0)

    def replacement(a: list[str]) -> int:
        from trident.bench.replacement import main as m

        return int(m(a) or 0)

    def chaos(a: list[str]) -> int:
        from trident.bench.chaos import main as m

        return int(m(a) or 0)

    targets.update(
        planner=planner, sim=sim, runtime=runtime, live=live, replacement=replacement, chaos=chaos
    )
    if not argv or argv[0] not in targets:
        print(f"usage: trident bench {{{','.join(targets)}}} ...", file=sys.stderr)
        return 2
    return targets[argv[0]](argv[1:])


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
    "keys": _keys,
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    return COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
