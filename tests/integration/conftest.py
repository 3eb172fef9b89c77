"""Real daemons as separate processes on loopback."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trident.bench.cluster import LocalCluster, NodeSpec


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete JSON line of a log the daemons may still be writing: a last line
    without its newline (a block-buffered writer flushed half of it) is left for the
    next read."""
    text = Path(path).read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def read_log_until(
    path: str | os.PathLike[str], done: Any, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The log once ``done(lines)`` holds (the scheduler flushes its log every tick)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        lines = read_log(path)
        if done(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def sim_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    log_dir = tmp_path_factory.mktemp("sim-cluster")
    cluster = LocalCluster(
        ["flux", "wan=sim:wan"],
        [
            NodeSpec("sim:4", node_id="a", time_scale=0.0005),
            NodeSpec("sim:4", node_id="b", time_scale=0.0005),
        ],
        log_dir=log_dir,
    )
    with cluster:
        yield cluster
