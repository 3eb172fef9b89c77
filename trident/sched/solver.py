"""python-mip solver libraries, loaded once per process outside any solve's time budget.

The first ``mip.Model(solver_name=...)`` in a process loads the solver's shared library
(CBC or HiGHS: ~100-250 ms measured on the dev machine). That is a one-off start-up
cost, not solve time: the dispatcher and the orchestrator call :func:`preload` before
they start their clocks, so a time limit that covers model build + solve does not
spend itself on a library load (and the very first placement is not pushed onto the
fallback by it).
"""

from __future__ import annotations

import time

__all__ = ["loaded_ms", "preload"]

_LOADED: dict[str, float] = {}


def _key(solver: str) -> str:
    return "HIGHS" if solver.lower() == "highs" else "CBC"


def preload(solver: str) -> float:
    """Load ``solver``'s library (``"cbc"`` or ``"highs"``) if not yet loaded; the
    milliseconds it took (0.0 when it was already loaded or python-mip is missing)."""
    key = _key(solver)
    if key in _LOADED:
        return 0.0
    t0 = time.perf_counter()
    try:
        import mip

        m = mip.Model(solver_name=key)
        m.verbose = 0
        del m
    except Exception:  # missing library: the callers fall back on their own
        pass
    ms = (time.perf_counter() - t0) * 1e3
    _LOADED[key] = ms
    return ms


def loaded_ms() -> dict[str, float]:
    """Library load time per solver loaded so far in this process."""
    return dict(_LOADED)
