"""The gateway through the official ``openai`` client and curl: images (b64_json, url),
video jobs (create, retrieve with real progress, list, download, delete), models and
health; and the SDK's progress (``on_progress``, ``generate_events``). Real processes:
gateway + scheduler + node with simulated GPUs (pixels don't matter here)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest
from PIL import Image

from tests.gateway.conftest import GatewayProc, openai_client, wait_job
from trident import AsyncClient, Client
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.client import GenerateResult, ProgressEvent

pytestmark = pytest.mark.timeout(90)

SCALE = 0.02  # wan 480x832x33: ~0.2 s per denoising step


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(
        ["flux", "wan=sim:wan"],
        [NodeSpec("sim:2", node_id="a", time_scale=SCALE)],
        log_dir=tmp_path_factory.mktemp("cluster"),
    ) as c:
        yield c


@pytest.fixture(scope="module")
def gw(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    with GatewayProc(cluster.client_addr, tmp_path_factory.mktemp("gateway")) as g:
        yield g


def test_images_b64_json_with_n_and_seeds(gw: GatewayProc) -> None:
    client = openai_client(gw)
    r = client.images.generate(
        model="flux",
        prompt="a red fox in fresh snow",
        n=2,
        size="512x256",
        extra_body={"num_inference_steps": 2, "seed": 7, "negative_prompt": "blurry"},
    )
    assert len(r.data) == 2 and r.created > 0 and r.size == "512x256"
    for item in r.data:
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert img.format == "PNG"
    extra = r.model_extra["trident"]
    assert extra["seeds"] == [7, 8]  # member i gets seed + i
    assert len(extra["timings"]) == 2 and all("total" in t for t in extra["timings"])
    assert all(set(d) == {"encode", "diffuse", "decode"} for d in extra["devices"])


def test_images_url_points_at_this_gateway(gw: GatewayProc) -> None:
    client = openai_client(gw)
    r = client.images.generate(
        model="flux",
        prompt="a lighthouse",
        response_format="url",
        output_format="jpeg",
        size="256x256",
        extra_body={"num_inference_steps": 2},
    )
    url = r.data[0].url
    assert url.startswith(f"{gw.url}/v1/images/") and url.endswith("/content")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(got.content)).format == "JPEG"


def test_video_job_through_the_openai_client(gw: GatewayProc, tmp_path: Path) -> None:
    client = openai_client(gw)
    video = client.videos.create(
        model="wan",
        prompt="waves breaking over black sand",
        size="832x480",
        seconds="2",
        extra_body={"num_inference_steps": 12},
    )
    assert video.object == "video" and video.status == "queued" and video.progress == 0
    assert video.size == "832x480" and video.model == "wan"
    # 2 s at wan's 16 fps is 32 frames: rounded to 33 (1 + 4k), and said so
    assert video.model_extra["trident"]["num_frames"] == 33
    assert "rounded to 33" in video.model_extra["trident"]["note"]
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while video.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
        video = client.videos.retrieve(video.id)
        seen.append(video.progress)
    assert video.status == "completed" and video.progress == 100, video
    steps = [p for p in seen if 0 < p < 100]
    assert steps and steps == sorted(steps), seen  # real progress from denoising steps
    assert video.completed_at is not None and video.expires_at > video.completed_at
    content = client.videos.download_content(video.id)
    path = tmp_path / "v.mp4"
    path.write_bytes(content.content)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert s.width % 2 == 0 and s.height % 2 == 0
        assert float(s.average_rate) == 16.0
    thumb = httpx.get(f"{gw.url}/v1/videos/{video.id}/content", params={"variant": "thumbnail"})
    assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")
    ids = [v.id for v in client.videos.list(limit=100)]
    assert video.id in ids
    gone = client.videos.delete(video.id)
    assert gone.deleted and gone.id == video.id and gone.object == "video.deleted"
    assert httpx.get(f"{gw.url}/v1/videos/{video.id}").status_code == 404


def test_video_list_pages_with_after_limit_and_order(gw: GatewayProc) -> None:
    client = openai_client(gw)
    made = [
        client.videos.create(
            model="wan",
            prompt=f"clip {i}",
            size="256x256",
            extra_body={"num_frames": 5, "num_inference_steps": 1},
        ).id
        for i in range(3)
    ]
    page = client.videos.list(limit=2, order="desc")
    assert [v.id for v in page.data] == made[::-1][:2] and page.has_more
    rest = client.videos.list(limit=10, order="desc", after=page.data[-1].id)
    assert rest.data[0].id == made[0]
    asc = client.videos.list(limit=2, order="asc", after=made[0])
    assert [v.id for v in asc.data] == made[1:]
    # the client's auto-pagination follows last_id
    assert set(made) <= {v.id for v in client.videos.list(limit=1)}
    for vid in made:
        wait_job(gw, vid, lambda j: j["status"] == "completed")


def test_curl_images_and_a_multipart_video(gw: GatewayProc, tmp_path: Path) -> None:
    body = json.dumps({"model": "flux", "prompt": "a paper boat", "size": "256x256", "n": 1})
    post = ["curl", "-sS", "-X", "POST", f"{gw.url}/v1/images/generations"]
    out = subprocess.run(
        [*post, "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        check=True,
        timeout=60,
    )
    r = json.loads(out.stdout)
    assert base64.b64decode(r["data"][0]["b64_json"]).startswith(b"\x89PNG")
    form = ["-F", "model=wan", "-F", "prompt=rain on a window", "-F", "size=256x256"]
    form += ["-F", "seconds=1", "-F", "fps=8", "-F", "num_inference_steps=2"]
    out = subprocess.run(
        ["curl", "-sS", f"{gw.url}/v1/videos", *form], capture_output=True, check=True, timeout=30
    )
    job = json.loads(out.stdout)
    assert job["status"] == "queued" and job["trident"]["num_frames"] == 9  # 1 s x 8 fps -> 9
    wait_job(gw, job["id"], lambda j: j["status"] == "completed")
    mp4 = tmp_path / "c.mp4"
    subprocess.run(
        ["curl", "-sSf", "-o", str(mp4), f"{gw.url}/v1/videos/{job['id']}/content"],
        check=True,
        timeout=30,
    )
    assert mp4.read_bytes()[4:8] == b"ftyp"


def test_models_health_and_ready(gw: GatewayProc) -> None:
    client = openai_client(gw)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"flux", "wan"}
    wan = models["wan"].model_extra["trident"]
    assert wan["is_video"] and wan["frame_factor"] == 4 and wan["default_fps"] == 16
    assert client.models.retrieve("flux").id == "flux"
    assert httpx.get(f"{gw.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{gw.url}/ready")
    assert ready.status_code == 200 and ready.json()["devices"] == 2


def test_sdk_progress_callback_and_event_iterator(cluster: LocalCluster) -> None:
    with Client(cluster.client_addr, timeout=60) as c:
        events: list[ProgressEvent] = []
        r = c.generate(
            model="wan",
            prompt="progress",
            height=480,
            width=832,
            num_frames=33,
            num_inference_steps=8,
            on_progress=events.append,
        )
    assert r.is_video and events, "no progress reported"
    steps = [e.step for e in events]
    assert steps == sorted(set(steps)) and events[-1].step == events[-1].total == 8
    assert all(e.stage == "diffuse" and e.request_id == r.request_id for e in events)
    # throttled: at most one report per 0.5 s, plus the last step (8 steps ~ 1.6 s)
    assert len(events) <= 1 + r.timings["diffuse"] / 0.5 + 1
    # a callback that raises breaks nothing
    with Client(cluster.client_addr, timeout=60) as c:
        ok = c.generate(
            model="wan",
            prompt="raising callback",
            height=256,
            width=256,
            num_frames=5,
            num_inference_steps=3,
            on_progress=lambda e: 1 / 0,
        )
    assert ok.is_video

    async def stream() -> list[ProgressEvent | GenerateResult]:
        async with AsyncClient(cluster.client_addr, timeout=60) as ac:
            return [
                e
                async for e in ac.generate_events(
                    model="wan",
                    prompt="events",
                    height=480,
                    width=832,
                    num_frames=33,
                    num_inference_steps=6,
                )
            ]

    got = asyncio.run(stream())
    assert isinstance(got[-1], GenerateResult)
    assert got[-1].request_id == got[0].request_id  # type: ignore[union-attr]
    assert got[:-1] and all(isinstance(e, ProgressEvent) for e in got[:-1])
    assert got[-2].step == 6  # type: ignore[union-attr]
