"""Overload: well over 10x capacity for 30 s. No worker or node is falsely lost,
every request ends in a result or a typed error, "overloaded" answers come fast,
memory stays flat, and normal service resumes afterwards (``trident bench chaos``'s
overload scenario)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trident.bench.chaos import overload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RATE = 100.0  # requests per second offered
SECONDS = 30.0


def test_ten_times_capacity_for_thirty_seconds(tmp_path: Path) -> None:
    # 4 simulated devices; a 256^2 4-step flux request costs ~0.55 s of device time
    # at time scale 1, so capacity is ~7 req/s and RATE is >10x it.
    r = overload(rate=RATE, seconds=SECONDS, devices=4, max_queue=256, log_dir=str(tmp_path))
    print(r)
    counts = r["outcomes"]
    assert r["requests"] == int(RATE * SECONDS)  # every request ended
    assert set(counts) <= {"result", "OverloadedError"}, counts  # no timeouts, no hangs
    assert counts.get("result", 0) > 50 and counts.get("OverloadedError", 0) > 1000
    # client load never starves the cluster channel
    assert r["workers_lost"] == 0 and r["nodes_lost"] == 0, r
    assert r["scheduler_rss_mb_after"] < 2 * r["scheduler_rss_mb_before"]
    assert r["served_after"]
