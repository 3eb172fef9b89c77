"""A flood of refused messages is logged as a few lines per peer and window, then a
count of what was suppressed."""

from __future__ import annotations

from typing import Any

import pytest

from trident.runtime.ratelimit import RejectionLog

pytestmark = pytest.mark.timeout(10)


class Lines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


def test_burst_then_suppressed_count_per_peer_and_window() -> None:
    now = [0.0]
    log = Lines()
    rl = RejectionLog(log, window_s=10.0, burst=3, clock=lambda: now[0])
    logged = [rl.note(b"a", channel="client", error=f"bad {i}") for i in range(1000)]
    assert logged.count(True) == 3 and len(log.lines) == 3
    assert rl.note(b"b", channel="client", error="other peer")  # its own window
    now[0] = 11.0
    rl.note(b"a", channel="client", error="next window")
    summary = [e for e in log.lines if "suppressed" in e]
    assert summary == [
        {"event": "protocol.rejected", "peer": "a", "suppressed": 997, "channel": "client"}
    ]
    assert log.lines[-1]["error"] == "next window"
    assert rl.total == 1002
