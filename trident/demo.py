"""``trident demo``: an embedded local cluster serving tiny pipelines, end to end.

Starts a real scheduler and one node (CPU devices running tiny random-weight diffusers
pipelines; ``--sim`` for simulated GPUs instead) as background processes of this
command, sends a handful of mixed requests, writes the outputs to ``--out``, prints a
per-request table and the SLO attainment, and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from trident.bench.cluster import LocalCluster, NodeSpec
from trident.client import AsyncClient, GenerateResult
from trident.cliformat import DefaultsHelpFormatter
from trident.errors import RequestError, TridentError

__all__ = ["build_parser", "main"]

PROMPTS = [
    "a lighthouse on a cliff at dusk",
    "a red fox in fresh snow",
    "a paper boat on a rainy street",
    "an astronaut tending a tiny garden",
    "a neon-lit noodle stand",
    "waves breaking over black sand",
]


def _requests(sim: bool, n: int) -> list[dict[str, Any]]:
    if sim:
        shapes = [
            dict(model="flux", height=512, width=512, num_inference_steps=28),
            dict(model="flux", height=1024, width=1024, num_inference_steps=28),
            dict(model="wan", height=480, width=832, num_frames=33, num_inference_steps=20),
            dict(model="flux", height=2048, width=2048, num_inference_steps=28),
        ]
    else:
        shapes = [
            dict(model="tiny-flux", height=32, width=32, num_inference_steps=4, guidance_scale=3.5),
            dict(model="tiny-flux", height=64, width=64, num_inference_steps=4, guidance_scale=3.5),
            dict(
                model="tiny-wan",
                height=32,
                width=32,
                num_frames=5,
                num_inference_steps=4,
                guidance_scale=5.0,
            ),
            dict(model="tiny-flux", height=48, width=48, num_inference_steps=6, guidance_scale=3.5),
        ]
    return [
        dict(shapes[i % len(shapes)], prompt=PROMPTS[i % len(PROMPTS)], seed=i) for i in range(n)
    ]


def _save(result: GenerateResult, out: Path, i: int) -> Path:
    from PIL import Image

    frames = result.images
    if len(frames) == 1:
        path = out / f"{i:02d}-{result.model}.png"
        frames[0].save(path)
    else:
        path = out / f"{i:02d}-{result.model}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
    # Tiny outputs are a few pixels: also keep an upscaled preview to look at.
    if max(frames[0].size) < 256:
        scale = 256 // max(frames[0].size)
        strip = np.concatenate([np.asarray(f) for f in frames[:8]], axis=1)
        Image.fromarray(strip).resize(
            (strip.shape[1] * scale, strip.shape[0] * scale), Image.Resampling.NEAREST
        ).save(out / f"{i:02d}-{result.model}-preview.png")
    return path


def _fmt(t: dict[str, float], k: str) -> str:
    return f"{t.get(k, 0.0):7.3f}"


def _short(devs: list[str]) -> str:
    return ",".join(d.split("/", 1)[-1] for d in devs)


async def _send_all(
    addr: str, reqs: list[dict[str, Any]], slo_s: float | None
) -> list[GenerateResult | RequestError]:
    async with AsyncClient(addr, timeout=600) as c:

        async def one(r: dict[str, Any]) -> GenerateResult | RequestError:
            try:
                return await c.generate(**r, slo_s=slo_s)
            except RequestError as exc:
                return exc

        return list(await asyncio.gather(*(one(r) for r in reqs)))


def build_parser() -> argparse.ArgumentParser:
    """``trident demo``'s command line."""
    p = argparse.ArgumentParser(
        prog="trident demo",
        description="An embedded local cluster serving tiny pipelines, end to end: mixed "
        "requests, their outputs in --out, a per-request table and the SLO attainment.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--devices", type=int, default=2, help="devices on the embedded node")
    p.add_argument("--requests", type=int, default=8, help="requests to send, of mixed shapes")
    p.add_argument(
        "--sim",
        action="store_true",
        help="simulated GPUs (sleep for the cost model's time) instead of CPU",
    )
    p.add_argument(
        "--out", default="trident-out", help="directory for the outputs, tiny models and logs"
    )
    p.add_argument(
        "--slo-s",
        type=float,
        default=None,
        help="latency budget per request (default: 60 s on CPU; the cost model's SLO on sim)",
    )
    p.add_argument(
        "--policy",
        default="trident",
        help="scheduling policy: trident, trident-static, b1, b4, b6, authors, fifo",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.sim:
        models = ["flux", "wan=sim:wan"]
        node = NodeSpec(f"sim:{args.devices}", node_id="demo", time_scale=0.01)
        slo_s = args.slo_s
    else:
        from trident.pipelines.tiny import make_tiny_model

        models = []
        for family in ("flux", "wan"):
            d = out / "models" / f"tiny-{family}"
            if not (d / "model_index.json").exists():
                print(f"building tiny random-weight {family} pipeline in {d} ...")
                make_tiny_model(family, d, seed=0)
            models.append(f"tiny-{family}={d}")
        node = NodeSpec(f"cpu:{args.devices}", node_id="demo", threads=1)
        slo_s = args.slo_s if args.slo_s is not None else 60.0

    reqs = _requests(args.sim, args.requests)
    print(f"starting scheduler + 1 node ({node.devices}); logs in {out / 'logs'}")
    t0 = time.monotonic()
    try:
        with LocalCluster(
            models, [node], policy=args.policy, log_dir=out / "logs", startup_timeout=120
        ) as cluster:
            print(f"cluster up in {time.monotonic() - t0:.1f}s; sending {len(reqs)} requests")
            results = asyncio.run(_send_all(cluster.client_addr, reqs, slo_s))
    except TridentError as exc:
        print(f"trident demo: {exc}", file=sys.stderr)
        return 1

    header = f"{'#':>2} {'model':<10} {'shape':<12} {'queue':>7} {'encode':>7} {'diffuse':>7} {'decode':>7} {'xfer':>7} {'load':>7} {'total':>7}  {'SLO':<4} devices (E | D | C)"
    print(header)
    print("-" * len(header))
    met = 0
    ok = 0
    for i, (r, res) in enumerate(zip(reqs, results, strict=True)):
        shape = f"{r['height']}x{r['width']}" + (f"x{r['num_frames']}" if "num_frames" in r else "")
        if isinstance(res, RequestError):
            print(f"{i:>2} {r['model']:<10} {shape:<12} FAILED {type(res).__name__}: {res}")
            continue
        ok += 1
        met += bool(res.met_slo)
        _save(res, out, i)
        t = res.timings
        devs = " | ".join(_short(res.devices.get(s, [])) for s in ("encode", "diffuse", "decode"))
        print(
            f"{i:>2} {r['model']:<10} {shape:<12} {_fmt(t, 'queue')} {_fmt(t, 'encode')} {_fmt(t, 'diffuse')} "
            f"{_fmt(t, 'decode')} {_fmt(t, 'transfer')} {_fmt(t, 'load')} {_fmt(t, 'total')}  {'yes' if res.met_slo else 'no':<4} {devs}"
        )
    print(f"\n{ok}/{len(reqs)} completed, {met}/{len(reqs)} met their SLO; outputs in {out}")
    return 0 if ok == len(reqs) else 1


if __name__ == "__main__":
    sys.exit(main())
