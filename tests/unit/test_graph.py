"""Cluster graph: membership, aligned instances, links, placement."""

from __future__ import annotations

import pytest

from trident.sched.graph import ClusterGraph, placement_type, stages_of_type
from trident.sched.types import DeviceInfo

pytestmark = pytest.mark.timeout(20)


def _g() -> ClusterGraph:
    g = ClusterGraph(intra_node_bw=20.0, inter_node_bw=10.0)
    for n in range(2):
        for i in range(8):
            g.add_device(DeviceInfo(f"n{n}/sim:{i}", f"n{n}", "sim", i, 100))
    return g


def test_aligned_instances() -> None:
    g = _g()
    assert len(g.instances(1)) == 16
    assert g.instances(2, "n0")[1] == ("n0/sim:2", "n0/sim:3")
    assert len(g.instances(4)) == 4 and len(g.instances(8)) == 2
    g.set_up("n0/sim:5", False)
    assert ("n0/sim:4", "n0/sim:5", "n0/sim:6", "n0/sim:7") not in g.instances(4)
    assert len(g.instances(8)) == 1
    g.set_up("n0/sim:5", True)  # a restarted worker re-forms the same groups
    assert len(g.instances(8)) == 2


def test_links_and_placement() -> None:
    g = _g()
    assert g.bandwidth("n0/sim:0", "n0/sim:1") == 20.0
    assert g.bandwidth("n0/sim:0", "n1/sim:1") == 10.0
    assert g.same_node("n0/sim:0", "n0/sim:7") and not g.same_node("n0/sim:0", "n1/sim:0")
    g.set_placement("n0/sim:0", "flux", stages_of_type("DC"))
    assert g.placement_type("n0/sim:0", "flux") == "DC"
    assert g.holds("n0/sim:0", "flux", "decode") and not g.holds("n0/sim:0", "flux", "encode")
    assert g.devices_holding("flux", "diffuse") == ["n0/sim:0"]
    assert g.weights_bytes("n0/sim:0", {("flux", "diffuse"): 5, ("flux", "decode"): 1}) == 6
    assert placement_type(["decode", "encode", "diffuse"]) == "EDC"
    # re-adding a device (restart) keeps its plan
    g.add_device(g.info("n0/sim:0"))
    assert g.placement_type("n0/sim:0", "flux") == "DC"


def test_version_bumps_on_every_change_callers_cache_on() -> None:
    g = _g()
    d = g.devices()[0].device_id
    seen = [g.version]
    g.set_placement(d, "flux", {"diffuse"})
    seen.append(g.version)
    g.clear_placement(d)
    seen.append(g.version)
    g.set_up(d, False)
    seen.append(g.version)
    g.remove_device(d)
    seen.append(g.version)
    assert seen == sorted(set(seen))  # strictly increasing
    v = g.version
    g.placement(g.devices()[0].device_id)  # reads do not bump
    g.instances(2)
    assert g.version == v
