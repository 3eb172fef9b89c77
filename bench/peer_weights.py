"""Stage weight load seconds by source on this machine: disk (page cache) vs a peer's
shared copy (docs/runtime.md "Peer weight copies", issue #12 item 4).

Builds a tiny Wan pipeline whose transformer is replaced by the full-size
Wan2.1-T2V-1.3B transformer (bench/gpu/configs/wan/transformer, random bfloat16
weights, 2.8 GB), then in three processes, as three devices of one node:

1. the publisher loads ``diffuse`` from the directory (its first read) and publishes it;
2. a second device loads it from the directory again (the OS page cache: what every
   load did before peer copies) with peer sharing off;
3. a third loads it with source ``peer`` (maps the publisher's file).

Each load is timed inside its process (``TorchExecutor.load``), then a first touch of
every weight (one pass summing them: a CPU load may map a file lazily, so the pages
come in at first use), and the PSS the process gained (proportional: pages shared with
other processes count by share). Twice: served in the stored bfloat16, and in float32
(converted at load). Usage::

    python bench/peer_weights.py --json bench/results/peer_weights.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build(work: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.gpu.build import component_configs, instantiate, on_device
    from trident.pipelines.tiny import make_tiny_model

    model = make_tiny_model("wan", work / "wan", seed=0)
    cfg = component_configs("wan")["transformer"]
    with on_device("cpu", torch.bfloat16), torch.no_grad():
        module = instantiate(cfg)
    target = model / "transformer"
    for f in target.iterdir():
        f.unlink()
    module.save_pretrained(target, safe_serialization=True, max_shard_size="50GB")
    return model


def _pss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def role(kind: str, model: str, index: int, shm: str, dtype: str) -> None:
    """One device: load diffuse as ``kind`` says, touch every weight once (what a first
    step does), print a JSON line, and (the publisher) wait for stdin to close."""
    import torch

    torch.set_num_threads(1)
    from trident.runtime.devices import TorchExecutor
    from trident.runtime.peerweights import PeerWeights

    peers = None if kind == "page-cache" else PeerWeights("bench", index, os.getpid(), Path(shm))
    ex = TorchExecutor(
        {"w": {"family": "wan", "path": model, "dtype": dtype}}, "cpu", threads=1, peers=peers
    )
    # Not part of a load: the pipeline object and diffusers' lazy imports (a first
    # from_pretrained), paid here on the small VAE.
    ex.load("w", "decode", "disk")
    ex.flush()
    pss0 = _pss()
    secs, source = ex.load("w", "diffuse", "peer" if kind == "peer" else "disk")
    t1 = time.perf_counter()
    pipe = ex.pipes["w"]
    with torch.no_grad():
        total = sum(float(t.sum()) for t in pipe.stage_tensors("diffuse").tensors.values())
    touch = time.perf_counter() - t1
    t2 = time.perf_counter()
    ex.flush()  # the publisher's background copy (and its switch to it)
    publish = time.perf_counter() - t2
    print(
        json.dumps(
            {
                "role": kind,
                "dtype": dtype,
                "source": source,
                "load_s": round(secs, 4),
                "first_touch_s": round(touch, 4),
                "publish_wait_s": round(publish, 4) if kind == "publisher" else None,
                "pss_added_bytes": _pss() - pss0,
                "checksum": total,
            }
        ),
        flush=True,
    )
    if kind == "publisher":
        sys.stdin.read()
    ex.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--shm", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        role(args.role, args.model, args.index, args.shm, args.dtype)
        return 0
    with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        t0 = time.perf_counter()
        model = build(Path(work))
        built = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (model / "transformer").glob("*.safetensors"))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        rows: list[dict[str, Any]] = []
        # bfloat16: served as stored (a page-cache load maps the file lazily); float32:
        # converted at load (every page-cache load converts, into private memory).
        for dtype in ("bfloat16", "float32"):
            cmd = [sys.executable, __file__, "--model", str(model), "--shm", shm, "--dtype", dtype]
            pub = subprocess.Popen(
                [*cmd, "--role", "publisher", "--index", "0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            assert pub.stdout is not None
            rows.append(json.loads(pub.stdout.readline()))
            for i, kind in enumerate(("page-cache", "peer"), start=1):
                out = subprocess.run(
                    [*cmd, "--role", kind, "--index", str(i)],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            pub.communicate("")
    result = {
        "command": "python bench/peer_weights.py" + (f" --json {args.json}" if args.json else ""),
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "stage": "wan diffuse (Wan2.1-T2V-1.3B transformer, random bfloat16 weights)",
        "weight_bytes": size,
        "build_s": round(built, 1),
        "loads": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
