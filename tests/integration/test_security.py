"""CurveZMQ with roles: client keys open the client socket only; cluster keys the
node socket and the workers' data sockets. A refused client fails fast and typed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from tests.integration.conftest import read_log, read_log_until
from trident import Client
from trident.bench.chaos import worker_peer_addrs
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.errors import AuthenticationError, ConnectionError
from trident.runtime import protocol
from trident.runtime.security import client_keys, generate_keys
from trident.runtime.transport import make_socket

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def curve_cluster(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalCluster, Path]:
    base = tmp_path_factory.mktemp("curve")
    # "client" is the harness's own readiness client (it reads the top directory).
    keys = generate_keys(base / "keys", ("client", "alice", "mallory"))
    cluster = LocalCluster(
        ["flux"],
        [NodeSpec("sim:2", node_id="a", time_scale=0.001)],
        log_dir=base / "logs",
        curve_dir=keys,
    )
    with cluster:
        yield cluster, keys


def test_authorized_client_is_served(curve_cluster: tuple[LocalCluster, Path]) -> None:
    cluster, keys = curve_cluster
    with Client(
        cluster.client_addr,
        timeout=30,
        curve_dir=str(keys / "clients" / "alice"),
        curve_name="alice",
    ) as c:
        r = c.generate(
            model="flux", prompt="secret fox", height=256, width=256, num_inference_steps=2
        )
        assert r.array.shape[-1] == 3
        assert len(r.devices["diffuse"]) >= 1  # workers joined through CURVE too


def test_keyless_and_unauthorized_clients_fail_fast_and_typed(
    curve_cluster: tuple[LocalCluster, Path], tmp_path: Path
) -> None:
    cluster, keys = curve_cluster
    t0 = time.monotonic()
    with Client(cluster.client_addr, connect_timeout=2.0) as plain, pytest.raises(ConnectionError):
        plain.generate(model="flux", prompt="x", height=256, width=256)
    assert time.monotonic() - t0 < 10
    # a valid key pair of its own that nobody authorized, with the right cluster key
    stranger = generate_keys(tmp_path / "stranger")
    (stranger / "clients" / "client" / "cluster.key").write_bytes(
        (keys / "cluster" / "cluster.key").read_bytes()
    )
    t0 = time.monotonic()
    with (
        Client(
            cluster.client_addr, connect_timeout=5.0, curve_dir=str(stranger / "clients" / "client")
        ) as c,
        pytest.raises(AuthenticationError, match="not authorized"),
    ):
        c.ping()
    assert time.monotonic() - t0 < 5
    assert cluster.log_file is not None
    lines = read_log_until(
        cluster.log_file, lambda ls: any(e.get("event") == "auth.denied" for e in ls)
    )
    denied = [e for e in lines if e.get("event") == "auth.denied"]
    assert denied and denied[-1]["domain"] == "client" and denied[-1]["key_id"]


def test_a_client_key_cannot_join_the_cluster_or_read_stage_outputs(
    curve_cluster: tuple[LocalCluster, Path],
) -> None:
    """The attack that used to work: a user's key registering a fake worker."""
    cluster, keys = curve_cluster
    assert cluster.log_file is not None
    mallory = client_keys(keys / "clients" / "mallory", "mallory")
    ctx = zmq.Context()
    try:
        fake = make_socket(ctx, zmq.DEALER, identity=b"dev:evil/sim:0", curve=mallory)
        fake.connect(cluster.node_addr)
        fake.send_multipart(
            [
                protocol.encode(
                    protocol.WorkerHello(
                        version=protocol.PROTOCOL_VERSION,
                        device_id="evil/sim:0",
                        node_id="evil",
                        index=0,
                        kind="sim",
                        memory_bytes=1 << 30,
                        peer_addr="tcp://127.0.0.1:1",
                        pid=1,
                    )
                )
            ]
        )
        node = make_socket(ctx, zmq.DEALER, identity=b"node:evil", curve=mallory)
        node.connect(cluster.node_addr)
        node.send_multipart(
            [
                protocol.encode(
                    protocol.NodeHello(
                        version=protocol.PROTOCOL_VERSION,
                        node_id="evil",
                        devices=[protocol.NodeDevice(index=0, kind="sim", memory_bytes=1 << 30)],
                    )
                )
            ]
        )
        [peer, *_] = worker_peer_addrs(cluster)
        fetcher = make_socket(ctx, zmq.DEALER, curve=mallory)
        fetcher.connect(peer)
        fetcher.send_multipart([protocol.encode(protocol.Fetch(key="anything", rid="1"))])
        # while they wait, real users are served, and no task reaches the fakes
        with Client(
            cluster.client_addr,
            timeout=30,
            curve_dir=str(keys / "clients" / "alice"),
            curve_name="alice",
        ) as c:
            for i in range(6):
                c.generate(
                    model="flux",
                    prompt=f"private prompt {i}",
                    height=256,
                    width=256,
                    num_inference_steps=2,
                )
            devices = c.ping()["devices"]
        assert not any(d.startswith("evil") for d in devices)
        for sock in (fake, node, fetcher):
            assert not sock.poll(500), "a client key got an answer from a cluster socket"
    finally:
        ctx.destroy(0)
    lines = read_log(cluster.log_file)
    domains = {e.get("domain") for e in lines if e.get("event") == "auth.denied"}
    assert "cluster" in domains
    assert not any(
        e.get("event") == "worker.joined" and "evil" in str(e.get("device_id")) for e in lines
    )
    assert not any(
        e.get("event") == "stage.dispatched" and "evil" in str(e.get("devices")) for e in lines
    )
