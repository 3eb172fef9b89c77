"""Widening: a running diffuse takes idle devices beside it at its next step boundary.

A request's diffuse is dispatched at the degree its devices allowed then: under load a
768x1360x81 clip often starts at degree 1 or 2 because that is what was free, or it
waits for four or eight devices while degree-1 work refills them one by one. When the
devices of the aligned group around a running diffuse V fall idle (nobody waiting took
them this round), V pauses at its next step boundary and resumes on the wider group at
a wider efficient degree: it ends sooner, its devices free sooner, and the LP bound's
relaxation (a request's steps at several degrees) becomes a plan the runtime can run
(a degree change between chunks is exact, docs/parallelism.md).

Rules, each round after dispatch and preemption (:func:`plan_widening`):

- V is a single running diffuse task, not pausing, with nothing queued behind it on its
  devices, paused fewer than ``max_preemptions`` times, and at least
  ``widen_min_gain_s`` seconds saved by the wider degree (the pause's step boundary and
  the resume overhead counted);
- the wider group is aligned on V's node, contains V's devices, and its other members
  are up, have no task, hold V's diffuse weights already (no load), have room for the
  wider degree's peak, and are not held by the dispatcher for a waiting request;
- the wider degree is efficient ((t1/tk)/k >= the policy's efficiency) for V's shape;
- no request of another model waits for encode or diffuse (re-homing may give it those
  idle devices), and while requests of V's own model wait, only a V that would miss its
  deadline at its own degree widens (``widen_on_time_while_queued``: off);
- at most ``max_widen_per_round`` per round, the largest saving first.

The new members are reserved for V from the pause until V's resume
(:func:`widen_reserved`: the dispatcher, preemption and re-homing do not see them);
when the pause is in, :func:`resume_widened` issues V's remaining steps on the whole
group. A plan that can no longer be kept (a member lost, V ended or cancelled) is
dropped and V waits like any paused diffuse. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from trident.sched.cost import efficient_degrees, model_peak_bytes
from trident.sched.dispatcher import _aligned
from trident.sched.placed import _DIFFUSE
from trident.sched.types import Command, LogEvent, Stage

if TYPE_CHECKING:  # pragma: no cover
    from trident.sched.core import RequestState, TaskState
    from trident.sched.preempt import PreemptConfig
    from trident.sched.tridentpolicy import TridentPolicy

__all__ = ["idle_devices", "plan_widening", "resume_widened", "widen_reserved"]


def widen_reserved(policy: TridentPolicy) -> set[str]:
    """Devices reserved for a widened diffuse's resume."""
    return {d for grp in policy._widen.values() for d in grp}


def idle_devices(policy: TridentPolicy) -> list[str]:
    """Up devices with no task that no widened diffuse has reserved (what a group pause
    or a widening may take)."""
    reserved = widen_reserved(policy)
    return [
        d
        for d, st in policy.devices.items()
        if st.up and not st.inflight and d not in reserved and policy.graph.is_up(d)
    ]


def resume_widened(policy: TridentPolicy, now: float, cfg: PreemptConfig) -> list[Command]:
    """Resume each widened diffuse whose pause is in on its whole wider group."""
    out: list[Command] = []
    for rid, group in list(policy._widen.items()):
        req = policy.requests.get(rid)
        if req is None or req.cancelled:
            del policy._widen[rid]
            continue
        if req.task_id is not None:
            continue  # still running to its step boundary
        del policy._widen[rid]
        if rid not in policy.waiting or req.next_stage != _DIFFUSE or req.steps_done <= 0:
            continue  # it ended its diffuse before the pause: nothing to widen
        devs = [policy.devices.get(d) for d in group]
        if any(
            st is None or not st.up or st.inflight or not policy.graph.is_up(st.device_id)
            for st in devs
        ):
            continue  # the group broke up: the dispatcher resumes it like any pause
        model = req.spec.model
        lead = policy.devices[group[0]]
        stages: tuple[Stage, ...] = ("diffuse",)
        k = len(group)
        secs = policy.cost.stage_seconds(req.family, "diffuse", req.spec.shape, k)
        end = now + cfg.chunk_overhead_s + secs * req.remaining_diffuse_fraction
        # Decode merged where the leader holds it and has room for its peak (as the
        # dispatcher merges it).
        if (
            (model, "decode") in lead.holds
            and "decode" in policy.graph.placement(group[0]).get(model, frozenset())
            and lead.info.memory_bytes - policy.weights_on(group[0])
            >= model_peak_bytes(policy.cost, policy.models[model], "decode", req.spec.shape)
        ):
            stages = ("diffuse", "decode")
            end += policy.cost.stage_seconds(req.family, "decode", req.spec.shape, 1)
        out.append(policy.issue(req, stages, group, now, end))
        out.append(
            LogEvent(
                "dispatch.widened",
                {
                    "request_id": rid,
                    "devices": list(group),
                    "degree": k,
                    "steps_done": req.steps_done,
                    "predicted_end": round(end, 3),
                },
            )
        )
    return out


def plan_widening(
    policy: TridentPolicy,
    now: float,
    cfg: PreemptConfig,
    held: Mapping[str, str],
) -> list[Command]:
    """Pauses of running diffuses that resume wider on idle devices beside them.
    ``held``: device -> the waiting request the dispatcher holds it for (not widened
    onto)."""
    if not cfg.enabled or not cfg.widen:
        return []
    idle: dict[str, dict[int, str]] = {}
    for d in idle_devices(policy):
        info = policy.devices[d].info
        idle.setdefault(info.node_id, {})[info.index] = d
    if not idle:
        return []
    # Models with a request waiting for encode or diffuse: their idle devices may be
    # waited for (a group about to form): only a diffuse that would be late widens there.
    # (Found on first need: under overload thousands wait.)
    queued: set[str] | None = None
    options: list[tuple[float, str, tuple[str, ...]]] = []
    for task_id, task in policy.tasks.items():
        cmd = task.cmd
        if task.started_at is None or task.yielding or task.unit != task_id:
            continue
        if "diffuse" not in cmd.stages:
            continue
        first = policy.devices.get(cmd.devices[0])
        if first is None or first.info.node_id not in idle:
            continue
        req = policy.requests.get(cmd.request_id)
        if req is None or req.cancelled or req.preemptions >= cfg.max_preemptions:
            continue
        if any(policy.devices[d].inflight != [task_id] for d in cmd.devices):
            continue  # something queued behind it would run first
        here = {i: d for i, d in idle[first.info.node_id].items() if d not in held}
        if queued is None:
            queued = {r.spec.model for r in policy.waiting.values() if r.next_stage <= _DIFFUSE}
            if len(queued) > 1:
                return []  # every V's model has another model's requests waiting beside it
        if queued - {req.spec.model}:
            # Another model's waiting requests may be re-homed onto these idle devices
            # (mixed trace: 0.665 -> 0.616 SLO when widening went on regardless).
            continue
        late_only = not cfg.widen_on_time_while_queued and req.spec.model in queued
        got = _wider(policy, cfg, task, req, here, now, late_only)
        if got is not None:
            options.append((-got[0], req.request_id, got[1]))
    if not options:
        return []
    options.sort()
    out: list[Command] = []
    taken: set[str] = set()
    for neg_gain, rid, group in options:
        if len(out) >= 2 * cfg.max_widen_per_round:
            break
        req = policy.requests[rid]
        assert req.task_id is not None
        task = policy.tasks[req.task_id]
        new = [d for d in group if d not in task.cmd.devices]
        if any(d in taken for d in new):
            continue
        pause = policy.yield_task(task.cmd.task_id)
        if pause is None:
            continue
        taken.update(new)
        policy._widen[rid] = group
        out.append(pause)
        out.append(
            LogEvent(
                "dispatch.widening",
                {
                    "request_id": rid,
                    "from_devices": list(task.cmd.devices),
                    "devices": list(group),
                    "saved_s": round(-neg_gain, 3),
                },
            )
        )
    return out


def _wider(
    policy: TridentPolicy,
    cfg: PreemptConfig,
    task: TaskState,
    req: RequestState,
    idle_here: Mapping[int, str],
    now: float,
    late_only: bool,
) -> tuple[float, tuple[str, ...]] | None:
    """(seconds saved, the wider group leader first) for the best wider degree, or None
    (also when ``late_only`` and V would end its diffuse on time at its own degree)."""
    cmd = task.cmd
    k = len(cmd.devices)
    info = policy.models[req.spec.model]
    shape, family, cost = req.spec.shape, req.family, policy.cost
    assert task.started_at is not None
    t_k = cost.stage_seconds(family, "diffuse", shape, k)  # the whole diffuse at k
    start = task.started_at
    if cmd.stages[0] == "encode":
        start += cost.stage_seconds(family, "encode", shape, 1)
    if now < start:
        return None  # still encoding
    left = start + t_k * req.remaining_diffuse_fraction - now
    if left < cfg.min_remaining_s or t_k <= 0:
        return None
    if late_only and req.deadline is not None and now + left <= req.deadline:
        return None
    step_s = t_k / max(1, req.total_steps)
    mine = set(cmd.devices)
    pool = dict(idle_here)
    for d in cmd.devices:
        pool[policy.devices[d].info.index] = d
    model = req.spec.model
    best: tuple[float, tuple[str, ...]] | None = None
    for kk in efficient_degrees(cost, family, shape, info.max_degree, policy.config.efficiency):
        if kk <= k:
            continue
        # The share left at ``now`` runs at degree kk after one more step and the resume.
        rest = cost.stage_seconds(family, "diffuse", shape, kk) * (left - step_s) / t_k
        saved = left - (step_s + cfg.chunk_overhead_s + rest)
        if saved < cfg.widen_min_gain_s or (best is not None and saved <= best[0]):
            continue
        peak = model_peak_bytes(cost, info, "diffuse", shape, kk)
        for members in _aligned(pool, kk):
            grp = tuple(members)
            if not mine.issubset(grp):
                continue
            if all(d in mine or _can_join(policy, d, model, peak) for d in grp):
                best = (saved, grp)
                break
    return best


def _can_join(policy: TridentPolicy, dev: str, model: str, peak: int) -> bool:
    """An idle device joins the wider group if its plan has the model's diffuse, the
    weights are resident (no load), and its memory beside its planned weights has room
    for the wider degree's peak."""
    st = policy.devices[dev]
    return (
        "diffuse" in policy.graph.placement(dev).get(model, frozenset())
        and (model, "diffuse") in st.holds
        and st.info.memory_bytes - policy.weights_on(dev) >= peak
    )
