"""deploy/k8s: every manifest is valid Kubernetes (kubernetes-validate's bundled
schemas, offline), and the metrics scraping adds up: annotations name declared ports,
the scheduler serves metrics on its declared port, the ServiceMonitors select Services
with the ports they name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
# Custom resources: no schema in kubernetes-validate; checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


def test_the_manifests_are_there() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in documents()}
    assert ("Deployment", "trident-scheduler") in kinds
    assert ("Deployment", "trident-gateway") in kinds
    assert ("DaemonSet", "trident-node") in kinds
    assert ("ServiceMonitor", "trident-scheduler") in kinds


@pytest.mark.parametrize(
    ("file", "doc"),
    [(f, d) for f, d in documents() if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS],
    ids=lambda x: x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}",
)
def test_every_builtin_resource_is_valid_kubernetes(file: str, doc: dict[str, Any]) -> None:
    # strict: an unknown field (a typo) is an error too
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_does_catch_mistakes() -> None:
    bad = dict(by_kind("Service")["trident-scheduler"])
    bad["spec"] = {**bad["spec"], "ports": [{"name": "metrics", "port": "nine"}]}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    typo = {**bad, "spec": {"selectr": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def container_ports(deployment: dict[str, Any]) -> dict[str, int]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", [])}


@pytest.mark.parametrize("name", ["trident-scheduler", "trident-gateway"])
def test_pods_are_annotated_for_scraping_on_a_declared_port(name: str) -> None:
    dep = by_kind("Deployment")[name]
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) in container_ports(dep).values()


def test_the_scheduler_serves_metrics_on_its_metrics_port() -> None:
    dep = by_kind("Deployment")["trident-scheduler"]
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    addr = command[command.index("--metrics-addr") + 1]
    assert int(addr.rpartition(":")[2]) == container_ports(dep)["metrics"]
    gateway = by_kind("Deployment")["trident-gateway"]["spec"]["template"]["spec"]
    g_command = gateway["containers"][0]["command"]
    http_addr = g_command[g_command.index("--http-addr") + 1]
    assert (
        int(http_addr.rpartition(":")[2])
        == container_ports(by_kind("Deployment")["trident-gateway"])["http"]
    )


def test_service_monitors_select_services_with_the_ports_they_name() -> None:
    services = by_kind("Service")
    deployments = by_kind("Deployment")
    monitors = by_kind("ServiceMonitor")
    assert monitors
    for name, mon in monitors.items():
        selector = mon["spec"]["selector"]["matchLabels"]
        matched = [
            s
            for s in services.values()
            if selector.items() <= s["metadata"].get("labels", {}).items()
        ]
        assert len(matched) == 1, f"{name}: selects {len(matched)} services"
        svc = matched[0]
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        pods = [
            d
            for d in deployments.values()
            if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1
        for ep in mon["spec"]["endpoints"]:
            assert ep["port"] in svc_ports, f"{name}: no service port {ep['port']!r}"
            assert ep["path"] == "/metrics"
            target = svc_ports[ep["port"]].get("targetPort", svc_ports[ep["port"]]["port"])
            declared = container_ports(pods[0])
            assert target in declared or target in declared.values()
