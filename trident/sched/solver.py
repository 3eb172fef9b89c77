"""python-mip solver plumbing shared by the dispatcher, the orchestrator and the
authors' baseline: deterministic budgets, library preloading, and the stopwatch.

**Deterministic budgets.** A solve is bounded by branch-and-bound *nodes*
(``max_nodes``), never by wall-clock seconds, and runs single-threaded: the same
instance gives the same answer on a loaded 2-core laptop and on an idle server, so a
``trident bench sim`` result depends on the trace and the seed only. (A time limit
makes the incumbent at the deadline, and whether the greedy fallback decides, depend
on the machine's load.) Where a node limit stops a solve with an incumbent, that
incumbent is as reproducible as an optimum.

**Library load.** The first ``mip.Model(solver_name=...)`` in a process loads the
solver's shared library (CBC or HiGHS: ~100-250 ms measured on the dev machine); the
callers :func:`preload` it before their first solve. Preloading also solves a one-variable
model and collects it, so that no later solve can hang: python-mip reaches the library
through cffi, which binds each function and parses each C type on first use under one
non-reentrant lock. A model freed by the garbage collector in the middle of the first
solve's type parsing (which holds that lock) called the not-yet-bound
``Cbc_deleteModel`` from its ``__del__`` and waited for the lock forever: a simulator
run froze with no CPU use (seen in session 13 of bench/sim.md); in the scheduler it
would stop all dispatch.

**Stopwatch.** The core never reads a clock to decide anything. Solve times are still
worth logging, so callers take a :data:`Clock` (the daemon and the benchmarks pass
``time.perf_counter``); the default :func:`no_clock` reports 0.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

__all__ = ["Clock", "loaded_ms", "no_clock", "optimize", "preload", "solver_library"]

Clock = Callable[[], float]

_LOADED: dict[str, float] = {}


def no_clock() -> float:
    """A clock that never moves: solve times read as 0 where nobody measures."""
    return 0.0


def solver_library(solver: str) -> str:
    """python-mip's name for ``solver`` ("cbc" or "highs")."""
    return "HIGHS" if solver.lower() == "highs" else "CBC"


def preload(solver: str, clock: Clock = no_clock) -> float:
    """Load ``solver``'s library if not yet loaded; the milliseconds it took by
    ``clock`` (0.0 when it was already loaded or python-mip is missing)."""
    key = solver_library(solver)
    if key in _LOADED:
        return 0.0
    t0 = clock()
    try:
        import mip

        m = mip.Model(solver_name=key)
        m.verbose = 0
        x = m.add_var(var_type=mip.BINARY)
        m.objective = mip.maximize(x)
        optimize(m, 1)  # parses the progress callback's C type (under cffi's lock)
        del x, m
        gc.collect()  # binds the library's model destructor outside that lock
    except Exception:  # missing library: the callers fall back on their own
        pass
    ms = (clock() - t0) * 1e3
    _LOADED[key] = ms
    return ms


def loaded_ms() -> dict[str, float]:
    """Library load time per solver loaded so far in this process."""
    return dict(_LOADED)


def optimize(model: Any, max_nodes: int) -> Any:
    """Solve ``model`` (a ``mip.Model``) single-threaded within ``max_nodes``
    branch-and-bound nodes; its ``OptimizationStatus``."""
    model.threads = 1
    return model.optimize(max_nodes=max(0, int(max_nodes)))
