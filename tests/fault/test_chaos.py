"""Chaos: random worker SIGKILL / SIGSTOP, a node SIGKILLed, the scheduler SIGKILLed
and restarted, all under load. Every request ends in a result or a typed error:
no hangs, no silent losses, and the cluster serves afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from trident.bench.chaos import chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_chaos_under_load_loses_nothing(tmp_path: Path) -> None:
    r = chaos(seconds=40.0, rate=3.0, seed=1, log_dir=str(tmp_path))
    print(r)
    assert r["hangs"] == 0 and r["silent_losses"] == 0, r
    assert r["outcomes"].get("result", 0) >= 0.6 * r["requests"], r
    assert [f["fault"] for f in r["faults"]].count("SIGKILL scheduler") == 1
    assert r["recovered_after_restart"] >= 0 and r["served_after"], r
    assert r["workers_killed_by_node"] >= 1, r  # the SIGSTOPped worker was killed and restarted
