"""The request lifecycle of the scheduler core, driven with plain calls (no sockets)."""

from __future__ import annotations

import pytest

from trident.sched.core import CoreConfig, FifoPolicy
from trident.sched.types import (
    CancelTask,
    CompleteRequest,
    DeviceInfo,
    DeviceLost,
    FailRequest,
    ModelInfo,
    NodeJoined,
    ReleaseOutput,
    RequestArrived,
    RequestCancelled,
    RequestSpec,
    RunTask,
    Shape,
    TaskFailed,
    TaskFinished,
    TaskStarted,
    Tick,
)

pytestmark = pytest.mark.timeout(30)

MODELS = {"flux": ModelInfo(name="flux", family="flux")}


def node(n: int, node_id: str = "n0") -> NodeJoined:
    return NodeJoined(
        node_id,
        tuple(DeviceInfo(f"{node_id}/sim:{i}", node_id, "sim", i, 80 << 30) for i in range(n)),
    )


def request(rid: str, t: float = 0.0, model: str = "flux") -> RequestArrived:
    return RequestArrived(
        RequestSpec(rid, model, Shape(64, 64, 1, 2), arrival=t, params={"prompt": "x"})
    )


def runs(cmds: list) -> list[RunTask]:
    return [c for c in cmds if isinstance(c, RunTask)]


def drive_to_completion(core: FifoPolicy, cmds: list, now: float = 1.0) -> list:
    """Finish every task as soon as it is issued; return all commands seen."""
    seen = list(cmds)
    pending = runs(cmds)
    while pending:
        task = pending.pop(0)
        core.handle(TaskStarted(task.task_id), now)
        out = core.handle(TaskFinished(task.task_id, {task.stages[0]: 0.1}), now)
        seen += out
        pending += runs(out)
        now += 0.5
    return seen


def test_request_runs_encode_diffuse_decode_in_order_and_completes() -> None:
    core = FifoPolicy(MODELS)
    core.handle(node(1), 0.0)
    cmds = core.handle(request("r1"), 0.0)
    seen = drive_to_completion(core, cmds)
    stages = [t.stages for t in runs(seen)]
    assert stages == [("encode",), ("diffuse",), ("decode",)]
    tasks = runs(seen)
    # each stage consumes the previous stage's output, only the last goes to the client
    assert tasks[1].inputs[0].key == tasks[0].task_id
    assert tasks[2].inputs[0].key == tasks[1].task_id
    assert [t.final for t in tasks] == [False, False, True]
    done = [c for c in seen if isinstance(c, CompleteRequest)]
    assert len(done) == 1 and done[0].request_id == "r1"
    assert done[0].timings["encode"] == pytest.approx(0.1)
    # every kept output is released once nobody needs it
    released = {c.key for c in seen if isinstance(c, ReleaseOutput)}
    assert released == {tasks[0].task_id, tasks[1].task_id}


def test_unknown_model_and_overload_are_typed_failures() -> None:
    core = FifoPolicy(MODELS, config=CoreConfig(max_queue=2))
    core.handle(node(1), 0.0)
    [fail] = core.handle(request("x", model="nope"), 0.0)
    assert isinstance(fail, FailRequest) and fail.error == "unknown_model"
    core.handle(request("a"), 0.0)
    core.handle(request("b"), 0.0)
    out = core.handle(request("c"), 0.0)
    assert [c.error for c in out if isinstance(c, FailRequest)] == ["overloaded"]


def test_lost_device_reruns_the_stage_elsewhere() -> None:
    core = FifoPolicy(MODELS)
    core.handle(node(2), 0.0)
    [enc] = runs(core.handle(request("r1"), 0.0))
    core.handle(TaskFinished(enc.task_id, {"encode": 0.1}), 0.1)
    # the diffuse task went somewhere; kill that device
    diffuse = next(t.cmd for t in core.tasks.values())
    out = core.handle(DeviceLost(diffuse.devices[0], "killed"), 0.2)
    rerun = runs(out)
    assert rerun, "the request must be re-dispatched on the surviving device"
    assert all(d != diffuse.devices[0] for t in rerun for d in t.devices)
    seen = drive_to_completion(core, out, 0.3)
    assert any(isinstance(c, CompleteRequest) for c in seen)


def test_non_retryable_failure_fails_only_that_request() -> None:
    core = FifoPolicy(MODELS)
    core.handle(node(1), 0.0)
    [t1] = runs(core.handle(request("bad"), 0.0))
    core.handle(request("good"), 0.0)
    out = core.handle(TaskFailed(t1.task_id, "stage_failed", "boom", retryable=False), 0.1)
    fails = [c for c in out if isinstance(c, FailRequest)]
    assert [(f.request_id, f.error) for f in fails] == [("bad", "stage_failed")]
    seen = drive_to_completion(core, out + runs(core.handle(TaskStarted("none"), 0.2)), 0.2)
    # the other request still completes
    pending = [t for t in core.tasks.values()]
    seen += drive_to_completion(core, [t.cmd for t in pending], 0.3)
    assert any(isinstance(c, CompleteRequest) and c.request_id == "good" for c in seen)


def test_cancel_waiting_request_replies_cancelled() -> None:
    core = FifoPolicy(MODELS, config=CoreConfig(max_inflight_per_device=1))
    core.handle(node(1), 0.0)
    core.handle(request("a"), 0.0)
    core.handle(request("b"), 0.0)  # waits: the only device is busy
    out = core.handle(RequestCancelled("b"), 0.1)
    assert [(c.request_id, c.error) for c in out if isinstance(c, FailRequest)] == [
        ("b", "cancelled")
    ]


def test_cancel_in_flight_stops_its_task_and_is_idempotent() -> None:
    core = FifoPolicy(MODELS, config=CoreConfig(max_inflight_per_device=1, preload=False))
    core.handle(node(1), 0.0)
    [enc] = runs(core.handle(request("a"), 0.0))
    core.handle(TaskStarted(enc.task_id), 0.1)
    out = core.handle(RequestCancelled("a"), 0.2)
    # the device is told to stop the task; the request ends when the task reports
    assert [c for c in out if isinstance(c, CancelTask)] == [CancelTask(enc.task_id, enc.devices)]
    assert not [c for c in out if isinstance(c, FailRequest)]
    assert core.handle(RequestCancelled("a"), 0.3) == []  # a second cancel: nothing new
    out = core.handle(TaskFailed(enc.task_id, "cancelled", "cancelled by the client"), 0.4)
    assert [(c.request_id, c.error) for c in out if isinstance(c, FailRequest)] == [
        ("a", "cancelled")
    ]
    # the device is free again: the next request runs at once
    assert runs(core.handle(request("b", 0.5), 0.5))
    assert core.handle(RequestCancelled("a"), 0.6) == []  # after the end: still nothing


def test_requests_fail_unavailable_once_the_only_node_is_gone() -> None:
    cfg = CoreConfig(preload=False, unavailable_after_s=5.0, boot_grace_s=30.0)
    core = FifoPolicy(MODELS, config=cfg)
    core.handle(node(1), 0.0)
    assert runs(core.handle(request("a"), 0.0))
    core.handle(request("b"), 0.0)
    out = core.handle(DeviceLost("n0/sim:0", "node died"), 1.0)
    assert not [c for c in out if isinstance(c, FailRequest)]  # within the grace: they wait
    out = core.handle(Tick(), 6.5)
    assert sorted((c.request_id, c.error) for c in out if isinstance(c, FailRequest)) == [
        ("a", "unavailable"),
        ("b", "unavailable"),
    ]
    out = core.handle(request("c", 7.0), 7.0)  # new requests: refused at once
    assert [(c.request_id, c.error) for c in out if isinstance(c, FailRequest)] == [
        ("c", "unavailable")
    ]
    core.handle(node(1, "n1"), 8.0)  # a node comes back: served again
    assert runs(core.handle(request("d", 8.0), 8.0))


def test_unavailable_is_per_model_a_model_no_live_device_can_hold_fails_alone() -> None:
    models = {
        "flux": ModelInfo(name="flux", family="flux", stage_weight_bytes={"diffuse": 20 << 30}),
        "big": ModelInfo(name="big", family="flux", stage_weight_bytes={"diffuse": 60 << 30}),
    }
    cfg = CoreConfig(preload=False, unavailable_after_s=5.0, boot_grace_s=30.0)
    core = FifoPolicy(models, config=cfg)
    small = DeviceInfo("n0/sim:0", "n0", "sim", 0, 24 << 30)
    large = DeviceInfo("n1/sim:0", "n1", "sim", 0, 80 << 30)
    core.handle(NodeJoined("n0", (small,)), 0.0)
    core.handle(NodeJoined("n1", (large,)), 0.0)
    core.handle(request("b1", 0.0, "big"), 0.0)
    core.handle(DeviceLost("n1/sim:0", "node died"), 1.0)
    core.handle(request("b2", 1.5, "big"), 1.5)
    tick = core.handle(Tick(), 6.5)  # past the grace: only the big model's requests fail
    assert sorted((c.request_id, c.error) for c in tick if isinstance(c, FailRequest)) == [
        ("b1", "unavailable"),
        ("b2", "unavailable"),
    ]
    assert core.unavailable == {"big"}
    out = core.handle(request("b3", 7.0, "big"), 7.0)
    assert [(c.request_id, c.error) for c in out if isinstance(c, FailRequest)] == [
        ("b3", "unavailable")
    ]
    # their tasks on the live (too small) device are stopped: FIFO had put them there
    assert {c.task_id for c in tick if isinstance(c, CancelTask)} == {"b1.enc.1", "b2.enc.2"}
    for c in tick:
        if isinstance(c, CancelTask):
            core.handle(TaskFailed(c.task_id, "cancelled", "cancelled"), 6.6)
    assert runs(core.handle(request("f1", 7.0), 7.0))  # the model that fits is served
    core.handle(NodeJoined("n1", (large,)), 8.0)  # the big device is back
    assert not [
        c for c in core.handle(request("b4", 8.0, "big"), 8.0) if isinstance(c, FailRequest)
    ]
    assert core.unavailable == set()


def test_a_model_too_big_for_every_device_fails_after_the_boot_grace() -> None:
    models = {"big": ModelInfo(name="big", family="flux", stage_weight_bytes={"diffuse": 1 << 40})}
    core = FifoPolicy(models, config=CoreConfig(preload=False, boot_grace_s=30.0))
    core.handle(node(2), 0.0)
    core.handle(request("a", 0.0, "big"), 0.0)
    assert not [c for c in core.handle(Tick(), 29.0) if isinstance(c, FailRequest)]
    out = core.handle(Tick(), 31.0)
    assert [(c.request_id, c.error) for c in out if isinstance(c, FailRequest)] == [
        ("a", "unavailable")
    ]


def test_at_boot_requests_wait_for_the_boot_grace() -> None:
    core = FifoPolicy(MODELS, config=CoreConfig(preload=False, boot_grace_s=30.0))
    core.handle(request("a"), 0.0)
    assert not [c for c in core.handle(Tick(), 29.0) if isinstance(c, FailRequest)]
    assert runs(core.handle(node(1), 29.5))  # the first node arrives in time: it runs


def test_shedding_refuses_what_would_miss_its_deadline_and_only_with_the_setting() -> None:
    from trident.sched.cost import load_cost_model

    cost = load_cost_model(None)

    def slow(rid: str, t: float, slo: float) -> RequestArrived:
        return RequestArrived(
            RequestSpec(rid, "flux", Shape(1024, 1024, 1, 28), arrival=t, slo_s=slo)
        )

    for margin, refused in ((None, []), (5.0, ["late"])):
        core = FifoPolicy(MODELS, cost, CoreConfig(preload=False, shed_late_margin_s=margin))
        core.handle(node(1), 0.0)
        core.handle(slow("first", 0.0, 1000.0), 0.0)  # occupies the only device ~24 s
        out = core.handle(slow("late", 0.1, 30.0), 0.1)  # would finish ~48 s: 18 s late
        out += core.handle(slow("fine", 0.2, 100.0), 0.2)  # ~48 s, within 100 s
        assert [c.request_id for c in out if isinstance(c, FailRequest)] == refused
        if refused:
            assert "deadline" in next(c.message for c in out if isinstance(c, FailRequest))


def test_handle_many_plans_once_for_a_burst() -> None:
    core = FifoPolicy(MODELS, config=CoreConfig(max_inflight_per_device=1, preload=False))
    core.handle(node(2), 0.0)
    rounds = 0
    plan = core.plan

    def counting(now: float) -> list:
        nonlocal rounds
        rounds += 1
        return plan(now)

    core.plan = counting  # type: ignore[method-assign]
    out = core.handle_many([request(f"r{i}") for i in range(50)], 0.1)
    assert rounds == 1
    assert len(runs(out)) == 2  # two devices, one task each


def test_fixed_diffuse_degree_uses_an_aligned_group_on_one_node() -> None:
    core = FifoPolicy(MODELS, config=CoreConfig(diffuse_degree=2, preload=False))
    core.handle(node(4, "a"), 0.0)
    [enc] = runs(core.handle(request("r1"), 0.0))
    out = core.handle(TaskFinished(enc.task_id, {"encode": 0.1}), 0.1)
    [diffuse] = runs(out)
    assert diffuse.degree == 2
    idx = sorted(int(d.rsplit(":", 1)[1]) for d in diffuse.devices)
    assert idx in ([0, 1], [2, 3])
    seen = drive_to_completion(core, out, 0.2)
    assert any(isinstance(c, CompleteRequest) for c in seen)


def test_decode_that_would_crowd_the_device_is_tiled_and_a_small_one_is_not() -> None:
    from trident.sched.cost import load_cost_model

    cost = load_cost_model()
    models = {"flux": ModelInfo("flux", "flux")}
    core = FifoPolicy(models, cost, CoreConfig(preload=False))
    core.handle(node(1), 0.0)

    def decode_task(rid: str, model: str, shape: Shape) -> RunTask:
        out = core.handle(RequestArrived(RequestSpec(rid, model, shape, arrival=0.0)), 0.0)
        while True:
            [task] = runs(out)
            if task.stages == ("decode",):
                return task
            out = core.handle(TaskFinished(task.task_id, {task.stages[0]: 1.0}), 1.0)

    small = decode_task("img", "flux", Shape(512, 512, 1, 28))
    assert "vae_tiling" not in small.options
    drive_to_completion(core, [small])
    huge = Shape(4096, 4096, 1, 28)
    assert cost.stage_peak_bytes("flux", "decode", huge, 1) > 0.5 * (80 << 30)  # the premise
    big = decode_task("big", "flux", huge)
    assert big.options.get("vae_tiling") is True


def test_a_booting_node_joins_once_all_its_devices_are_up_or_after_the_grace() -> None:
    from trident.sched.types import DeviceUp, NodeBooting

    devs = [DeviceInfo(f"n0/sim:{i}", "n0", "sim", i, 80 << 30) for i in range(3)]
    core = FifoPolicy(MODELS, config=CoreConfig(preload=False, join_grace_s=10.0))
    core.handle(NodeBooting("n0", 3), 0.0)
    core.handle(DeviceUp(devs[0]), 1.0)
    core.handle(DeviceUp(devs[1]), 2.0)
    assert not core.up_devices()  # held back: the node is planned once, not per hello
    core.handle(DeviceUp(devs[2]), 3.0)
    assert len(core.up_devices()) == 3
    # a node one of whose workers never comes up joins with the others after the grace
    late = FifoPolicy(MODELS, config=CoreConfig(preload=False, join_grace_s=10.0))
    late.handle(NodeBooting("n0", 3), 0.0)
    late.handle(DeviceUp(devs[0]), 1.0)
    assert not late.handle(Tick(), 9.0) and not late.up_devices()
    late.handle(Tick(), 10.5)
    assert [d.info.device_id for d in late.up_devices()] == ["n0/sim:0"]
    late.handle(DeviceUp(devs[1]), 11.0)  # after the grace: joins alone, at once
    assert len(late.up_devices()) == 2


def test_a_long_720p_video_decode_is_tiled_though_its_tiled_peak_would_fit() -> None:
    """The reference decode figures of a video family are tiled ones; the decision weighs
    the untiled peak (HunyuanVideo 720x1280x129: ~130 GB untiled, ~11 GB tiled), so an
    80 GB device does not run it untiled into an out-of-memory."""
    from trident.sched.cost import decode_peak_bytes, load_cost_model

    cost = load_cost_model()
    models = {"hy": ModelInfo("hy", "hunyuanvideo")}
    core = FifoPolicy(models, cost, CoreConfig(preload=False))
    core.handle(node(1), 0.0)
    shape = Shape(720, 1280, 129, 8)
    assert cost.stage_peak_bytes("hunyuanvideo", "decode", shape, 1) < 0.5 * (80 << 30)
    assert decode_peak_bytes(cost, "hunyuanvideo", shape, tiled=False) > 80 << 30
    out = core.handle(RequestArrived(RequestSpec("v", "hy", shape, arrival=0.0)), 0.0)
    while True:
        [task] = runs(out)
        if "decode" in task.stages:
            break
        out = core.handle(TaskFinished(task.task_id, {task.stages[0]: 1.0}), 1.0)
    assert task.options.get("vae_tiling") is True


def test_the_tiling_decision_counts_the_weights_the_device_holds() -> None:
    """An untiled decode that fits an empty device but not beside resident weights."""
    from trident.sched.cost import decode_peak_bytes, load_cost_model

    cost = load_cost_model()
    shape = Shape(768, 1360, 81, 6)
    untiled = decode_peak_bytes(cost, "cogvideox", shape, tiled=False)
    weights = sum(cost.weight_bytes("cogvideox", s) for s in ("encode", "diffuse", "decode"))
    memory = 48 * 10**9
    assert untiled < 0.5 * memory and untiled > 0.5 * (memory - weights)  # the premise
    core = FifoPolicy({"cv": ModelInfo("cv", "cogvideox")}, cost, CoreConfig(preload=False))
    dev = DeviceInfo("n0/sim:0", "n0", "sim", 0, memory)
    core.handle(NodeJoined("n0", (dev,)), 0.0)
    core.handle(RequestArrived(RequestSpec("v", "cv", shape, arrival=0.0)), 0.0)
    req = core.requests["v"]
    holds = core.devices[dev.device_id].holds
    holds.clear()
    assert not core._decode_needs_tiling(req, dev.device_id)
    # Nothing resident yet, but the task itself loads the whole pipeline there.
    assert core._decode_needs_tiling(req, dev.device_id, ("encode", "diffuse", "decode"))
    holds.update({("cv", "encode"), ("cv", "diffuse"), ("cv", "decode")})
    assert core._decode_needs_tiling(req, dev.device_id)


def test_a_float32_model_is_planned_with_twice_the_activation_bytes() -> None:
    """The cost model's activation figures are bfloat16; a model served in float32 needs
    twice them (#12 item 1): its decode tiles where the same model in bfloat16 does not."""
    from trident.sched.cost import decode_peak_bytes, load_cost_model

    cost = load_cost_model()
    shape = Shape(768, 432, 17, 6)
    untiled = decode_peak_bytes(cost, "cogvideox", shape, tiled=False)
    memory = 40 * 10**9
    assert untiled < 0.5 * memory < 2 * untiled  # the premise

    def tiles(dtype: str) -> bool:
        models = {"cv": ModelInfo("cv", "cogvideox", dtype=dtype)}
        core = FifoPolicy(models, cost, CoreConfig(preload=False))
        dev = DeviceInfo("n0/sim:0", "n0", "sim", 0, memory)
        core.handle(NodeJoined("n0", (dev,)), 0.0)
        core.handle(RequestArrived(RequestSpec("v", "cv", shape, arrival=0.0)), 0.0)
        core.devices[dev.device_id].holds.clear()
        return core._decode_needs_tiling(core.requests["v"], dev.device_id)

    assert not tiles("bfloat16")
    assert not tiles("auto")  # sized as bfloat16, as its weights are
    assert tiles("float32")


def test_a_float32_model_needs_twice_the_activations_to_fit_a_device() -> None:
    """A shape whose bfloat16 diffuse fits beside its weights at degree 1 is refused in
    float32 on a cluster too small for its doubled activations at any degree."""
    from trident.sched.cost import load_cost_model
    from trident.sched.placed import PlacedPolicy
    from trident.sim.scenario import make_sim_policy

    cost = load_cost_model()
    shape = Shape(2048, 2048, 1, 28)
    peak = cost.stage_peak_bytes("flux", "diffuse", shape, 1)
    weights = cost.weight_bytes("flux", "diffuse")
    memory = int(2 * weights + 1.2 * peak)  # float32 weights fit, doubled peak does not

    def misfit(dtype: str) -> str | None:
        models = {"f": ModelInfo("f", "flux", dtype=dtype, max_degree=1)}
        policy = make_sim_policy("trident", models, cost)
        assert isinstance(policy, PlacedPolicy)
        dev = DeviceInfo("n0/sim:0", "n0", "sim", 0, memory)
        policy.handle(NodeJoined("n0", (dev,)), 0.0)
        return policy.memory_misfit("f", shape)

    assert misfit("bfloat16") is None
    msg = misfit("float32")
    assert msg is not None and "diffuse" in msg
