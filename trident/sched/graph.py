"""The cluster as a networkx graph: nodes, devices, placement, instances and links.

Vertices are ``("node", node_id)`` and ``("dev", device_id)``. A device hangs off its
node by a ``member`` edge; devices of one node are joined pairwise by ``intra`` links
(intra-node bandwidth); nodes are joined pairwise by ``inter`` links (inter-node
bandwidth). Device vertices carry ``info`` (:class:`DeviceInfo`), ``up`` and
``placement`` (model -> frozenset of stages held under the current *plan*).

Instances: a degree-k group is an *aligned* run of a node's device indices
``[j*k, (j+1)*k)`` (pairs, quads, eights), all present and up — so the number of
communicator groups stays small and matches the NVLink/PCIe switch topology. After a
worker restarts it comes back with the same index and its groups are re-formed from
the same alignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import networkx as nx

from trident.sched.types import STAGES, DeviceInfo, Stage

__all__ = [
    "PLACEMENT_TYPES",
    "ClusterGraph",
    "placement_type",
    "stages_of_type",
]

_LETTER: dict[str, str] = {"encode": "E", "diffuse": "D", "decode": "C"}
# Primary types hold diffuse; auxiliary types hold only encode or decode.
PLACEMENT_TYPES: tuple[str, ...] = ("EDC", "DC", "ED", "D", "E", "C")


def placement_type(stages: Iterable[str]) -> str:
    """``{"encode", "diffuse"} -> "ED"``; empty -> ``""``."""
    held = set(stages)
    return "".join(_LETTER[s] for s in STAGES if s in held)


def stages_of_type(ptype: str) -> frozenset[Stage]:
    """``"DC" -> {"diffuse", "decode"}``."""
    inv = {v: k for k, v in _LETTER.items()}
    return frozenset(inv[c] for c in ptype)  # type: ignore[misc]


class ClusterGraph:
    """Cluster state the planner works on. Pure data; no I/O."""

    def __init__(self, intra_node_bw: float = 20e9, inter_node_bw: float = 10e9) -> None:
        self.g: nx.Graph = nx.Graph()
        # Bumped by every change of membership, up state or placement: callers cache
        # derived structures (aligned groups, holders) keyed by it.
        self.version = 0
        # devices_holding's answers, valid while the version is _holding_version.
        self._holding: dict[tuple[str, Stage, bool], list[str]] = {}
        self._holding_version = -1
        self.intra_node_bw = intra_node_bw
        self.inter_node_bw = inter_node_bw

    # ------------------------------------------------------------------ membership

    def add_device(self, info: DeviceInfo) -> None:
        self.version += 1
        node_v = ("node", info.node_id)
        if node_v not in self.g:
            self.g.add_node(node_v, kind="node")
            for other in self.node_ids():
                if other != info.node_id:
                    self.g.add_edge(node_v, ("node", other), kind="inter", bw=self.inter_node_bw)
        dev_v = ("dev", info.device_id)
        old = self.g.nodes[dev_v]["placement"] if dev_v in self.g else {}
        self.g.add_node(dev_v, kind="dev", info=info, up=True, placement=dict(old))
        self.g.add_edge(node_v, dev_v, kind="member")
        for peer in self.node_devices(info.node_id, up_only=False):
            if peer.device_id != info.device_id:
                self.g.add_edge(dev_v, ("dev", peer.device_id), kind="intra", bw=self.intra_node_bw)

    def set_up(self, device_id: str, up: bool) -> None:
        self.version += 1
        self.g.nodes[("dev", device_id)]["up"] = up

    def remove_device(self, device_id: str) -> None:
        self.version += 1
        self.g.remove_node(("dev", device_id))

    def node_ids(self) -> list[str]:
        return sorted(v[1] for v, d in self.g.nodes(data=True) if d["kind"] == "node")

    def __contains__(self, device_id: object) -> bool:
        return ("dev", device_id) in self.g

    def info(self, device_id: str) -> DeviceInfo:
        info: DeviceInfo = self.g.nodes[("dev", device_id)]["info"]
        return info

    def is_up(self, device_id: str) -> bool:
        v = ("dev", device_id)
        return v in self.g and bool(self.g.nodes[v]["up"])

    def devices(self, up_only: bool = True) -> list[DeviceInfo]:
        out = [
            d["info"]
            for v, d in self.g.nodes(data=True)
            if d["kind"] == "dev" and (d["up"] or not up_only)
        ]
        return sorted(out, key=lambda i: (i.node_id, i.index, i.device_id))

    def node_devices(self, node_id: str, up_only: bool = True) -> list[DeviceInfo]:
        node_v = ("node", node_id)
        if node_v not in self.g:
            return []
        out = [
            self.g.nodes[v]["info"]
            for v in self.g.neighbors(node_v)
            if v[0] == "dev" and (self.g.nodes[v]["up"] or not up_only)
        ]
        return sorted(out, key=lambda i: (i.index, i.device_id))

    # ------------------------------------------------------------------ links

    def same_node(self, a: str, b: str) -> bool:
        return self.info(a).node_id == self.info(b).node_id

    def bandwidth(self, a: str, b: str) -> float:
        """Bytes/s between two devices (infinite for the same device)."""
        if a == b:
            return float("inf")
        if self.g.has_edge(("dev", a), ("dev", b)):
            return float(self.g.edges[("dev", a), ("dev", b)]["bw"])
        na, nb = ("node", self.info(a).node_id), ("node", self.info(b).node_id)
        if self.g.has_edge(na, nb):
            return float(self.g.edges[na, nb]["bw"])
        return self.inter_node_bw

    # ------------------------------------------------------------------ instances

    def instances(self, k: int, node_id: str | None = None) -> list[tuple[str, ...]]:
        """Aligned degree-``k`` groups of up devices (leader = lowest index first)."""
        nodes = [node_id] if node_id is not None else self.node_ids()
        out: list[tuple[str, ...]] = []
        for n in nodes:
            by_index = {d.index: d for d in self.node_devices(n)}
            if not by_index:
                continue
            top = max(by_index)
            for j in range(top // k + 1):
                idx = range(j * k, (j + 1) * k)
                if all(i in by_index for i in idx):
                    out.append(tuple(by_index[i].device_id for i in idx))
        return out

    def iter_groups(self, degrees: Iterable[int]) -> Iterator[tuple[int, tuple[str, ...]]]:
        for k in degrees:
            for grp in self.instances(k):
                yield k, grp

    # ------------------------------------------------------------------ placement

    def placement(self, device_id: str) -> Mapping[str, frozenset[Stage]]:
        pl: Mapping[str, frozenset[Stage]] = self.g.nodes[("dev", device_id)]["placement"]
        return pl

    def set_placement(self, device_id: str, model: str, stages: Iterable[Stage]) -> None:
        self.version += 1
        pl = self.g.nodes[("dev", device_id)]["placement"]
        st = frozenset(stages)
        if st:
            pl[model] = st
        else:
            pl.pop(model, None)

    def clear_placement(self, device_id: str) -> None:
        self.version += 1
        self.g.nodes[("dev", device_id)]["placement"] = {}

    def holds(self, device_id: str, model: str, stage: Stage) -> bool:
        return stage in self.placement(device_id).get(model, frozenset())

    def placement_type(self, device_id: str, model: str) -> str:
        return placement_type(self.placement(device_id).get(model, frozenset()))

    def devices_holding(self, model: str, stage: Stage, up_only: bool = True) -> list[str]:
        key = (model, stage, up_only)
        memo = self._holding
        if self._holding_version != self.version:
            memo.clear()
            self._holding_version = self.version
        got = memo.get(key)
        if got is None:
            got = memo[key] = [
                d.device_id for d in self.devices(up_only) if self.holds(d.device_id, model, stage)
            ]
        return list(got)  # a copy: callers may change theirs

    def plan(self) -> dict[str, dict[str, frozenset[Stage]]]:
        """device -> model -> stages (a copy)."""
        return {d.device_id: dict(self.placement(d.device_id)) for d in self.devices(False)}

    def weights_bytes(self, device_id: str, weight_of: Mapping[tuple[str, str], int]) -> int:
        """Bytes of the weights the device's plan puts on it; ``weight_of[(model, stage)]``."""
        return sum(
            weight_of.get((m, s), 0)
            for m, stages in self.placement(device_id).items()
            for s in stages
        )
