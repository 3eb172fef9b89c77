"""CurveZMQ: with keys configured, only authorized clients are served."""

from __future__ import annotations

import pytest

from trident import Client
from trident.errors import RequestTimeoutError
from trident.runtime.cluster import LocalCluster, NodeSpec
from trident.runtime.security import generate_keys

pytestmark = pytest.mark.timeout(90)


def test_authorized_client_is_served_and_a_keyless_one_is_not(tmp_path) -> None:
    keys = generate_keys(tmp_path / "keys")
    stranger = generate_keys(tmp_path / "stranger")  # a valid key pair nobody authorized
    cluster = LocalCluster(["flux"], [NodeSpec("sim:2", time_scale=0.001)], log_dir=tmp_path / "logs", curve_dir=keys)
    with cluster:
        with Client(cluster.client_addr, timeout=30, curve_dir=str(keys)) as c:
            r = c.generate(model="flux", prompt="secret fox", height=256, width=256, num_inference_steps=2)
            assert r.array.shape[-1] == 3
            assert len(r.devices["diffuse"]) >= 1  # workers joined through CURVE too
        with Client(cluster.client_addr) as plain, pytest.raises(RequestTimeoutError):
            plain.ping(timeout=2.0)
        # a client with a valid key pair of its own that nobody authorized
        (stranger / "cluster.key_secret").unlink()
        (stranger / "cluster.key").write_bytes((keys / "cluster.key").read_bytes())
        with Client(cluster.client_addr, curve_dir=str(stranger)) as intruder, pytest.raises(RequestTimeoutError):
            intruder.ping(timeout=2.0)
