"""Per-chunk overhead of a resumed diffuse on CPU (docs/planner.md "Preemption"):
tiny flux, 8 steps, one call against two chunks with the state through the wire codec.

    python bench/chunk_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

from trident.pipelines import open_pipeline
from trident.pipelines.tiny import make_tiny_model
from trident.runtime.serial import pack_tensors, unpack_tensors

STEPS = 8
REPEATS = 15


def _wire(tensors: dict[str, Any]) -> dict[str, Any]:
    meta, frames = pack_tensors(tensors)
    return unpack_tensors(meta, [bytes(f) for f in frames])


def main() -> None:
    torch.set_num_threads(1)
    model = make_tiny_model("flux", tempfile.mkdtemp() + "/flux", seed=0)
    stages = open_pipeline(model)
    params = {"prompt": "fox", "num_inference_steps": STEPS, "height": 32, "width": 32}
    emb = stages.run("encode", {}, params)
    whole, chunked = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        stages.run("diffuse", emb, params)
        whole.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state = _wire(stages.run("diffuse", emb, params, {"diffuse_steps": [0, STEPS // 2]}))
        stages.run("diffuse", state, params, {"diffuse_steps": [STEPS // 2, None]})
        chunked.append(time.perf_counter() - t0)
    w, c = statistics.median(whole), statistics.median(chunked)
    print(
        f"whole {w * 1e3:.1f} ms, two chunks {c * 1e3:.1f} ms: overhead per extra chunk "
        f"{(c - w) * 1e3:.1f} ms, per step {w / STEPS * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
