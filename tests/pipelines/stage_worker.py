"""A stand-in worker process for the cross-process test: runs stages, tensors via files.

``python -m tests.pipelines.stage_worker JOBS.json`` runs each job
``{"model", "stage", "params", "threads", "inputs": path | null, "outputs": path}``.
Tensors travel as the runtime sends them (:mod:`trident.runtime.serial`: a JSON-able header
plus one raw frame per tensor), here written to a file: 8-byte header length, header, frames.
No pickle anywhere.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["main", "read_tensors", "write_tensors"]


def write_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    from trident.runtime.serial import pack_tensors

    meta, frames = pack_tensors(tensors)
    views = [memoryview(f).cast("B") for f in frames]
    header = json.dumps({"meta": meta, "sizes": [v.nbytes for v in views]}).encode()
    with path.open("wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for v in views:
            f.write(v)


def read_tensors(path: Path) -> dict[str, Any]:
    from trident.runtime.serial import unpack_tensors

    data = memoryview(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + n]))
    frames, pos = [], 8 + n
    for size in header["sizes"]:
        frames.append(data[pos : pos + size])
        pos += size
    return unpack_tensors(header["meta"], frames, as_torch=True)


def main(argv: list[str]) -> int:
    import torch

    from trident.pipelines import open_pipeline

    jobs = json.loads(Path(argv[0]).read_text())
    for job in jobs:
        torch.set_num_threads(int(job["threads"]))  # same as the reference: bit-exact
        stages = open_pipeline(job["model"])
        inputs = read_tensors(Path(job["inputs"])) if job["inputs"] else {}
        out = stages.run(job["stage"], inputs, job["params"])
        write_tensors(Path(job["outputs"]), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
