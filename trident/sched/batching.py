"""Batching: which waiting requests share one batched call, decided before a dispatch round.

Small images leave a GPU underused: flux's per-step time only doubles from 128^2 to
256^2 for four times the pixels. Running several same-shape requests as one call (one
diffuse over a batch; encode and decode member by member) then serves more requests per
device-second. It costs each member some latency (the call is longer than one request
alone) and exactness (batched outputs match unbatched ones within 1e-4, not bit for bit:
measured up to 3e-5 on the tiny families), so:

- Only requests that allow it (``RequestSpec.batchable``), of image pipelines, with the
  same :func:`batch_key` (model, shape and every param but the per-request ones: prompts
  and seed) and the same next stage (encode or diffuse) batch together.
- Only shapes where batching pays: the batch size is the one with the most requests per
  second of call (:func:`best_batch_size`) and must beat separate calls by
  ``min_gain`` (cost model; for the reference L20 table: flux and sd3 at 256^2 and
  below).
- Only when requests outnumber the devices that could start them now: with ``idle``
  devices free and ``n`` same-key requests waiting, ``n <= idle`` runs them apart (lowest
  latency); otherwise ``max(idle, ceil(n / b))`` calls share them evenly, earliest
  deadlines first.
- As large as the most urgent member's deadline allows: the call, started when the
  first device frees, must end by the earliest deadline among its members. Requests
  late even alone batch fully, but only among themselves (only throughput still helps
  them; an on-time request must not be made late for their sake).

Pure: no clock, no I/O — :func:`form_batches` maps a queue snapshot to a new one.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from trident.families import PER_MEMBER_PARAMS
from trident.sched.cost import batch_peak_bytes, batch_stage_seconds
from trident.sched.dispatcher import QueueItem
from trident.sched.types import STAGES, CostModel, ModelInfo, RequestSpec, Shape, Stage

__all__ = [
    "BatchConfig",
    "batch_key",
    "best_batch_size",
    "form_batches",
]

# Whether these are given changes what encode produces (flux: true CFG): members agree.
_PRESENCE_PARAMS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 4  # requests per call; 1 disables batching
    # A batch must serve this many times the requests per device-second of separate
    # calls (cost model), or it is not worth its members' extra latency.
    min_gain: float = 1.2


def _freeze(value: object) -> Hashable:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Hashable):
        return value
    return repr(value)


def batch_key(spec: RequestSpec, model: ModelInfo | None) -> Hashable | None:
    """What requests must share to run in one call; None when ``spec`` must run alone
    (it forbids batching, or its pipeline makes videos)."""
    if not spec.batchable or model is None or model.is_video:
        return None
    shared = tuple(
        sorted((k, _freeze(v)) for k, v in spec.params.items() if k not in PER_MEMBER_PARAMS)
    )
    given = tuple(spec.params.get(k) is not None for k in _PRESENCE_PARAMS)
    return (spec.model, spec.shape, shared, given)


def best_batch_size(
    cost: CostModel, family: str, shape: Shape, max_batch: int, min_gain: float = 1.2
) -> int:
    """The batch size in ``[1, max_batch]`` serving the most requests per second of call
    (smallest on ties), or 1 when no size beats separate calls by ``min_gain``."""
    t1 = batch_stage_seconds(cost, family, "diffuse", shape, 1, 1)
    if not 0 < t1 < math.inf:
        return 1
    best, best_rate = 1, 1.0 / t1
    for b in range(2, max_batch + 1):
        tb = batch_stage_seconds(cost, family, "diffuse", shape, 1, b)
        if not 0 < tb < math.inf:
            continue
        rate = b / tb
        if rate > best_rate * (1 + 1e-9) and b * t1 / tb >= min_gain - 1e-9:
            best, best_rate = b, rate
    return best


def form_batches(
    items: Sequence[QueueItem],
    keys: Mapping[str, Hashable | None],
    idle: Mapping[str, int],
    cost: CostModel,
    config: BatchConfig,
    now: float,
    free_at: Mapping[str, float] | None = None,
    room_bytes: Mapping[str, int] | None = None,
) -> list[QueueItem]:
    """The queue with some same-key requests merged into batch items.

    ``keys``: request id -> :func:`batch_key` (absent or None: never batched).
    ``idle``: model -> devices holding its diffuse stage that could start a task now.
    ``free_at``: model -> when the first of those devices frees up (default ``now``):
    when a batch would start.
    ``room_bytes``: model -> the most free memory of a device holding its diffuse
    stage; a batch is never bigger than its peak activation fits there (a batch no
    device can run would wait forever).
    Returns singles unchanged and one item per batch (``members`` set, ``max_degree``
    1, deadline and arrival the earliest member's), in the input's order.
    """
    if config.max_batch < 2:
        return list(items)
    groups: dict[tuple[Hashable, str], list[QueueItem]] = {}
    for it in items:
        key = keys.get(it.request_id)
        if key is None or it.next_stage not in ("encode", "diffuse") or it.members:
            continue
        groups.setdefault((key, it.next_stage), []).append(it)
    free = dict(idle)
    standalone = _Standalone(cost)
    merged: dict[str, QueueItem] = {}  # first member's id -> batch item
    absorbed: set[str] = set()
    order = sorted(
        (g for g in groups.values() if len(g) > 1),
        key=lambda g: min((i.deadline, i.arrival, i.request_id) for i in g),
    )
    for group in order:
        head = group[0]
        b_max = best_batch_size(cost, head.family, head.shape, config.max_batch, config.min_gain)
        if room_bytes is not None and head.model in room_bytes:
            b_max = _fitting_size(cost, head, b_max, room_bytes[head.model])
        n = len(group)
        room = free.get(head.model, 0)
        if b_max < 2 or n <= room:
            free[head.model] = max(0, room - n)
            continue
        free[head.model] = 0  # n > room: this group takes every free device
        start = now if room > 0 else max(now, (free_at or {}).get(head.model, now))
        ordered = sorted(group, key=lambda i: (i.deadline, i.arrival, i.request_id))
        # Requests late even alone batch only among themselves: a batch must not make
        # an on-time request late for the sake of one that is late anyway.
        alone = standalone(head, 1)  # same shape and stage: same for all
        late = [i for i in ordered if start + alone > i.deadline + 1e-9]
        on_time = [i for i in ordered if start + alone <= i.deadline + 1e-9]
        chunks: list[list[QueueItem]] = []
        for rest in (on_time, late):  # on-time ones first to the free devices
            calls = max(math.ceil(len(rest) / b_max), min(room, len(rest)))
            room = max(0, room - calls)
            while rest:
                cap = min(b_max, math.ceil(len(rest) / max(1, calls)))  # spread over calls
                size = _slack_size(standalone, rest[0], start, cap)
                chunks.append(rest[:size])
                rest = rest[size:]
                calls -= 1
        for members in chunks:
            if len(members) < 2:
                continue
            first = members[0]
            merged[first.request_id] = replace(
                first,
                deadline=min(m.deadline for m in members),
                arrival=min(m.arrival for m in members),
                max_degree=1,
                members=tuple(m.request_id for m in members),
            )
            absorbed.update(m.request_id for m in members)
    out: list[QueueItem] = []
    for it in items:
        if it.request_id in merged:
            out.append(merged[it.request_id])
        elif it.request_id not in absorbed:
            out.append(it)
    return out


def _fitting_size(cost: CostModel, head: QueueItem, b_max: int, room: int) -> int:
    """The largest batch size up to ``b_max`` whose stages' peak activation fits ``room``
    bytes (1 when even a pair does not)."""
    stages: tuple[Stage, ...] = STAGES if head.next_stage == "encode" else STAGES[1:]
    for b in range(b_max, 1, -1):
        peak = max(
            head.bytes_scale * batch_peak_bytes(cost, head.family, s, head.shape, 1, b)
            for s in stages
        )
        if peak <= room:
            return b
    return 1


def _slack_size(standalone: _Standalone, urgent: QueueItem, start: float, cap: int) -> int:
    """How many requests may share a call with ``urgent`` (the group's earliest deadline,
    members after it have later ones): the largest size up to ``cap`` whose call, begun
    at ``start``, still ends by its deadline; 1 (alone) when only that does; ``cap``
    when it is late even alone — then serving more requests per second is all that
    batching can still do for the queue behind it."""
    if start + standalone(urgent, 1) > urgent.deadline + 1e-9:
        return cap
    size = 1
    for b in range(2, cap + 1):
        if start + standalone(urgent, b) <= urgent.deadline + 1e-9:
            size = b
    return size


def _chunks(seq: Sequence[QueueItem], size: int) -> Iterable[list[QueueItem]]:
    for i in range(0, len(seq), size):
        yield list(seq[i : i + size])


class _Standalone:
    """Seconds of the rest of an item's stages in a call of ``batch`` requests, at degree
    1, without queueing or transfers — memoised for one :func:`form_batches` call (the
    queue repeats a few shapes many times)."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.memo: dict[tuple[str, Shape, str, int], float] = {}

    def __call__(self, item: QueueItem, batch: int) -> float:
        key = (item.family, item.shape, item.next_stage, batch)
        got = self.memo.get(key)
        if got is None:
            stages: tuple[Stage, ...] = STAGES if item.next_stage == "encode" else STAGES[1:]
            got = self.memo[key] = sum(
                (
                    batch_stage_seconds(self.cost, item.family, s, item.shape, 1, batch)
                    for s in stages
                ),
                0.0,
            )
        return got
