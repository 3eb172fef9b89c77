"""Fuzz: 100,000 malformed messages at the client port, the node port and a worker's
data port of a live cluster; afterwards every daemon serves a valid request and the
scheduler's memory has not grown past 2x (``trident bench chaos``'s fuzz scenario)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trident.bench.chaos import fuzz

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_hundred_thousand_malformed_messages_harm_nobody(tmp_path: Path) -> None:
    r = fuzz(count=100_000, seed=7, log_dir=str(tmp_path))
    print(r)
    assert r["served_before"]
    # they answered (errors), they did not hang
    assert r["replies_read"]["client"] > 0 and r["replies_read"]["data"] > 0
    # every daemon still serves: valid requests go through all stages and workers
    assert r["devices_after"] == 2 and r["ready_after"] and r["served_after"]
    assert r["scheduler_alive"] and r["handler_failures"] == 0 and r["crashed_tasks"] == 0
    assert r["scheduler_rss_mb_after"] < 2 * r["scheduler_rss_mb_before"]


def test_malformed_messages_from_a_client_key_under_curve_harm_nobody(tmp_path: Path) -> None:
    """Under CurveZMQ with roles: a client key's garbage is decoded and refused on the
    client port, and refused at the handshake on the node and data ports."""
    r = fuzz(count=100_000, seed=11, log_dir=str(tmp_path), curve=True)
    print(r)
    assert r["served_before"]
    assert r["replies_read"]["client"] > 0  # the client port answered (errors)
    assert r["replies_read"]["data"] == 0  # the data port never admitted the key
    assert r["auth_denied_lines"] > 0
    assert r["devices_after"] == 2 and r["ready_after"] and r["served_after"]
    assert r["scheduler_alive"] and r["handler_failures"] == 0 and r["crashed_tasks"] == 0
    assert r["workers_lost"] == 0 and r["nodes_lost"] == 0
    assert r["scheduler_rss_mb_after"] < 2 * r["scheduler_rss_mb_before"]
