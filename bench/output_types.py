"""Bytes and seconds per ``output_type`` (issue #11 item 3); write-up: bench/output.md.

    python bench/output_types.py --json bench/results/output_types.json

1. Through a local CPU cluster (one scheduler, one node with one ``cpu`` worker, one
   torch thread): a tiny flux image and a tiny wan video (random weights, made like
   ``python -m trident tiny-model FAMILY DIR``), each asked for as every type it can
   give; ``--repeats`` requests each, sequential, unbatched. Reported: the result's
   bytes (the array's, or the file's), the client's median latency, the worker's
   encoding seconds (``timings["output_encode"]``).
2. In-process: a synthetic smooth 1280x720x81 float32 clip (moving sinusoidal
   gradients and a moving disc, values in [0, 1]) as float32, uint8 and MP4 (the
   worker's encoder, :func:`trident.runtime.encode.encode_mp4_bytes`), with the
   encoding seconds and the MP4's PSNR against the uint8 frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trident import AsyncClient
from trident.bench.cluster import LocalCluster, NodeSpec
from trident.pipelines.tiny import make_tiny_model
from trident.runtime.encode import decode_mp4, encode_image, encode_mp4_bytes, to_uint8

IMAGE = {"height": 256, "width": 256, "num_inference_steps": 2, "guidance_scale": 3.5}
VIDEO = {"height": 256, "width": 256, "num_frames": 17, "num_inference_steps": 2}
TYPES = {"tiny-flux": ("np", "uint8", "png"), "tiny-wan": ("np", "uint8", "mp4")}


def _nbytes(r: Any) -> int:
    return len(r.data) if r.format is not None else int(r.array.nbytes)


async def _cluster_rows(addr: str, repeats: int) -> list[dict[str, Any]]:
    rows = []
    async with AsyncClient(addr, timeout=600) as c:
        for model, types in TYPES.items():
            shape = IMAGE if model == "tiny-flux" else VIDEO
            await c.generate(model=model, prompt="warm up", seed=0, **shape)
            for t in types:
                lat, enc, size, dims = [], [], 0, ()
                for i in range(repeats):
                    start = time.perf_counter()
                    r = await c.generate(
                        model=model,
                        prompt="a tiny test",
                        seed=i,
                        allow_batching=False,
                        output_type=t,  # type: ignore[arg-type]
                        **shape,
                    )
                    lat.append(time.perf_counter() - start)
                    enc.append(r.timings.get("output_encode", 0.0))
                    size, dims = _nbytes(r), r.shape
                rows.append(
                    {
                        "model": model,
                        "output_type": t,
                        "shape": list(dims),
                        "bytes": size,
                        "latency_s": statistics.median(lat),
                        "encode_s": statistics.median(enc),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def cluster(repeats: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = {f: make_tiny_model(f, root / f, seed=0) for f in ("flux", "wan")}
        with LocalCluster(
            [f"tiny-{f}={d}" for f, d in dirs.items()],
            [NodeSpec("cpu:1", node_id="c", threads=1)],
            log_dir=root / "logs",
            startup_timeout=300,
        ) as cl:
            return asyncio.run(_cluster_rows(cl.client_addr, repeats))


def smooth_video(frames: int = 81, height: int = 720, width: int = 1280) -> np.ndarray:
    """A smooth synthetic clip, float32 in [0, 1]: moving gradients and a moving disc."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    out = np.empty((frames, height, width, 3), dtype=np.float32)
    for f in range(frames):
        t = f / frames
        r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + t))
        g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - 0.5 * t))
        b = 0.3 + 0.4 * x * y + 0 * r
        cx, cy = 0.2 + 0.6 * t, 0.5
        disc = ((x - cx) * width) ** 2 + ((y - cy) * height) ** 2 < (0.1 * height) ** 2
        out[f, ..., 0] = np.where(disc, 0.9, r)
        out[f, ..., 1] = np.where(disc, 0.1, g)
        out[f, ..., 2] = np.where(disc, 0.2, b)
    return out


def synthetic() -> list[dict[str, Any]]:
    video = smooth_video()
    rows: list[dict[str, Any]] = [
        {"output_type": "np", "bytes": int(video.nbytes), "encode_s": 0.0},
    ]
    start = time.perf_counter()
    pixels = to_uint8(video)
    rows.append(
        {
            "output_type": "uint8",
            "bytes": int(pixels.nbytes),
            "encode_s": time.perf_counter() - start,
        }
    )
    start = time.perf_counter()
    data = encode_mp4_bytes(video, fps=16)
    secs = time.perf_counter() - start
    back = decode_mp4(data, video.shape).astype(np.float64)
    mse = float(np.mean((back - pixels.astype(np.float64)) ** 2))
    psnr = 10 * np.log10(255.0**2 / mse) if mse > 0 else float("inf")
    rows.append({"output_type": "mp4", "bytes": len(data), "encode_s": secs, "psnr_db": psnr})
    start = time.perf_counter()
    png = encode_image(pixels[0], "png")
    rows.append(
        {"output_type": "png (frame 0)", "bytes": len(png), "encode_s": time.perf_counter() - start}
    )
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-cluster", action="store_true")
    ns = p.parse_args()
    out = {
        "command": "python bench/output_types.py"
        + (f" --repeats {ns.repeats}" if ns.repeats != 3 else "")
        + (f" --json {ns.json}" if ns.json else ""),
        "synthetic_1280x720x81": synthetic(),
        "cluster_cpu1": [] if ns.skip_cluster else cluster(ns.repeats),
    }
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
