"""Every error class's HTTP status and OpenAI body, through real processes: a gateway
holding a CurveZMQ client key, in front of a Curve cluster with a small intake
(``--max-queue 2``) and one 40 GB simulated GPU (so a 2048x2048 flux cannot run)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import GatewayProc, openai_client
from trident.bench.cluster import LocalCluster, NodeSpec, free_port
from trident.runtime.security import generate_keys

pytestmark = pytest.mark.timeout(90)

SCALE = 0.05  # flux 1024x1024, 30 steps: ~1.3 s of diffuse


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = generate_keys(tmp_path_factory.mktemp("keys") / "keys", ("client", "gateway", "mallory"))
    (d / "clients" / "authorized" / "mallory.key").unlink()  # revoked
    return d


@pytest.fixture(scope="module")
def cluster(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(
        ["flux"],
        [NodeSpec("sim:1", node_id="a", time_scale=SCALE, sim_memory_gb=40)],
        log_dir=tmp_path_factory.mktemp("cluster"),
        curve_dir=keys,
        scheduler_args=["--max-queue", "2"],
    ) as c:
        yield c


@pytest.fixture(scope="module")
def gw(
    cluster: LocalCluster, keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    state = tmp_path_factory.mktemp("gateway")
    curve = ["--curve-dir", str(keys / "clients" / "gateway")]
    with GatewayProc(cluster.client_addr, state, *curve, "--max-body-bytes", "65536") as g:
        yield g


def _error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def _image(gw: GatewayProc, **body: Any) -> httpx.Response:
    body.setdefault("prompt", "a cat")
    return httpx.post(f"{gw.url}/v1/images/generations", json=body, timeout=60)


def test_400_names_the_parameter(gw: GatewayProc) -> None:
    for body, param in (
        ({"model": "flux", "size": "1000x1000"}, "size"),
        ({"model": "flux", "size": "big"}, "size"),
        ({"model": "flux", "n": 11}, "n"),
        ({"model": "flux", "num_inference_step": 2}, "num_inference_step"),
        ({"model": "flux", "guidance_scale": -1}, "guidance_scale"),
        ({"model": "flux", "num_inference_steps": 5000}, "num_inference_steps"),
        ({"model": "flux", "output_format": "gif"}, "output_format"),
        ({"model": "flux", "prompt": ""}, "prompt"),
    ):
        err = _error(_image(gw, **body), 400, "invalid_request", param)
        assert err["type"] == "invalid_request_error"
    r = httpx.post(
        f"{gw.url}/v1/images/generations",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    _error(r, 400, "invalid_request")
    r = httpx.get(f"{gw.url}/v1/videos", params={"limit": 0})
    _error(r, 400, "invalid_request", "limit")
    r = httpx.get(f"{gw.url}/v1/videos", params={"after": "video_nope"})
    _error(r, 400, "invalid_request", "after")


def test_the_openai_client_raises_its_typed_errors(gw: GatewayProc) -> None:
    import openai

    client = openai_client(gw)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="flux", prompt="x", size="17x17")
    assert bad.value.param == "size" and bad.value.code == "invalid_request"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="nope", prompt="x")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


def test_404_unknown_model_job_and_route(gw: GatewayProc) -> None:
    _error(_image(gw, model="sdxl"), 404, "model_not_found", "model")
    _error(httpx.get(f"{gw.url}/v1/videos/video_missing"), 404, "not_found")
    _error(httpx.delete(f"{gw.url}/v1/videos/video_missing"), 404, "not_found")
    _error(httpx.get(f"{gw.url}/v1/videos/video_missing/content"), 404, "not_found")
    _error(httpx.get(f"{gw.url}/v1/images/img_missing/content"), 404, "not_found")
    _error(httpx.get(f"{gw.url}/v1/models/nope"), 404, "model_not_found")
    _error(httpx.get(f"{gw.url}/v1/nothing"), 404, "not_found")
    # a video endpoint asked for an image model
    r = httpx.post(f"{gw.url}/v1/videos", json={"model": "flux", "prompt": "x"})
    _error(r, 400, "invalid_request", "model")


def test_413_body_over_the_limit(gw: GatewayProc) -> None:
    big = json.dumps({"model": "flux", "prompt": "x" * 100_000})
    r = httpx.post(
        f"{gw.url}/v1/images/generations",
        content=big,
        headers={"content-type": "application/json"},
    )
    _error(r, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "flux", "prompt": "'
        for _ in range(10):
            yield b"y" * 10_000
        yield b'"}'

    r = httpx.post(
        f"{gw.url}/v1/images/generations",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    _error(r, 413, "request_too_large")


def test_429_when_the_scheduler_is_full(gw: GatewayProc) -> None:
    # n=3 long images on a scheduler taking 2 requests: the third member is refused at
    # once, and the whole request is answered 429 (its other members cancelled).
    r = _image(gw, model="flux", n=3, size="1024x1024", num_inference_steps=30)
    err = _error(r, 429, "overloaded")
    assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"


def test_500_when_the_stage_fails(gw: GatewayProc) -> None:
    r = _image(gw, model="flux", size="2048x2048", num_inference_steps=2)
    err = _error(r, 500, "stage_failed")
    assert err["type"] == "server_error" and "diffuse" in err["message"]


def test_504_on_the_gateway_time_limit(
    cluster: LocalCluster, keys: Path, gateway_factory: Any
) -> None:
    slow = gateway_factory(
        cluster.client_addr,
        "--curve-dir",
        str(keys / "clients" / "gateway"),
        "--request-timeout-s",
        "0.3",
    )
    r = _image(slow, model="flux", size="1024x1024", num_inference_steps=30)
    _error(r, 504, "timeout")


def test_503_scheduler_unreachable_or_key_refused(
    cluster: LocalCluster, keys: Path, gateway_factory: Any
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    nowhere = gateway_factory(dead, "--connect-timeout-s", "1")
    r = _image(nowhere, model="flux")
    err = _error(r, 503, "unavailable")
    assert r.headers["retry-after"] == "1" and err["type"] == "server_error"
    assert httpx.get(f"{nowhere.url}/ready").status_code == 503
    assert httpx.get(f"{nowhere.url}/health").status_code == 200
    refused = gateway_factory(
        cluster.client_addr,
        "--curve-dir",
        str(keys / "clients" / "mallory"),
        "--connect-timeout-s",
        "2",
    )
    _error(_image(refused, model="flux"), 503, "unavailable")


def test_a_gateway_port_in_use_fails_to_start(cluster: LocalCluster, tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        gw = GatewayProc(cluster.client_addr, tmp_path / "s", port=port)
        with pytest.raises(RuntimeError, match="exited"):
            gw.start(timeout=20)


def test_image_request_cancelled_when_the_http_client_leaves(
    gw: GatewayProc, cluster: LocalCluster
) -> None:
    from tests.integration.conftest import read_log_until

    async def leave() -> None:
        async with httpx.AsyncClient(timeout=0.5) as h:
            with pytest.raises(httpx.ReadTimeout):
                await h.post(
                    f"{gw.url}/v1/images/generations",
                    json={"model": "flux", "prompt": "abandoned", "size": "1024x1024"}
                    | {"num_inference_steps": 40},
                )

    asyncio.run(leave())
    assert cluster.log_file is not None
    lines = read_log_until(
        cluster.log_file,
        lambda ls: any(
            e.get("event") == "request.cancel" and e.get("reason") == "client" for e in ls
        ),
        timeout=10,
    )
    assert any(e.get("event") == "request.cancel" for e in lines)
