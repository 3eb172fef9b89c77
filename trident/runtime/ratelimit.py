"""Rate-limited logging of refused messages: a flood of bad input must not become a
flood of log lines (disk and CPU are what an attacker would spend next).

Per peer and window, the first ``burst`` refusals are logged in full; the rest are
counted, and the first line of the next window says how many were suppressed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["RejectionLog"]

WINDOW_S = 10.0
BURST = 20
MAX_PEERS = 10_000  # windows kept; past this the table restarts (a flood of identities)


class RejectionLog:
    """Logs ``event`` (default ``protocol.rejected``) at warning level, rate-limited
    per peer. ``clock`` is injectable for tests."""

    def __init__(
        self,
        log: Any,
        *,
        event: str = "protocol.rejected",
        window_s: float = WINDOW_S,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.event = event
        self.window_s = window_s
        self.burst = burst
        self.clock = clock
        # peer -> [window start, lines logged, lines suppressed]
        self._windows: dict[bytes | str, list[float]] = {}
        self.total = 0

    def note(self, peer: bytes | str, **fields: Any) -> bool:
        """Count one refusal from ``peer``; log it unless over the burst. True if logged."""
        self.total += 1
        now = self.clock()
        window = self._windows.get(peer)
        shown = peer.decode(errors="replace")[:80] if isinstance(peer, bytes) else peer[:80]
        if window is None or now - window[0] > self.window_s:
            if window is not None and window[2]:
                self.log.warning(
                    self.event,
                    peer=shown,
                    suppressed=int(window[2]),
                    **{k: v for k, v in fields.items() if k == "channel"},
                )
            if window is None and len(self._windows) >= MAX_PEERS:
                self._windows.clear()
            window = self._windows[peer] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            self.log.warning(self.event, peer=shown, **fields)
            return True
        window[2] += 1
        return False
