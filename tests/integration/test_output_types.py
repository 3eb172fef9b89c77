"""``generate(output_type=...)`` through real processes: the decode worker encodes the
output (uint8, png, mp4) and the result says which; ``np`` is exactly what it was.

On ``sim`` devices (the module's sim cluster: synthetic outputs) and on real tiny
diffusers pipelines on one CPU worker (tiny flux and tiny wan)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from tests.pipelines.conftest import STEPS, TEST_SHAPES, TinyModels, diffusers_reference
from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.errors import InvalidRequestError
from trident.runtime.encode import decode_mp4, decode_png, to_uint8

from .conftest import read_log_until

pytestmark = pytest.mark.timeout(240)

IMAGE = {"height": 256, "width": 256, "num_inference_steps": 2}
VIDEO = {"height": 256, "width": 256, "num_frames": 9, "num_inference_steps": 2}


def test_sim_devices_give_every_output_type(sim_cluster: LocalCluster) -> None:
    async def run() -> dict[str, object]:
        async with AsyncClient(sim_cluster.client_addr, timeout=60) as c:
            jobs = {
                f"flux-{t}": c.generate(model="flux", prompt="x", seed=1, output_type=t, **IMAGE)
                for t in ("np", "uint8", "png")
            } | {
                f"wan-{t}": c.generate(model="wan", prompt="x", seed=1, output_type=t, **VIDEO)
                for t in ("np", "uint8", "mp4")
            }
            results = await asyncio.gather(*jobs.values())
            return dict(zip(jobs, results, strict=True))

    r = asyncio.run(run())
    np_img, u8_img, png = r["flux-np"], r["flux-uint8"], r["flux-png"]
    assert np_img.output_type == "np" and np_img.array.dtype == np.float32  # type: ignore[attr-defined]
    assert u8_img.output_type == "uint8" and u8_img.format is None  # type: ignore[attr-defined]
    assert np.array_equal(u8_img.array, to_uint8(np_img.array))  # type: ignore[attr-defined]
    assert png.format == "png" and png.shape == np_img.shape  # type: ignore[attr-defined]
    assert np.array_equal(decode_png(png.data), u8_img.array)  # type: ignore[attr-defined]
    assert "output_encode" in png.timings  # type: ignore[attr-defined]
    np_vid, u8_vid, mp4 = r["wan-np"], r["wan-uint8"], r["wan-mp4"]
    assert np_vid.is_video and np.array_equal(u8_vid.array, to_uint8(np_vid.array))  # type: ignore[attr-defined]
    assert mp4.format == "mp4" and mp4.data[4:8] == b"ftyp"  # type: ignore[attr-defined]
    assert mp4.shape == np_vid.shape  # type: ignore[attr-defined]
    assert decode_mp4(mp4.data, mp4.shape).shape == np_vid.shape  # type: ignore[attr-defined]
    log = read_log_until(
        sim_cluster.log_file,  # type: ignore[arg-type]
        lambda lines: sum(x.get("event") == "request.arrived" for x in lines) >= 6,
    )
    kinds = {x.get("output_type") for x in log if x.get("event") == "request.arrived"}
    assert {"np", "uint8", "png", "mp4"} <= kinds


def test_a_bad_output_type_fails_that_request_only(sim_cluster: LocalCluster) -> None:
    """Refused at the scheduler's socket edge (a raw client bypassing the SDK's check)
    and at admission (a type the model cannot give), each to its own sender, while a
    good request in flight at the same time succeeds."""

    async def run() -> None:
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(sim_cluster.client_addr)
        try:
            async with AsyncClient(sim_cluster.client_addr, timeout=60) as c:
                good = asyncio.ensure_future(
                    c.generate(model="wan", prompt="ok", output_type="mp4", fps=8, **VIDEO)
                )
                for rid, bad in (("b1", 5), ("b2", "gif"), ("b3", ["png"])):
                    submit = {
                        "t": "submit",
                        "id": rid,
                        "model": "flux",
                        "params": {"prompt": "x"},
                        "output_type": bad,
                    }
                    raw.send_multipart([msgpack.packb(submit)])
                    assert await asyncio.to_thread(raw.poll, 5000), f"no reply to {bad!r}"
                    header = msgpack.unpackb(raw.recv_multipart()[0])
                    assert header["t"] == "error" and header["code"] == "protocol"
                    assert header["id"] == rid and "output_type" in header["message"]
                with pytest.raises(InvalidRequestError, match="for video models"):
                    await c.generate(model="flux", prompt="x", output_type="mp4", **IMAGE)
                with pytest.raises(InvalidRequestError, match="for image models"):
                    await c.generate(model="wan", prompt="x", output_type="png", **VIDEO)
                with pytest.raises(InvalidRequestError, match="output_type"):
                    await c.generate(model="flux", prompt="x", output_type="gif", **IMAGE)  # type: ignore[arg-type]
                r = await good
                assert r.format == "mp4" and r.shape == (8, 4, 4, 3)  # sim: 8 frames at most
        finally:
            ctx.destroy(0)

    asyncio.run(run())


# ---------------------------------------------------------------- real tiny pipelines


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    models = TinyModels(tmp_path_factory.mktemp("tiny"))
    return {f: models(f) for f in ("flux", "wan")}


@pytest.fixture(scope="module")
def cpu_cluster(
    tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        [f"tiny-{f}={d}" for f, d in tiny_dirs.items()],
        [NodeSpec("cpu:1", node_id="c", threads=1)],
        log_dir=tmp_path_factory.mktemp("cpu-out"),
        startup_timeout=180,
    )
    with cluster:
        yield cluster


def test_real_outputs_per_type(cpu_cluster: LocalCluster, tiny_dirs: dict[str, Path]) -> None:
    """np is bit-identical whether asked for or not (and matches diffusers' whole
    pipeline), uint8 is its rounding, png decodes to the uint8 output, mp4 holds the
    clip's frames."""
    import torch

    torch.set_num_threads(1)
    flux = {"prompt": "a tiny fox", "guidance_scale": 3.5, "num_inference_steps": STEPS}
    flux |= TEST_SHAPES["flux"]
    wan = {"prompt": "tiny waves", "guidance_scale": 5.0, "num_inference_steps": STEPS}
    wan |= TEST_SHAPES["wan"]

    async def run() -> list:
        async with AsyncClient(cpu_cluster.client_addr, timeout=200) as c:
            calls = [
                c.generate(model="tiny-flux", seed=3, allow_batching=False, **flux),
                *(
                    c.generate(
                        model="tiny-flux", seed=3, allow_batching=False, output_type=t, **flux
                    )
                    for t in ("np", "uint8", "png")
                ),
                c.generate(model="tiny-wan", seed=4, allow_batching=False, **wan),
                *(
                    c.generate(model="tiny-wan", seed=4, allow_batching=False, output_type=t, **wan)
                    for t in ("uint8", "mp4")
                ),
            ]
            return list(await asyncio.gather(*calls))

    default, as_np, as_u8, as_png, wan_np, wan_u8, wan_mp4 = asyncio.run(run())
    assert default.output_type == as_np.output_type == "np"
    assert default.array.dtype == np.float32 and default.array.tobytes() == as_np.array.tobytes()
    ref = diffusers_reference(tiny_dirs["flux"], 3, **flux)
    assert default.array.shape == ref.shape and float(np.abs(default.array - ref).max()) <= 1e-5
    assert as_u8.array.dtype == np.uint8 and np.array_equal(as_u8.array, to_uint8(default.array))
    assert as_png.format == "png" and np.array_equal(decode_png(as_png.data), as_u8.array)
    assert np.array_equal(as_png.array, as_u8.array)
    f, h, w = (TEST_SHAPES["wan"][k] for k in ("num_frames", "height", "width"))
    assert wan_np.array.shape == (f, h, w, 3)
    assert np.array_equal(wan_u8.array, to_uint8(wan_np.array))
    assert wan_mp4.format == "mp4" and wan_mp4.shape == (f, h, w, 3)
    assert decode_mp4(wan_mp4.data).shape == (f, h, w, 3)
    # the encoded outputs are smaller than the float32 they stand for
    assert len(as_png.data) < as_u8.array.nbytes < default.array.nbytes
    assert len(wan_mp4.data) < wan_u8.array.nbytes
