"""Memory truth through the real daemons (scheduler, node, one ``cpu`` worker process):

- a stage that raises torch's ``OutOfMemoryError`` fails only its request, as
  ``OutOfMemoryError`` (code ``out_of_memory``) on the client; the worker frees memory
  and the next request on the same worker process succeeds;
- every finished task's measured memory (process RSS on cpu) reaches the scheduler,
  which logs ``task.memory`` with the planner's figures beside it.

No GPU: the worker's pipeline is a stand-in injected with a ``sitecustomize`` module
(on ``PYTHONPATH`` for the daemons only) that replaces ``TorchExecutor._pipe``; the
rest of the worker path — executor, failure mapping, reports, scheduler, core, client —
is the real one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from trident.bench.cluster import LocalCluster, NodeSpec
from trident.client import Client
from trident.errors import OutOfMemoryError
from trident.report import summarize

pytestmark = pytest.mark.timeout(240)

SITECUSTOMIZE = """
import os

if os.environ.get("TRIDENT_TEST_FAKE_PIPE") == "1":
    import trident.runtime.devices as _devices

    class _FakePipe:
        def __init__(self):
            self._loaded = set()

        def loaded(self):
            return set(self._loaded)

        def load(self, stage):
            self._loaded.add(stage)
            return 0.0

        def unload(self, stage):
            self._loaded.discard(stage)

        def run(self, stage, inputs, params, options, parallel, cancel=None):
            import numpy as np
            import torch

            if stage == "encode":
                return {"prompt_embeds": torch.zeros(8)}
            if stage == "diffuse":
                if params.get("prompt") == "oom":
                    held = torch.ones(1 << 20)  # what the failed stage held
                    raise torch.OutOfMemoryError(
                        "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"
                    )
                return {"latents": torch.zeros(16)}
            h, w = int(params["height"]), int(params["width"])
            return {"output": np.full((h // 8, w // 8, 3), 0.5, dtype=np.float32)}

    def _pipe(self, model):
        pipe = self.pipes.get(model)
        if pipe is None:
            pipe = self.pipes[model] = _FakePipe()
        return pipe

    _devices.TorchExecutor._pipe = _pipe
"""


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _wait_for(log: Path, pred: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in _events(log) if pred(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_cuda_oom_fails_only_its_request_and_the_worker_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{inject}{os.pathsep}{path}" if path else str(inject))
    monkeypatch.setenv("TRIDENT_TEST_FAKE_PIPE", "1")
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("cpu:1", node_id="c", threads=1)],
        policy="fifo",
        log_dir=tmp_path / "logs",
        startup_timeout=180,
    )
    req = dict(height=64, width=64, num_inference_steps=2, seed=1)
    with cluster, Client(cluster.client_addr, timeout=120) as client:
        ok = client.generate("flux", "a cat", **req)
        assert ok.array.shape == (8, 8, 3)
        with pytest.raises(OutOfMemoryError) as info:
            client.generate("flux", "oom", **req)
        assert info.value.code == "out_of_memory"
        assert "out of memory" in info.value.message and "diffuse" in info.value.message
        again = client.generate("flux", "a dog", **req)
        assert again.array.shape == (8, 8, 3)
        log = Path(cluster.log_file or "")
        memory = _wait_for(log, lambda e: e.get("event") == "task.memory", timeout=15)
        freed = _wait_for(log, lambda e: e.get("event") == "device.memory_freed")
    events = _events(log)
    joined = {
        e["pid"]
        for e in events
        if e.get("event") == "worker.joined" and e.get("component") == "worker"
    }
    assert len(joined) == 1, f"the worker restarted: pids {joined}"
    assert not [e for e in events if e.get("event") in ("worker.died", "worker.exited")]
    failed = [
        e for e in events if e.get("event") == "stage.failed" and e.get("component") == "scheduler"
    ]
    assert [e["error"] for e in failed] == ["out_of_memory"]
    assert freed, "the worker did not free memory after the out-of-memory failure"
    # Every finished stage of the two good requests reported measured memory.
    assert len(memory) >= 6, memory
    for e in memory:
        assert e["measure"] == "process_rss"
        assert e["measured_resident_bytes"] > 0
        assert e["planned_peak_bytes"] is not None and e["planned_total_bytes"] is not None
        assert e["device_id"] == "c/cpu:0" and e["shape"]["height"] == 64
    if any(e["measured_peak_bytes"] is not None for e in memory):  # RSS peak resettable
        assert all(e["measured_stage_peak_bytes"] for e in memory)
    # trident report sums them up per model:stage.
    summary = summarize(log).memory_summary()
    assert set(summary) == {"flux:encode", "flux:diffuse", "flux:decode"}
    assert summary["flux:diffuse"]["tasks"] == 2  # the failed one reported nothing
    assert summary["flux:diffuse"]["max_planned_peak_bytes"] > 0
