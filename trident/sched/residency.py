"""The device model's rules, written once: where a stage's weights load from, and
which stages a full device gives up first.

The scheduler core decides the load source of every load it commands
(:meth:`trident.sched.core.SchedulerCore.load_source`, from these rules and the
residency it learns from ``StageLoaded`` / ``StageUnloaded`` events) and puts it in
the command; the daemon forwards it, a worker loads from there, the simulator charges
that source's load time. Eviction happens on the device (a load that does not fit
makes room there), in the order :func:`eviction_order` gives — the same order in the
simulator (``trident.sim.engine``) and in the runtime's ``sim`` devices
(``trident.runtime.devices.SimExecutor``).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from typing import Literal, TypeAlias, TypeVar

__all__ = ["LOAD_SOURCES", "LoadSource", "choose_load_source", "eviction_order", "victims"]

LoadSource: TypeAlias = Literal["resident", "peer", "node-cache", "disk"]
LOAD_SOURCES: tuple[LoadSource, ...] = ("resident", "peer", "node-cache", "disk")

K = TypeVar("K", bound=Hashable)


def choose_load_source(
    *, resident_here: bool, held_by_same_node_peer: bool, in_node_copy: bool
) -> LoadSource:
    """The fastest place a device can get a stage's weights from: already resident; a
    live device on the same node holding them (a device-to-device copy); the node's
    CPU copy (a stage loaded on that node before: the page cache / pinned host copy);
    else disk (which fills the node's copy for the next one)."""
    if resident_here:
        return "resident"
    if held_by_same_node_peer:
        return "peer"
    if in_node_copy:
        return "node-cache"
    return "disk"


def eviction_order(
    resident: Mapping[K, int], last_use: Mapping[K, float], keep: Collection[K] = ()
) -> list[K]:
    """Resident stages a device may drop, first to go first: least recently used, and
    among equally recent ones the largest (it frees the most for one reload)."""
    return sorted(
        (k for k in resident if k not in keep),
        key=lambda k: (last_use.get(k, float("-inf")), -resident[k], repr(k)),
    )


def victims(
    resident: Mapping[K, int],
    last_use: Mapping[K, float],
    *,
    keep: Collection[K],
    need: int,
    capacity: int,
) -> list[K] | None:
    """The stages to evict, in :func:`eviction_order`, so that ``need`` more bytes fit
    in ``capacity``; [] when they fit already, None when even evicting every stage not
    in ``keep`` would not make room."""
    used = sum(resident.values())
    if used + need <= capacity:
        return []
    out: list[K] = []
    for k in eviction_order(resident, last_use, keep):
        out.append(k)
        used -= resident[k]
        if used + need <= capacity:
            return out
    return None
