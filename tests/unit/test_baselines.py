"""Baselines: placement shapes and dispatch rules."""

from __future__ import annotations

import pytest

from trident.sched.baselines import (
    AuthorsPolicy,
    StageSrtfPolicy,
    StaticFifoConfig,
    StaticFifoPolicy,
    model_blocks,
)
from trident.sched.core import RequestState
from trident.sched.cost import load_cost_model
from trident.sched.types import (
    DeviceInfo,
    LoadStage,
    ModelInfo,
    NodeJoined,
    RequestArrived,
    RequestSpec,
    RunTask,
    Shape,
)

pytestmark = pytest.mark.timeout(30)
COST = load_cost_model([])


def _devs(nodes: int, per: int) -> tuple[DeviceInfo, ...]:
    return tuple(
        DeviceInfo(f"n{n}/sim:{i}", f"n{n}", "sim", i, 48 * 10**9)
        for n in range(nodes)
        for i in range(per)
    )


def test_model_blocks_whole_nodes_or_split() -> None:
    b = model_blocks(list(_devs(2, 8)), ["a", "b"], {})
    assert [len(x) for x in b["a"]] == [8] and [len(x) for x in b["b"]] == [8]
    b = model_blocks(list(_devs(1, 8)), ["a", "b", "c"], {})
    assert sum(len(x) for v in b.values() for x in v) == 8 and all(b.values())


def test_b1_fixed_degree_whole_pipeline() -> None:
    ms = {"flux": ModelInfo("flux", "flux")}
    pol = StaticFifoPolicy(ms, COST, StaticFifoConfig(degree=2))
    out = pol.handle(NodeJoined("n0", _devs(1, 4)), 0.0)
    assert len([c for c in out if isinstance(c, LoadStage)]) == 12  # 4 devices x EDC
    out = pol.handle(RequestArrived(RequestSpec("r", "flux", Shape(512, 512, 1, 4), 0.0)), 0.0)
    run = next(c for c in out if isinstance(c, RunTask))
    assert run.degree == 2 and run.stages == ("encode", "diffuse", "decode")


def test_b6_split_and_stage_tasks() -> None:
    ms = {"flux": ModelInfo("flux", "flux")}
    pol = StageSrtfPolicy(ms, COST)
    pol.handle(NodeJoined("n0", _devs(1, 8)), 0.0)
    types = sorted(pol.graph.placement_type(f"n0/sim:{i}", "flux") for i in range(8))
    assert types == ["C", "D", "D", "D", "D", "D", "D", "E"]
    out = pol.handle(RequestArrived(RequestSpec("r", "flux", Shape(512, 512, 1, 4), 0.0)), 0.0)
    run = next(c for c in out if isinstance(c, RunTask))
    assert run.stages == ("encode",) and pol.graph.placement_type(run.devices[0], "flux") == "E"


def test_authors_memory_rules() -> None:
    ms = {
        "flux": ModelInfo("flux", "flux"),
        "hunyuanvideo": ModelInfo("hunyuanvideo", "hunyuanvideo", is_video=True),
    }
    pol = AuthorsPolicy(ms, COST)
    big = RequestState(RequestSpec("a", "flux", Shape(2048, 2048, 1, 28), 0.0), "flux", 100.0)
    assert min(pol.allowed_degrees(big)) >= 2
    vid = RequestState(
        RequestSpec("b", "hunyuanvideo", Shape(720, 1280, 129, 50), 0.0), "hunyuanvideo", 1e5
    )
    assert min(pol.allowed_degrees(vid)) >= 4
    pol.handle(NodeJoined("n0", _devs(2, 8)), 0.0)
    out = pol.handle(RequestArrived(RequestSpec("c", "flux", Shape(1024, 1024, 1, 28), 0.0)), 0.0)
    assert any(isinstance(c, RunTask) for c in out)
