"""Step-level preemption: pause a long running diffuse so an urgent request is on time.

After each dispatch round, a waiting request R whose next stages are encode and/or
diffuse and that would miss its deadline waiting for a device may take the devices of a
running diffuse V, when that is a gain for the objective the dispatcher maximises
(requests on time):

- "Would miss": where R stands in the queue, earliest deadline first, each request
  taking the next aligned group of its best degree among its model's homes as the
  groups free;
- R meets its deadline on V's devices: V pauses at its next step boundary (one of V's
  steps), R's stages load what they lack, then run at R's best efficient degree that
  fits inside V's aligned group. Where no single V's group is large enough, several
  smaller V whose groups together make an aligned group of R's best degree pause
  together (each judged as below);
- V does not become late for it: V's predicted end after the pause (R's run, a
  per-chunk resume overhead, V's remaining steps) is still within V's deadline — or V
  was going to miss it anyway;
- V has more work left than R needs (never pause a nearly finished diffuse), it has
  been paused fewer than ``max_preemptions`` times (nothing starves), and nothing else
  is queued on its devices (R runs right after V's pause, as workers run FIFO).

The pause is a :class:`~trident.sched.types.YieldTask`; R's task is issued on the same
devices in the same round, so it runs as soon as V's state is handed over. V then waits
like any request whose next stage is diffuse, with its remaining share of the steps
(``QueueItem.diffuse_fraction``): the dispatcher resumes it on whichever devices and at
whichever degree serve the objective best. Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trident.sched.cost import (
    activation_scale,
    batch_peak_bytes,
    best_degree,
    model_weight_bytes,
    supported_degrees,
)
from trident.sched.dispatcher import _aligned
from trident.sched.placed import _DIFFUSE
from trident.sched.types import Command, LogEvent, Stage
from trident.sched.widen import idle_devices

if TYPE_CHECKING:  # pragma: no cover
    from trident.sched.core import RequestState, TaskState
    from trident.sched.tridentpolicy import TridentPolicy

__all__ = ["PreemptConfig", "plan_preemptions"]


@dataclass
class PreemptConfig:
    enabled: bool = True  # False: trident-np (the same planner, never pauses)
    max_preemptions: int = 2  # per request
    # Only a diffuse with at least this many seconds left is paused.
    min_remaining_s: float = 5.0
    # Seconds a resumed chunk pays before its first step (the simulator's
    # ``chunk_overhead_s`` is the truth; this is the planner's estimate of it).
    chunk_overhead_s: float = 0.05
    max_per_round: int = 4  # pauses issued per dispatch round
    # Widening (trident.sched.widen): a running diffuse pauses to resume at a wider
    # efficient degree on idle devices beside it when that saves at least this much.
    widen: bool = True
    widen_min_gain_s: float = 10.0
    # While requests of its model wait, a diffuse on time at its own degree widens only
    # if this is set (their next group may be forming on those idle devices).
    widen_on_time_while_queued: bool = False
    max_widen_per_round: int = 4


@dataclass
class _Victim:
    task: TaskState
    req: RequestState
    end: float  # predicted end of its task if left alone
    step_s: float  # seconds of one of its diffuse steps (the wait for its boundary)
    rest_s: float  # its remaining stage seconds after a pause (resume included)
    group: tuple[str, ...] = ()  # its devices by index


def _stage_seconds(policy: TridentPolicy, req: RequestState, stage: Stage, k: int) -> float:
    secs = float(policy.cost.stage_seconds(req.family, stage, req.spec.shape, k))
    return secs * req.remaining_diffuse_fraction if stage == "diffuse" else secs


def _victims(policy: TridentPolicy, cfg: PreemptConfig, now: float) -> list[_Victim]:
    out: list[_Victim] = []
    for task_id, task in policy.tasks.items():
        cmd = task.cmd
        if (
            task.started_at is None
            or task.yielding
            or task.unit != task_id
            or "diffuse" not in cmd.stages
        ):
            continue
        req = policy.requests.get(cmd.request_id)
        if req is None or req.preemptions >= cfg.max_preemptions or req.cancelled:
            continue
        if any(policy.devices[d].inflight != [task_id] for d in cmd.devices):
            continue  # something is queued behind it: R would not run next
        k = len(cmd.devices)
        secs = {s: _stage_seconds(policy, req, s, k if s == "diffuse" else 1) for s in cmd.stages}
        end = task.started_at + sum(secs.values())
        diffuse_end = end - sum(secs[s] for s in cmd.stages[cmd.stages.index("diffuse") + 1 :])
        left = diffuse_end - now
        if left < cfg.min_remaining_s:
            continue
        steps = max(1, req.total_steps - req.steps_done)
        step_s = secs["diffuse"] / steps
        after = sum(secs[s] for s in cmd.stages[cmd.stages.index("diffuse") + 1 :])
        group = tuple(sorted(cmd.devices, key=lambda d: policy.devices[d].info.index))
        out.append(_Victim(task, req, end, step_s, left + cfg.chunk_overhead_s + after, group))
    return out


def plan_preemptions(policy: TridentPolicy, now: float, cfg: PreemptConfig) -> list[Command]:
    """Pauses (and the urgent requests' tasks on the paused devices) for this round.

    Cheap when nothing is urgent: a waiting request is examined only if it is late
    where it stands in the queue (:func:`_queue_urgent`) and could still be on time
    from now; at most ``4 * max_per_round`` of them, in deadline order, meet the
    victims: one victim's group, else several smaller victims' groups that make an
    aligned group of the request's best degree (:func:`_best_group_swap`)."""
    if not cfg.enabled or not policy.waiting:
        return []
    free_any = min((d.busy_until for d in policy.devices.values() if d.up), default=now)
    urgent = _queue_urgent(policy, now, free_any, 4 * cfg.max_per_round)
    if not urgent:
        return []
    victims = _victims(policy, cfg, now)
    if not victims:
        return []
    source = policy.load_sources()
    # Devices with no task may complete a group pause (re-checked at use: this round's
    # pauses issue tasks).
    idle = idle_devices(policy)
    out: list[Command] = []
    for _, req, _alone in urgent:  # deadline order
        if len(out) >= 3 * cfg.max_per_round or not victims:
            break
        choice = _best_swap(policy, req, victims, now, source)
        if choice is None:
            choice = _best_group_swap(policy, req, victims, idle, now, source)
        if choice is None:
            continue
        paused, devices, stages, end = choice
        # (_victims lists only tasks yield_task accepts: running single diffuses.)
        pauses = [policy.yield_task(v.task.cmd.task_id) for v in paused]
        for v in paused:
            victims.remove(v)
        out.extend(p for p in pauses if p is not None)
        out.append(policy.issue(req, stages, devices, now, end))
        for v in paused:
            out.append(
                LogEvent(
                    "dispatch.preempted",
                    {
                        "request_id": req.request_id,
                        "paused_request_id": v.req.request_id,
                        "paused_task_id": v.task.cmd.task_id,
                        "devices": list(devices),
                        "stages": list(stages),
                        "predicted_end": round(end, 3),
                        "paused_predicted_end": round(end + v.rest_s, 3),
                    },
                )
            )
    return out


def _queue_urgent(
    policy: TridentPolicy, now: float, free_any: float, limit: int
) -> list[tuple[float, RequestState, float]]:
    """Up to ``limit`` waiting requests, earliest deadline first, that would miss their
    deadline where they stand in the queue and could still be on time if started now.
    In deadline order each takes the next aligned group of its best degree among its
    model's up diffuse homes, in the order the groups free (a group taken is not counted
    free again: pessimistic). Judged by the earliest free device alone, as before, every
    waiting request looked on time under load (128 busy devices free one every few
    seconds) and almost nothing was paused: cogvideox 0.4, 1 pause in 720 requests.
    A free device of another model does not serve it (four pipelines: sd3's 2 s
    deadlines passed while flux devices idled, and nothing was paused)."""
    cands: list[tuple[float, str, RequestState, float, int]] = []
    for r in policy.waiting.values():
        if r.task_id is not None or r.deadline is None or r.cancelled or r.next_stage > _DIFFUSE:
            continue
        alone, k = _alone_memoised(policy, r)
        if now + alone > r.deadline:
            continue  # late even with the cluster to itself
        cands.append((r.deadline, r.request_id, r, alone, k))
    # Deadline order, lazily: the walk stops at ``limit`` urgent ones, and those come
    # once the groups run out (under a 3x overload ~3,000 wait; sorting them all every
    # round cost more than the rest of preemption).
    heapq.heapify(cands)
    homes: dict[str, dict[str, dict[int, float]]] = {}
    frees: dict[tuple[str, int], list[float]] = {}
    pos: dict[tuple[str, int], int] = {}
    out: list[tuple[float, RequestState, float]] = []
    while cands and len(out) < limit:
        deadline, _rid, r, alone, k = heapq.heappop(cands)
        m = r.spec.model
        key = (m, k)
        fl = frees.get(key)
        if fl is None:
            by_node = homes.get(m)
            if by_node is None:
                by_node = homes[m] = _home_free_times(policy, m, now)
            # No home group of that degree: the first in line starts where a device
            # frees first, the rest are urgent (counting them all on time there cost
            # four-pipelines 300 s 1.5 points: 0.928 -> 0.913).
            fl = frees[key] = _group_free_times(by_node, k) or [max(now, free_any)]
            pos[key] = 0
        j = pos[key]
        start = fl[j] if j < len(fl) else float("inf")
        pos[key] += 1
        if start + alone > deadline:
            out.append((deadline, r, alone))
    return out


def _home_free_times(policy: TridentPolicy, model: str, now: float) -> dict[str, dict[int, float]]:
    """node -> device index -> when it frees, for the model's up diffuse homes."""
    by_node: dict[str, dict[int, float]] = {}
    for d in policy.graph.devices_holding(model, "diffuse"):
        st = policy.devices.get(d)
        if st is not None and st.up:
            by_node.setdefault(st.info.node_id, {})[st.info.index] = max(now, st.busy_until)
    return by_node


def _group_free_times(by_node: dict[str, dict[int, float]], k: int) -> list[float]:
    """When each aligned k-group of ``by_node`` frees (the dispatcher runs degree k on
    such groups only), earliest first."""
    return sorted(max(grp) for idx in by_node.values() for grp in _aligned(idx, k))


def _alone_memoised(policy: TridentPolicy, req: RequestState) -> tuple[float, int]:
    """:func:`_alone_seconds` and the degree it is at, kept per request until its
    pending stages or its diffuse share change (under a 3x overload the filter met
    ~3,000 waiting requests per round: a third of the policy's time went into these
    figures)."""
    memo = policy._alone_memo
    got = memo.get(req.request_id)
    if got is not None and got[0] == req.next_stage and got[1] == req.steps_done:
        return got[2], got[3]
    policy.forget_ended(memo)
    secs, k = _alone_seconds(policy, req)
    memo[req.request_id] = (req.next_stage, req.steps_done, secs, k)
    return secs, k


def _alone_seconds(policy: TridentPolicy, req: RequestState) -> tuple[float, int]:
    """The request's remaining stages alone at its best efficient degree, and that degree."""
    info = policy.models[req.spec.model]
    k = best_degree(
        policy.cost, req.family, req.spec.shape, info.max_degree, policy.config.efficiency
    )
    secs = sum(
        _stage_seconds(policy, req, s, k if s == "diffuse" else 1) for s in req.pending_stages
    )
    return secs, k


# A swap: the victims that pause, R's devices and stages, R's predicted task end.
_Swap = tuple[list[_Victim], tuple[str, ...], tuple[Stage, ...], float]


def _deadline_of(req: RequestState) -> float:
    return req.deadline if req.deadline is not None else float("inf")


def _best_swap(
    policy: TridentPolicy,
    req: RequestState,
    victims: Sequence[_Victim],
    now: float,
    source: Callable[[str, str, Stage], str],
) -> _Swap | None:
    info = policy.models[req.spec.model]
    shape = req.spec.shape
    deadline = _deadline_of(req)
    pending = req.pending_stages
    stages: tuple[Stage, ...] = tuple(pending[: pending.index("diffuse") + 1])
    decode_s = _stage_seconds(policy, req, "decode", 1)
    supported = supported_degrees(policy.cost, req.family, shape, info.max_degree) or (1,)
    best: tuple[float, _Victim, tuple[str, ...], tuple[Stage, ...], float] | None = None
    runs: dict[int, float] = {}
    degree_for: dict[int, int] = {}  # group size -> R's degree there
    for v in victims:
        group = v.group
        # R takes the victim's whole group where its shape supports that degree: the
        # paused devices would idle otherwise, R ends (and the victim resumes) sooner,
        # and the group frees as one, so the victim can resume at its own degree.
        n = len(group)
        k = degree_for.get(n, 0)
        if not k:
            k = degree_for[n] = max((k for k in supported if k <= n and n % k == 0), default=1)
        run = runs.get(k)
        if run is None:
            run = runs[k] = sum(
                _stage_seconds(policy, req, s, k if s == "diffuse" else 1) for s in stages
            )
        if v.rest_s <= run:
            continue  # the victim has less left than the urgent request needs
        # The tests below with no weight load first (the end only grows with one), so
        # most victims are turned down before the memory check (under overload every
        # round met ~50 victims for each of its urgent requests).
        v_deadline = _deadline_of(v.req)
        soonest = now + v.step_s + run
        if soonest + decode_s > deadline or v.end <= v_deadline < soonest + v.rest_s:
            continue
        devices = group[:k]
        if not _fits(policy, req, stages, devices, k):
            continue
        load = max(_load_s(policy, req, stages, d, source) for d in devices)
        end = now + v.step_s + load + run
        if end + decode_s > deadline:
            continue  # no gain: it would be late even so
        if v.end <= v_deadline < end + v.rest_s:
            continue  # the pause would make the victim late
        slack = v_deadline - (end + v.rest_s)
        if best is None or slack > best[0]:
            best = (slack, v, devices, stages, end)
    return None if best is None else ([best[1]], *best[2:])


def _best_group_swap(
    policy: TridentPolicy,
    req: RequestState,
    victims: Sequence[_Victim],
    idle: Sequence[str],
    now: float,
    source: Callable[[str, str, Stage], str],
) -> _Swap | None:
    """R at its best degree k > 1 on an aligned group of k devices made of smaller
    victims' whole groups, where no single victim's group is that large (on cogvideox
    most diffuses run at degree 1: an urgent clip needing 2 or 4 devices found no single
    victim). Devices with no task at all complete such a group too (:func:`_fits`
    counts R's resident weights: without that, an idle leader holding hunyuanvideo's
    encoders ran out of memory, tests/unit/test_shared_cluster.py)."""
    _alone, k = _alone_memoised(policy, req)  # the degree the urgency walk judged it at
    if k <= 1:
        return None
    deadline = _deadline_of(req)
    pending = req.pending_stages
    stages: tuple[Stage, ...] = tuple(pending[: pending.index("diffuse") + 1])
    decode_s = _stage_seconds(policy, req, "decode", 1)
    run = sum(_stage_seconds(policy, req, s, k if s == "diffuse" else 1) for s in stages)
    by_dev: dict[str, _Victim] = {}
    for v in victims:
        if len(v.group) >= k or v.rest_s <= run:
            continue
        v_deadline = _deadline_of(v.req)
        if v.end <= v_deadline < now + v.step_s + run + v.rest_s:
            continue  # the pause would make it late even with no load
        for d in v.group:
            by_dev[d] = v
    if not by_dev:
        return None
    # Devices with no task at all (this round's issues included) complete a group too.
    free = [d for d in idle if not policy.devices[d].inflight and d not in by_dev]
    nodes: dict[str, dict[int, str]] = {}
    for dev_id in [*by_dev, *free]:
        st = policy.devices[dev_id]
        nodes.setdefault(st.info.node_id, {})[st.info.index] = dev_id
    best: tuple[float, list[_Victim], tuple[str, ...], float] | None = None
    for node in sorted({policy.devices[d].info.node_id for d in by_dev}):
        for members in _aligned(nodes[node], k):
            devices = tuple(members)
            paused: list[_Victim] = []
            for d in devices:
                owner = by_dev.get(d)  # None: an idle device
                if owner is not None and owner not in paused:
                    paused.append(owner)
            if not paused or any(d not in devices for v in paused for d in v.group):
                continue
            if not _fits(policy, req, stages, devices, k):
                continue
            load = max(_load_s(policy, req, stages, d, source) for d in devices)
            end = now + max(v.step_s for v in paused) + load + run
            if end + decode_s > deadline:
                continue
            slack = float("inf")
            for v in paused:
                v_deadline = _deadline_of(v.req)
                if v.end <= v_deadline < end + v.rest_s:
                    break
                slack = min(slack, v_deadline - (end + v.rest_s))
            else:
                # Fewest paused first, then the most slack left to them.
                key = slack - 1e6 * len(paused)
                if best is None or key > best[0]:
                    best = (key, paused, devices, end)
    return None if best is None else (best[1], best[2], stages, best[3])


def _load_s(
    policy: TridentPolicy,
    req: RequestState,
    stages: Sequence[Stage],
    dev: str,
    source: Callable[[str, str, Stage], str],
) -> float:
    """Seconds ``dev`` spends loading the weights of ``stages`` it lacks."""
    st = policy.devices[dev]
    return sum(
        policy._load_seconds(req.spec.model, s, source(dev, req.spec.model, s))
        for s in stages
        if (req.spec.model, s) not in st.holds
    )


def _fits(
    policy: TridentPolicy,
    req: RequestState,
    stages: Sequence[Stage],
    devices: Sequence[str],
    k: int,
) -> bool:
    """R's weights and its peak fit beside what each device must keep: resident diffuse
    weights (the paused victim resumes with its own; the device model may evict the
    other stages). Degree k: the other ranks hold diffuse only, as the workers do."""
    info = policy.models[req.spec.model]
    model = req.spec.model
    for rank, dev in enumerate(devices):
        st = policy.devices[dev]
        mine = stages if rank == 0 else tuple(s for s in stages if s == "diffuse")
        # R's own weights whether resident or not: resident ones cannot be evicted for
        # its peak either (an idle leader holding hunyuanvideo's 14 GB encoders ran
        # out of memory in the simulator when only the missing ones were counted).
        need = sum(model_weight_bytes(policy.cost, info, s) for s in mine)
        act = activation_scale(info)
        peak = max(
            int(act * batch_peak_bytes(policy.cost, req.family, s, req.spec.shape, k, 1))
            for s in mine
        )
        keep = sum(
            model_weight_bytes(policy.cost, policy.models[m], s)
            for m, s in st.holds
            if m in policy.models and s == "diffuse" and not (m == model and s in mine)
        )
        if need + peak + keep > st.info.memory_bytes:
            return False
    return True
