"""The gateway's parts without sockets: job store, request resolution, error table,
encoders; and the worker's progress throttle and the sim device's step reports."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from trident import errors as te
from trident.gateway.encode import encode_image, encode_mp4
from trident.gateway.errors import ERROR_TABLE, GatewayError, from_trident, param_of
from trident.gateway.schemas import (
    ImageRequest,
    VideoRequest,
    frames_for,
    parse_model,
    resolve_size,
)
from trident.gateway.store import Job, JobStore
from trident.runtime.devices import ProgressFlag, SimExecutor
from trident.runtime.worker import StepThrottle

pytestmark = pytest.mark.timeout(30)

WAN = {
    "is_video": True,
    "default_width": 832,
    "default_height": 480,
    "default_num_frames": 81,
    "default_fps": 16,
    "size_multiple": 16,
    "max_side": 8192,
    "frame_factor": 4,
    "max_frames": 257,
}


def _job(i: int, **kw: object) -> Job:
    fields: dict = dict(
        id=f"video_{i}",
        kind="video",
        model="wan",
        status="queued",
        created_at=int(time.time()),
        request={"model": "wan", "prompt": f"p{i}"},
        info={"size": "832x480"},
    )
    fields.update(kw)
    return Job(**fields)


# ------------------------------------------------------------------ store


def test_store_pages_in_both_orders_and_survives_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    for i in range(5):
        store.add(_job(i))
    page, more = store.page("video", None, 2, "desc")
    assert [j.id for j in page] == ["video_4", "video_3"] and more
    page, more = store.page("video", "video_3", 10, "desc")
    assert [j.id for j in page] == ["video_2", "video_1", "video_0"] and not more
    page, more = store.page("video", "video_1", 2, "asc")
    assert [j.id for j in page] == ["video_2", "video_3"] and more
    with pytest.raises(KeyError):
        store.page("video", "video_99", 2, "asc")
    store.close()
    again = JobStore(tmp_path)
    got = again.get("video_2")
    assert got is not None and got.request == {"model": "wan", "prompt": "p2"}
    assert again.get("video_2", "image") is None and again.count_active() == 5
    assert again._read("PRAGMA journal_mode")[0][0] == "wal"


def test_store_leases_claims_and_hand_backs(tmp_path: Path) -> None:
    store = JobStore(tmp_path, retention_s=60)
    for i in range(3):
        store.add(_job(i))
    now = time.time()
    mine = store.claim("a", lease_s=10, limit=2, now=now)
    assert [j.id for j in mine] == ["video_0", "video_1"] and mine[0].attempts == 1
    # another gateway gets only what is left; a lapsed lease is claimable again
    assert [j.id for j in store.claim("b", 10, 5, now)] == ["video_2"]
    assert store.claim("b", 10, 5, now + 5) == []
    store.renew("a", ["video_0"], 10, now + 5)
    taken = store.claim("b", 10, 5, now + 12)
    assert [j.id for j in taken] == ["video_1"]
    assert store.cancelled_of("a", ["video_0", "video_1"]) == ["video_1"]  # no longer a's
    store.set_progress("a", {"video_0": 40})
    got = store.get("video_0")
    assert got is not None and got.status == "in_progress" and got.progress == 40
    # finishing is guarded: only the owner of an active job may
    assert not store.complete("b", "video_0", "x.mp4", {}, now)
    assert store.complete("a", "video_0", "x.mp4", {"fps": 16}, now)
    done = store.get("video_0")
    assert done is not None and done.status == "completed" and done.progress == 100
    assert done.expires_at == int(now + 60)
    assert not store.fail("a", "video_0", "internal", "late", now)
    # cancel marks an active job, tells its owner, and is refused for a finished one
    cancelled = store.cancel("video_1", now)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert store.cancelled_of("b", ["video_1"]) == ["video_1"]
    assert store.cancel("video_0", now) is None
    assert store.release("b") == 1  # video_2 back in the queue
    again = store.get("video_2")
    assert again is not None and again.owner is None and again.status == "queued"
    store.requeue("a", "video_2", now + 100)  # not a's: nothing changes
    assert [j.id for j in store.claim("c", 10, 5, now)] == ["video_2"]
    store.requeue("c", "video_2", now + 100)
    assert store.claim("c", 10, 5, now + 1) == []
    assert [j.id for j in store.claim("c", 10, 5, now + 101)] == ["video_2"]


def test_store_sweeps_expired_rows_and_files(tmp_path: Path) -> None:
    store = JobStore(tmp_path, retention_s=10)
    store.add(_job(0))
    now = time.time()
    store.claim("a", 10, 1, now)
    store.write_output("video_0.mp4", b"data")
    assert store.complete("a", "video_0", "video_0.mp4", {}, now)
    assert store.sweep(now + 5) == 0 and (store.outputs / "video_0.mp4").exists()
    assert store.sweep(now + 11) == 1
    assert store.get("video_0") is None and not (store.outputs / "video_0.mp4").exists()


# ------------------------------------------------------------------ requests


def test_sizes_resolve_against_the_model() -> None:
    assert resolve_size(None, WAN) == (832, 480)
    assert resolve_size("auto", WAN) == (832, 480)
    assert resolve_size("1280x720", WAN) == (1280, 720)
    for bad in ("1280", "axb", "1281x720", "0x720"):
        with pytest.raises(GatewayError) as info:
            resolve_size(bad, WAN)
        assert info.value.status == 400 and info.value.param == "size"


def test_seconds_round_to_the_frame_rule_and_say_so() -> None:
    req = parse_model(VideoRequest, {"prompt": "p", "seconds": "4"})
    n, fps, note = frames_for(req, WAN)
    assert (n, fps) == (65, 16) and note is not None and "rounded to 65" in note
    n, fps, note = frames_for(parse_model(VideoRequest, {"prompt": "p", "seconds": 5}), WAN)
    assert (n, fps) == (81, 16) and note is not None and "rounded to 81" in note
    exact = parse_model(VideoRequest, {"prompt": "p", "seconds": 4.0625})
    assert frames_for(exact, WAN) == (65, 16, None)  # 65 frames at 16 fps: nothing to say
    n, _, _ = frames_for(parse_model(VideoRequest, {"prompt": "p", "seconds": 2, "fps": 8}), WAN)
    assert n == 17
    n, _, _ = frames_for(parse_model(VideoRequest, {"prompt": "p"}), WAN)
    assert n == 81
    for body, param in (
        ({"prompt": "p", "seconds": 60}, "seconds"),
        ({"prompt": "p", "num_frames": 80}, "num_frames"),
        ({"prompt": "p", "num_frames": 301}, "num_frames"),
        ({"prompt": "p", "num_frames": 81, "seconds": 5}, "num_frames"),
    ):
        with pytest.raises(GatewayError) as info:
            frames_for(parse_model(VideoRequest, body), WAN)
        assert info.value.status == 400 and info.value.param == param, body


def test_bodies_are_validated_naming_the_field() -> None:
    for body, param in (
        ({"prompt": "p", "n": 11}, "n"),
        ({"prompt": "p", "num_inference_step": 4}, "num_inference_step"),
        ({"n": 1}, "prompt"),
        ({"prompt": "p", "response_format": "gif"}, "response_format"),
        ({"prompt": "p", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "p", "seed": -1}, "seed"),
    ):
        with pytest.raises(GatewayError) as info:
            parse_model(ImageRequest, body)
        assert info.value.status == 400 and info.value.param == param, body
    ok = parse_model(ImageRequest, {"prompt": "p", "quality": "hd", "style": "vivid"})
    assert ok.n == 1


def test_every_trident_error_has_its_status() -> None:
    expect = {
        te.InvalidRequestError: 400,
        te.UnknownModelError: 404,
        te.OverloadedError: 429,
        te.UnavailableError: 503,
        te.ConnectionError: 503,
        te.AuthenticationError: 503,
        te.RequestTimeoutError: 504,
        te.StageFailedError: 500,
        te.CancelledError: 409,
    }
    for cls, status in expect.items():
        err = from_trident(cls("something went wrong"))
        assert err.status == status, cls
        body = err.body()["error"]
        assert set(body) == {"message", "type", "param", "code"}
    assert from_trident(te.OverloadedError("busy")).headers["Retry-After"] == "1"
    assert {row[0] for row in ERROR_TABLE} >= set(expect)
    msg = "invalid parameter: Expected `int` >= 1 - at `$.params.num_inference_steps`"
    assert param_of(msg) == "num_inference_steps"
    assert param_of("height=37: must be a multiple of 16") == "size"
    assert param_of("num_frames=6: must be 1 + 4k", {"num_frames": "seconds"}) == "seconds"
    assert from_trident(te.UnknownModelError("no model named 'x'")).param == "model"


# ------------------------------------------------------------------ encoders


def test_mp4_is_h264_yuv420p_with_even_dimensions(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).random((5, 7, 13, 3), dtype=np.float32)
    path = encode_mp4(frames, tmp_path / "v.mp4", fps=8)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.width, s.height) == (14, 8) and float(s.average_rate) == 8.0
        assert len(list(c.decode(video=0))) == 5
    assert not (tmp_path / "v.mp4.part").exists()


def test_images_encode_in_each_format() -> None:
    img = np.full((16, 16, 3), 0.5, dtype=np.float32)
    assert encode_image(img, "png").startswith(b"\x89PNG")
    assert encode_image(img, "jpeg", 50).startswith(b"\xff\xd8")
    assert encode_image(img, "webp")[8:12] == b"WEBP"


# ------------------------------------------------------------------ progress


def test_step_throttle_passes_at_most_one_per_interval_and_the_last() -> None:
    now = [0.0]
    sent: list[tuple[int, int]] = []
    t = StepThrottle(lambda s, n: sent.append((s, n)), interval=0.5, clock=lambda: now[0])
    for step in range(1, 11):  # a step every 0.2 s
        t(step, 10)
        now[0] += 0.2
    assert sent == [(1, 10), (4, 10), (7, 10), (10, 10)]
    t(10, 10)
    t(3, 10)
    assert len(sent) == 4  # repeats and steps back are dropped


def test_a_sim_diffuse_reports_each_step_to_a_progress_flag() -> None:
    ex = SimExecutor({"flux": {"family": "flux"}}, 80 << 30, time_scale=0.0)
    steps: list[tuple[int, int]] = []
    flag = ProgressFlag(lambda s, n: steps.append((s, n)))
    params = {"height": 256, "width": 256, "num_inference_steps": 6}
    asyncio.run(ex.run_async("flux", ("diffuse",), {}, params, {}, cancel=flag))
    assert steps == [(i, 6) for i in range(1, 7)]
    # a reporter that raises breaks nothing
    boom = ProgressFlag(lambda s, n: 1 / 0)
    asyncio.run(ex.run_async("flux", ("diffuse",), {}, params, {}, cancel=boom))
    assert isinstance(boom, threading.Event) and not boom.is_set()


def test_only_rank_0_of_a_diffuse_task_reports_progress() -> None:
    from trident.runtime import protocol
    from trident.runtime.worker import Worker, WorkerArgs, _Task

    worker = Worker(WorkerArgs("tcp://127.0.0.1:1", "n", "sim", 0, 0, 1 << 30))

    def task(rank: int, stages: list[str]) -> _Task:
        return _Task(
            msg=protocol.RunTask(
                task_id="t",
                request_id="r",
                model="flux",
                stages=stages,  # type: ignore[arg-type]
                devices=["n/sim:0", "n/sim:1"],
                rank=rank,
                inputs=[],
                final=False,
                params={},
            )
        )

    async def reporters() -> list[object]:
        return [
            worker._progress_reporter(task(0, ["diffuse"])),
            worker._progress_reporter(task(1, ["diffuse"])),
            worker._progress_reporter(task(0, ["decode"])),
        ]

    try:
        leader, follower, decode = asyncio.run(reporters())
    finally:
        worker.ctx.term()
    assert isinstance(leader, StepThrottle) and follower is None and decode is None
