"""CUDA IPC hand-off between two processes on one GPU (``trident.runtime.shm``).

    python bench/gpu/ipc_check.py --out bench/results/gpu/ipc.json

A producer process puts 4 MB and 64 MB tensors on ``cuda:0`` and describes them with
:func:`trident.runtime.shm.cuda_ipc_export` (what a worker attaches to a kept output);
a consumer process opens them with :func:`trident.runtime.shm.cuda_ipc_import` (a copy
onto its own device), checks every element, and times the import against a plain
device-to-device copy of the same bytes in its own memory. Both processes see the same
GPU, so this is the same-GPU case; workers on different GPUs of one node need to see
each other's devices (docs/runtime.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

SIZES_MB = (4, 64)
REPEATS = 20


def _producer(conn: Any) -> None:
    import torch

    from trident.runtime.shm import cuda_ipc_export

    dev = torch.device("cuda:0")
    tensors = {}
    for mb in SIZES_MB:
        g = torch.Generator(device=dev).manual_seed(mb)
        tensors[f"t{mb}"] = torch.randn(mb * 2**20 // 4, generator=g, device=dev)
    torch.cuda.synchronize()
    conn.send(
        {
            name: (cuda_ipc_export({name: t}), float(t.double().sum().item()))
            for name, t in tensors.items()
        }
    )
    conn.recv()  # keep the tensors alive until the consumer is done
    conn.close()


def _consumer(conn: Any, out: Any) -> None:
    import torch

    from trident.runtime.shm import cuda_ipc_import

    dev = torch.device("cuda:0")
    described = conn.recv()
    result: dict[str, Any] = {"sizes": {}}
    for name, (handles, checksum) in described.items():
        t0 = time.perf_counter()
        first = cuda_ipc_import(handles, dev)[name]
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        exact = abs(float(first.double().sum().item()) - checksum) == 0.0
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            cuda_ipc_import(handles, dev)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        local = torch.empty_like(first)
        copies = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            local.copy_(first)
            torch.cuda.synchronize()
            copies.append(time.perf_counter() - t0)
        times.sort()
        copies.sort()
        nbytes = first.numel() * first.element_size()
        result["sizes"][name] = {
            "bytes": nbytes,
            "checksum_equal": exact,
            "first_import_ms": round(first_s * 1e3, 3),
            "import_median_ms": round(times[len(times) // 2] * 1e3, 4),
            "d2d_copy_median_ms": round(copies[len(copies) // 2] * 1e3, 4),
        }
    result["device_name"] = torch.cuda.get_device_name(dev)
    conn.send("done")
    out.send(result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/gpu/ipc.json")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    res_r, res_w = ctx.Pipe(duplex=False)
    prod = ctx.Process(target=_producer, args=(a,))
    cons = ctx.Process(target=_consumer, args=(b, res_w))
    prod.start()
    cons.start()
    ok = res_r.poll(120)
    result: dict[str, Any] = res_r.recv() if ok else {"error": "consumer gave no result in 120 s"}
    for proc in (cons, prod):
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    result["command"] = "python bench/gpu/ipc_check.py"
    result["exitcodes"] = {"producer": prod.exitcode, "consumer": cons.exitcode}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    sizes = result.get("sizes", {})
    return 0 if sizes and all(s["checksum_equal"] for s in sizes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
