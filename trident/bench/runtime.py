"""``trident bench runtime``: the runtime's control plane and data plane, measured.

Control plane: the real scheduler + node daemons with zero-time ``sim`` stages; many
requests through one scheduler; stage dispatches per second (3 per request).

Data plane: two processes; one keeps a float32 tensor of 4 MB / 64 MB the way a worker
keeps a stage output (``PeerServer``), the other fetches it the way the next stage's
worker does (``PeerClient``: request, zero-copy multipart reply, tensor rebuilt over the
frame). Beside it, in the same run and the same two processes, a raw pyzmq DEALER/ROUTER
round trip of the same buffer (``copy=False``) — the ratio is the figure that matters.
And the same-node hand-off (issue #12): the same fetch with ``shm=True`` (the holder
copies the output into a shared-memory segment, the fetcher maps it), a new key each
time and that key released at the holder after the fetcher is done with it (as the
scheduler's ``release`` does), several in a row: the first hand-off of a size makes and
maps a fresh segment, the later ones recycle it from the holder's pool into the
fetcher's cached mapping; the first and the steady state (median of the rest) are
reported apart, beside a plain memcpy of the same bytes in the fetcher's process (into
a fresh buffer, and into a reused one). And the eager hand-off (what workers do now): the
holder exports the kept output into a pooled segment as its task finishes
(``PeerServer.export``, timed in the holder) and the consumer attaches the reference
the scheduler passes on (``attach_output``, timed in the consumer, with one read of
the tensor), no fetch; its cost is the sum of the two (the reference itself rides in
``task_finished`` / ``run_task``, sent either way). The command's own round trip that
asks the holder to export is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from trident.bench.cluster import LocalCluster, NodeSpec
from trident.client import AsyncClient
from trident.cliformat import DefaultsHelpFormatter
from trident.errors import RequestError
from trident.runtime import protocol
from trident.runtime.dataplane import PeerClient, PeerServer, attach_output, shm_output
from trident.runtime.shm import ShmStore, segment_prefix
from trident.runtime.transport import bound_address, make_socket

__all__ = ["build_parser", "control_plane", "data_plane", "main"]

MB = 1 << 20


# ---------------------------------------------------------------------- data plane


def _holder(sizes: list[int], conn: Any) -> None:
    """Runs in a child process: serves tensors via PeerServer and raw ROUTER."""

    async def run() -> None:
        ctx = zmq.asyncio.Context()
        store = _AnyRepeat({f"t{s}": {"x": np.ones(s // 4, dtype=np.float32)} for s in sizes})
        shm = ShmStore(segment_prefix("bench", 0, os.getpid()))
        server = PeerServer(ctx, "127.0.0.1", store, shm=shm)
        raw = make_socket(ctx, zmq.ROUTER)
        raw.bind("tcp://127.0.0.1:*")
        buffers = {str(s).encode(): store[f"t{s}"]["x"] for s in sizes}
        scratch = {f"t{s}": np.empty_like(store[f"t{s}"]["x"]) for s in sizes}
        conn.send((server.address, bound_address(raw)))

        async def raw_loop() -> None:
            while True:
                ident, what = await raw.recv_multipart()
                if what == b"stop":
                    return
                if what.startswith(b"release:"):  # the scheduler's release of an output
                    shm.release(what.split(b":", 1)[1].decode())
                    await raw.send_multipart([ident, b"ok"])
                    continue
                if what.startswith(b"export:"):  # a task keeping its output (eager export)
                    key = what.split(b":", 1)[1].decode()
                    # the holder's own memcpy of the same bytes, just before (reused buffer)
                    t0 = time.perf_counter()
                    np.copyto(scratch[key.split("/", 1)[0]], store.get(key)["x"])
                    copy_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    seg = await server.export(key)
                    secs = time.perf_counter() - t0
                    assert seg is not None
                    ref = msgspec.msgpack.encode(shm_output(seg))
                    await raw.send_multipart([ident, struct.pack("<dd", secs, copy_s), ref])
                    continue
                await raw.send_multipart([ident, buffers[what]], copy=False)

        serve = asyncio.create_task(server.serve())
        await raw_loop()
        serve.cancel()
        shm.close()
        server.close()
        raw.close(0)
        ctx.term()

    asyncio.run(run())


class _AnyRepeat(dict):  # type: ignore[type-arg]
    """``t<size>`` and ``t<size>/<n>`` are the same output (a fresh key per shm fetch)."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.split("/", 1)[0], default)


def data_plane(sizes_mb: list[int], repeats: int = 10) -> dict[str, Any]:
    sizes = [m * MB for m in sizes_mb]
    mpctx = mp.get_context("spawn")
    parent, child = mpctx.Pipe()
    proc = mpctx.Process(target=_holder, args=(sizes, child), daemon=True)
    proc.start()
    peer_addr, raw_addr = parent.recv()
    results: dict[str, Any] = {}

    async def run() -> None:
        ctx = zmq.asyncio.Context()
        client = PeerClient(ctx)
        raw = make_socket(ctx, zmq.DEALER)
        raw.connect(raw_addr)
        for size in sizes:
            n = repeats if size >= 32 * MB else repeats * 5
            # warm-up both paths (connection set-up, page faults)
            await client.fetch(peer_addr, f"t{size}")
            await raw.send_multipart([str(size).encode()])
            await raw.recv_multipart(copy=False)
            src = np.ones(size // 4, dtype=np.float32)
            reused = np.empty_like(src)
            t_runtime, t_raw, t_shm, t_fresh, t_warm = [], [], [], [], []
            t_export, t_attach, t_eager, t_hcopy = [], [], [], []
            for i in range(n):
                t0 = time.perf_counter()
                tensors, _, via = await client.fetch_via(peer_addr, f"t{size}/{i}", shm=True)
                assert via == "shm" and tensors["x"].nbytes == size
                float(tensors["x"][-1])
                t_shm.append(time.perf_counter() - t0)
                del tensors  # the consuming stage is done: its input is released
                await raw.send_multipart([f"release:t{size}/{i}".encode()])
                await raw.recv_multipart()
                t0 = time.perf_counter()
                dst = np.empty_like(src)
                np.copyto(dst, src)
                t_fresh.append(time.perf_counter() - t0)
                del dst
                t0 = time.perf_counter()
                np.copyto(reused, src)
                t_warm.append(time.perf_counter() - t0)
                # eager: exported by the holder as its task ends, attached by reference
                key = f"t{size}/e{i}"
                await raw.send_multipart([f"export:{key}".encode()])
                secs_b, ref_b = await raw.recv_multipart()
                ref = msgspec.msgpack.decode(ref_b, type=protocol.ShmOutput)
                t0 = time.perf_counter()
                tensors = attach_output(ref, "bench")
                assert tensors["x"].nbytes == size
                float(tensors["x"][-1])
                t_attach.append(time.perf_counter() - t0)
                export_s, holder_copy_s = struct.unpack("<dd", secs_b)
                t_export.append(export_s)
                t_hcopy.append(holder_copy_s)
                t_eager.append(t_export[-1] + t_attach[-1])
                del tensors
                await raw.send_multipart([f"release:{key}".encode()])
                await raw.recv_multipart()
                t0 = time.perf_counter()
                tensors, _ = await client.fetch(peer_addr, f"t{size}")
                assert tensors["x"].nbytes == size
                t_runtime.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await raw.send_multipart([str(size).encode()])
                frames = await raw.recv_multipart(copy=False)
                assert len(frames[0].buffer) == size
                t_raw.append(time.perf_counter() - t0)
            rt, rw = statistics.median(t_runtime), statistics.median(t_raw)
            ts, tf, tw = (statistics.median(t) for t in (t_shm[1:], t_fresh, t_warm))
            te, tx, ta = (statistics.median(t[1:]) for t in (t_eager, t_export, t_attach))
            results[f"{size // MB}MB"] = {
                # eager hand-off, steady state (2..n): holder's export + consumer's attach
                "eager_first_ms": t_eager[0] * 1e3,
                "eager_p50_ms": te * 1e3,
                "eager_export_p50_ms": tx * 1e3,
                "eager_attach_p50_ms": ta * 1e3,
                # the holder's memcpy of the same bytes into a reused buffer, just
                # before each export (same process, same moment: the export's yardstick)
                "holder_memcpy_reused_p50_ms": statistics.median(t_hcopy) * 1e3,
                "eager_GBps": size / te / 1e9,
                "tcp_time_over_eager": rt / te,
                "fetch_shm_time_over_eager": ts / te,
                "eager_time_over_memcpy_fresh": te / tf,
                "eager_time_over_memcpy_reused": te / tw,
                "shm_first_ms": t_shm[0] * 1e3,
                "shm_GBps": size / ts / 1e9,
                "shm_p50_ms": ts * 1e3,  # steady state: hand-offs 2..n
                "tcp_time_over_shm_first": rt / t_shm[0],
                "memcpy_fresh_p50_ms": tf * 1e3,
                "memcpy_reused_p50_ms": tw * 1e3,
                "tcp_time_over_shm": rt / ts,
                "shm_time_over_memcpy_fresh": ts / tf,
                "shm_time_over_memcpy_reused": ts / tw,
                "runtime_GBps": size / rt / 1e9,
                "raw_pyzmq_GBps": size / rw / 1e9,
                "runtime_p50_ms": rt * 1e3,
                "raw_p50_ms": rw * 1e3,
                "runtime_time_over_raw": rt / rw,
                "repeats": n,
            }
        await raw.send_multipart([b"stop"])
        client.close()
        raw.close(0)
        ctx.term()

    try:
        asyncio.run(run())
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return results


# ---------------------------------------------------------------------- control plane


def control_plane(
    requests: int = 3000, devices: int = 8, concurrency: int = 512, policy: str = "fifo"
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(
            ["flux"],
            [NodeSpec(f"sim:{devices}", time_scale=0.0)],
            log_dir=tmp,
            policy=policy,
            scheduler_args=["--max-queue", str(max(1024, concurrency * 2))],
        )
        with cluster:
            assert cluster.scheduler is not None
            sched_pid = cluster.scheduler.pid

            async def run() -> tuple[int, int, float]:
                sem = asyncio.Semaphore(concurrency)
                async with AsyncClient(cluster.client_addr, timeout=300) as c:

                    async def one(i: int) -> bool:
                        async with sem:
                            try:
                                await c.generate(
                                    model="flux",
                                    prompt="p",
                                    height=256,
                                    width=256,
                                    num_inference_steps=1,
                                    seed=i,
                                )
                                return True
                            except RequestError:
                                return False

                    for i in range(50):  # warm-up
                        await one(i)
                    cpu0[0] = _cpu_seconds(sched_pid)
                    t0 = time.perf_counter()
                    ok = await asyncio.gather(*(one(i) for i in range(requests)))
                    return sum(ok), len(ok), time.perf_counter() - t0

            cpu0 = [0.0]
            done, total, wall = asyncio.run(run())
            sched_cpu = _cpu_seconds(sched_pid) - cpu0[0]
        log = Path(tmp, "trident.log").read_text().splitlines()
        dispatched = sum(1 for line in log if '"stage.dispatched"' in line)
    return {
        "requests": total,
        "completed": done,
        "devices": devices,
        "policy": policy,
        "wall_s": wall,
        "requests_per_s": done / wall,
        "stage_dispatches_per_s": 3 * done / wall,
        "stage_dispatches_logged": dispatched,
        # The scheduler's own CPU per dispatch: what one scheduler could sustain on a
        # core of its own (on 2 cores the workers' processes compete with it).
        "scheduler_cpu_s": sched_cpu,
        "scheduler_cpu_us_per_dispatch": 1e6 * sched_cpu / max(1, 3 * done),
        "scheduler_ceiling_dispatches_per_s": 3 * done / sched_cpu if sched_cpu > 0 else None,
    }


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_parser() -> argparse.ArgumentParser:
    """``trident bench runtime``'s command line."""
    p = argparse.ArgumentParser(
        prog="trident bench runtime",
        description="The runtime's control plane (dispatches per second through real "
        "daemons) and data plane (stage-output fetches against raw pyzmq), measured.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=3000, help="control plane: requests to send")
    p.add_argument("--devices", type=int, default=8, help="control plane: zero-time sim devices")
    p.add_argument(
        "--sizes-mb", default="4,64", help="data plane: comma-separated tensor sizes, MB"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="data plane: timed fetches per size (5x that under 32 MB)",
    )
    p.add_argument("--policy", default="fifo", help="scheduler policy for the control-plane run")
    p.add_argument("--skip-control", action="store_true", help="skip the control-plane run")
    p.add_argument("--skip-data", action="store_true", help="skip the data-plane run")
    p.add_argument("--json", default=None, help="write the results to this file (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out: dict[str, Any] = {
        "command": "trident bench runtime " + " ".join(argv if argv is not None else sys.argv[3:]),
        "machine": {"cpus": os.cpu_count(), "load_avg_before": os.getloadavg()},
    }
    if not args.skip_data:
        dp = data_plane([int(x) for x in args.sizes_mb.split(",")], args.repeats)
        out["data_plane"] = dp
        print("data plane (tcp loopback, worker fetch vs raw pyzmq round trip of the same buffer):")
        for size, r in dp.items():
            print(
                f"  {size:>5}: runtime {r['runtime_GBps']:.2f} GB/s ({r['runtime_p50_ms']:.1f} ms)  "
                f"raw {r['raw_pyzmq_GBps']:.2f} GB/s ({r['raw_p50_ms']:.1f} ms)  "
                f"runtime/raw time ratio {r['runtime_time_over_raw']:.2f}"
            )
        print("same-node hand-off (shared memory vs the tcp fetch above vs memcpy):")
        for size, r in dp.items():
            print(
                f"  {size:>5}: shm first {r['shm_first_ms']:.1f} ms, steady "
                f"{r['shm_GBps']:.2f} GB/s ({r['shm_p50_ms']:.2f} ms)  "
                f"tcp/shm {r['tcp_time_over_shm']:.2f}x  memcpy fresh "
                f"{r['memcpy_fresh_p50_ms']:.1f} ms (shm/memcpy "
                f"{r['shm_time_over_memcpy_fresh']:.2f}x)  reused "
                f"{r['memcpy_reused_p50_ms']:.1f} ms ({r['shm_time_over_memcpy_reused']:.2f}x)"
            )
        print("eager hand-off (holder exports as its task ends + consumer attaches, no fetch):")
        for size, r in dp.items():
            print(
                f"  {size:>5}: {r['eager_p50_ms']:.2f} ms (export {r['eager_export_p50_ms']:.2f} "
                f"+ attach {r['eager_attach_p50_ms']:.3f}; holder memcpy "
                f"{r['holder_memcpy_reused_p50_ms']:.2f})  tcp/eager "
                f"{r['tcp_time_over_eager']:.2f}x  fetch-shm/eager "
                f"{r['fetch_shm_time_over_eager']:.2f}x  eager/memcpy fresh "
                f"{r['eager_time_over_memcpy_fresh']:.2f}x, reused "
                f"{r['eager_time_over_memcpy_reused']:.2f}x"
            )
    if not args.skip_control:
        cp = control_plane(args.requests, args.devices, policy=args.policy)
        out["control_plane"] = cp
        print(
            f"control plane: {cp['completed']}/{cp['requests']} requests in {cp['wall_s']:.2f}s on "
            f"{cp['devices']} zero-time sim devices ({cp['policy']}): {cp['stage_dispatches_per_s']:.0f} stage dispatches/s "
            f"({cp['requests_per_s']:.0f} requests/s)"
        )
        print(
            f"  scheduler CPU: {cp['scheduler_cpu_us_per_dispatch']:.0f} us per dispatch -> "
            f"{cp['scheduler_ceiling_dispatches_per_s']:.0f} dispatches/s on a core of its own"
        )
    out["machine"]["load_avg_after"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
