"""One device model: the core decides where each load comes from and says so in the
command; eviction order is one rule for the simulator and the runtime's sim devices."""

from __future__ import annotations

import pytest

from trident.runtime.devices import SimExecutor
from trident.sched.core import CoreConfig, FifoPolicy
from trident.sched.residency import eviction_order, victims
from trident.sched.types import (
    DeviceInfo,
    LoadStage,
    ModelInfo,
    NodeJoined,
    RequestArrived,
    RequestSpec,
    RunTask,
    Shape,
    StageLoaded,
)

pytestmark = pytest.mark.timeout(30)

GB = 1 << 30


def test_eviction_is_least_recently_used_then_largest() -> None:
    resident = {"a": 5, "b": 9, "c": 1, "d": 9}
    last_use = {"a": 3.0, "b": 1.0, "c": 1.0, "d": 1.0}
    assert eviction_order(resident, last_use) == ["b", "d", "c", "a"]
    assert eviction_order(resident, last_use, keep={"b"}) == ["d", "c", "a"]
    assert victims(resident, last_use, keep=(), need=0, capacity=24) == []
    assert victims(resident, last_use, keep=(), need=8, capacity=24) == ["b"]
    assert victims(resident, last_use, keep={"a", "b", "d"}, need=10, capacity=24) is None


def test_the_core_says_where_each_load_comes_from() -> None:
    models = {"flux": ModelInfo(name="flux", family="flux")}
    core = FifoPolicy(models, config=CoreConfig(preload=True))
    devs = tuple(DeviceInfo(f"n0/sim:{i}", "n0", "sim", i, 80 * GB) for i in range(2))
    out = core.handle(NodeJoined("n0", devs), 0.0)
    loads = [c for c in out if isinstance(c, LoadStage)]
    assert loads and all(c.source for c in loads)
    first = {(c.model, c.stage): c for c in loads if c.device_id == "n0/sim:0"}
    second = {(c.model, c.stage): c for c in loads if c.device_id == "n0/sim:1"}
    # the first load of a stage on a node reads disk; the next one shares the node's copy
    assert {c.source for c in first.values()} == {"disk"}
    assert {c.source for c in second.values()} == {"node-cache"}
    # once a device holds a stage it is resident there and a peer for the node's others
    core.handle(StageLoaded("n0/sim:0", "flux", "encode", 1.0, "disk"), 1.0)
    assert core.load_source("n0/sim:0", "flux", "encode") == "resident"
    assert core.load_source("n0/sim:1", "flux", "encode") == "peer"
    spec = RequestSpec("r", "flux", Shape(64, 64, 1, 2), arrival=1.0, params={"prompt": "x"})
    [run] = [c for c in core.handle(RequestArrived(spec), 1.0) if isinstance(c, RunTask)]
    assert set(run.load_sources) == set(run.devices)
    assert all(run.load_sources[d][s] for d in run.devices for s in run.load_sources[d])


def test_runtime_sim_device_evicts_in_the_same_order() -> None:
    models = {"flux": {"family": "flux"}, "sd3": {"family": "sd3"}}
    ex = SimExecutor(models, 32 * GB, time_scale=0.0)
    ex.load("flux", "encode")  # 9.8 GB
    ex.load("sd3", "diffuse")  # 4.1 GB
    ex.load("flux", "encode")  # used again: now the most recent
    ex.load("flux", "diffuse")  # 23.8 GB: room for it costs the least recently used
    assert ("sd3", "diffuse") not in ex.resident  # (largest-first would drop flux encode)
    assert ("flux", "encode") in ex.resident and ("flux", "diffuse") in ex.resident
    assert ex.evicted == [("sd3", "diffuse")]


def test_the_other_ranks_of_a_merged_task_hold_only_diffuse() -> None:
    """Encode+diffuse at degree 2: the leader loads both stages, the other rank only
    diffuse (it runs diffuse alone), so a 14 GB text encoder is not copied to every
    member of the group — on the runtime's sim devices and in the simulator alike."""
    models = {"hunyuanvideo": {"family": "hunyuanvideo"}}
    params = {"height": 544, "width": 960, "num_frames": 65, "num_inference_steps": 8}
    stages = ("encode", "diffuse")
    ranks = []
    for rank in (0, 1):
        ex = SimExecutor(models, 80 * GB, time_scale=0.0)
        result = ex.run("hunyuanvideo", stages, None, params, {"degree": 2, "rank": rank})
        ranks.append((sorted(s for _, s, _, _ in result.loaded), set(ex.resident)))
    assert ranks[0] == (
        ["diffuse", "encode"],
        {("hunyuanvideo", "diffuse"), ("hunyuanvideo", "encode")},
    )
    assert ranks[1] == (["diffuse"], {("hunyuanvideo", "diffuse")})
