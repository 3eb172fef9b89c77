"""Helpers for fault tests: process memory, the workers' data ports, the log."""

from __future__ import annotations

import os

from tests.integration.conftest import read_log


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def worker_peer_addrs(log_file: str | os.PathLike[str]) -> list[str]:
    """The data-plane addresses of the workers that joined (from the scheduler's log)."""
    return [
        str(e["peer_addr"])
        for e in read_log(log_file)
        if e.get("event") == "worker.joined"
        and e.get("component") == "scheduler"
        and "peer_addr" in e
    ]
