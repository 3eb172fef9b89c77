"""``trident profile``: per-stage latency and peak memory of a pipeline on a real device.

    trident profile --model DIR --device cpu|cuda --shapes 64x64,64x64x5 \\
        --degrees 1,2 [--batch-sizes 1,2,4] --steps N [--repeats 3] [--warmup 1] \\
        [--dtype float32] --out FILE

For each shape (``HxW`` or ``HxWxF``) it runs encode, diffuse and decode through the same
stage adapters the workers use (:func:`trident.pipelines.open_pipeline`), ``warmup``
untimed runs then ``repeats`` timed ones, and records the median seconds. Degree ``k > 1``
applies to diffuse only: ``k`` processes are spawned, form a group
(:func:`trident.pipelines.parallel.join_group`) and run the stage together; rank 0's time
is recorded, and the peak of the most loaded rank. Batch sizes ``b > 1`` (image families,
degree 1) also measure one batched diffuse call of ``b`` same-shape requests
(:meth:`~trident.pipelines.api.PipelineStages.run_batch`, members differing in seed).

Peak memory (``peak_bytes``), beyond the resident weights:

- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the run (the
  caching allocator's reserve is not counted), max over all runs;
- CPU: resident set size sampled every ~2 ms on a thread during the run, minus the RSS
  just before it (after ``malloc_trim(0)``, so pages freed by earlier runs are not
  silently reused), max over all runs, warm-up included. An estimate, good to a few MB
  (a burst shorter than the sampling period can be missed): what the cost model needs
  for "does this fit", not an allocator trace.

``weights_bytes`` per stage: bytes of the parameters and buffers of the stage's
components once loaded at ``dtype`` (what the device holds, not the files on disk).

Output (read by :func:`trident.sched.cost.read_profile`)::

    {"format": "trident-profile/1", "device": "cpu" | "<cuda device name>",
     "dtype": "float32", "family": "flux", "model": "<dir basename>", "created": "<iso>",
     "command": "<argv>", "weights_bytes": {"encode": int, "diffuse": int, "decode": int},
     "entries": [{"stage", "height", "width", "num_frames", "num_inference_steps",
                  "degree", "seconds", "peak_bytes", "repeats"} (+ "seconds_per_step"
                  for diffuse; + "batch" for batched diffuse calls)]}

Images have ``num_frames`` 1. ``seconds`` is the whole stage (all steps for diffuse); for
an entry with ``"batch": b`` it is the whole batched call's (all ``b`` members), and
``peak_bytes`` that call's peak. Entries without ``batch`` are single requests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import queue
import shlex
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from trident.cliformat import DefaultsHelpFormatter
from trident.pipelines.api import ModelMeta

__all__ = [
    "PROFILE_FORMAT",
    "build_parser",
    "main",
    "parse_shape",
    "parse_shapes",
    "run_profile",
    "validate_profile",
]

PROFILE_FORMAT = "trident-profile/1"
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE_PROMPT = "blurry, low quality"
SEED = 0
STAGES = ("encode", "diffuse", "decode")
_ENTRY_KEYS: dict[str, type | tuple[type, ...]] = {
    "stage": str,
    "height": int,
    "width": int,
    "num_frames": int,
    "num_inference_steps": int,
    "degree": int,
    "seconds": (int, float),
    "peak_bytes": int,
    "repeats": int,
}

Shape = tuple[int, int, int | None]  # height, width, frames (None: image / default)


# ------------------------------------------------------------------------- parsing


def parse_shape(text: str) -> Shape:
    """``"64x64"`` -> ``(64, 64, None)``; ``"64x64x5"`` -> ``(64, 64, 5)``."""
    parts = text.strip().lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected HxW or HxWxF") from None
    if len(nums) not in (2, 3) or any(n <= 0 for n in nums):
        raise ValueError(f"bad shape {text!r}: expected HxW or HxWxF with positive numbers")
    return (nums[0], nums[1], nums[2] if len(nums) == 3 else None)


def parse_shapes(text: str) -> list[Shape]:
    return [parse_shape(s) for s in text.split(",") if s.strip()]


def _parse_degrees(text: str) -> list[int]:
    degrees = sorted({int(d) for d in text.split(",") if d.strip()})
    if not degrees or degrees[0] < 1:
        raise ValueError(f"bad degrees {text!r}")
    return degrees


def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"bad batch sizes {text!r}: expected e.g. 1,2,4") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"bad batch sizes {text!r}: expected positive integers")
    return sizes


# ------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the lifetime peak is the best there is
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so the next RSS delta sees the run's
    own allocations instead of reusing pages an earlier run left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def _peak_meter(device: str) -> Iterator[list[int]]:
    """Yields a one-element list that holds the peak bytes above the start once done."""
    import torch

    box = [0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            yield box
        finally:
            torch.cuda.synchronize()
            box[0] = max(0, torch.cuda.max_memory_allocated() - base)
        return
    _malloc_trim()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box[0] = max(0, max(peak[0], _rss_bytes()) - base)


def _stage_weight_bytes(stages: Any, stage: str) -> int:
    import torch

    pipe = stages._pipe(stage)
    total = 0
    seen: set[int] = set()
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for t in (*component.parameters(), *component.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------- running


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _measure(
    fn: Callable[[], Any], device: str, repeats: int, warmup: int, barrier: Callable[[], None]
) -> tuple[float, int, Any]:
    """(median seconds of the timed runs, max peak bytes of all runs, last result)."""
    times: list[float] = []
    peak = 0
    result: Any = None
    for i in range(warmup + repeats):
        barrier()
        with _peak_meter(device) as box:
            t0 = time.perf_counter()
            result = fn()
            _sync(device)
            elapsed = time.perf_counter() - t0
        peak = max(peak, box[0])
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times), peak, result


def _request_params(meta: ModelMeta, shape: Shape, steps: int) -> dict[str, Any]:
    height, width, frames = shape
    params: dict[str, Any] = {
        "prompt": PROMPT,
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        "guidance_scale": meta.default_guidance_scale,
        "seed": SEED,
    }
    if meta.uses_cfg:
        params["negative_prompt"] = NEGATIVE_PROMPT
    if meta.is_video:
        params["num_frames"] = frames if frames is not None else meta.default_num_frames
    elif frames not in (None, 1):
        raise ValueError(f"{meta.family} makes images: shape {height}x{width}x{frames} has frames")
    return params


def _entry(
    stage: str,
    params: Mapping[str, Any],
    degree: int,
    seconds: float,
    peak: int,
    repeats: int,
    batch: int = 1,
) -> dict[str, Any]:
    steps = int(params["num_inference_steps"])
    entry: dict[str, Any] = {
        "stage": stage,
        "height": int(params["height"]),
        "width": int(params["width"]),
        "num_frames": int(params.get("num_frames") or 1),
        "num_inference_steps": steps,
        "degree": degree,
        "seconds": float(seconds),
        "peak_bytes": int(peak),
        "repeats": repeats,
    }
    if stage == "diffuse":
        entry["seconds_per_step"] = float(seconds) / max(1, steps)
    if batch > 1:
        entry["batch"] = batch
    return entry


def _degree_unsupported(meta: ModelMeta, k: int) -> str | None:
    if meta.context_parallel:
        return None
    if meta.uses_cfg and meta.default_guidance_scale > 1:
        # cond/uncond halves: one request's batch is 2.
        return None if k == 2 else f"CFG-parallel splits a batch of 2: degree {k} unsupported"
    return "no context-parallel plan and no classifier-free guidance"


def _parallel_worker(
    q: Any,
    rank: int,
    world: int,
    rendezvous: str,
    model_dir: str,
    device: str,
    dtype_name: str,
    params: dict[str, Any],
    repeats: int,
    warmup: int,
) -> None:
    """One rank of a degree-``world`` diffuse profile (runs in a spawned process)."""
    try:
        import torch
        import torch.distributed as dist

        from trident.pipelines import open_pipeline
        from trident.pipelines.parallel import join_group, leave_group

        if device.startswith("cuda"):
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        stages = open_pipeline(model_dir, device=device, dtype=getattr(torch, dtype_name))
        stages.load("diffuse")
        emb = None
        if rank == 0:
            stages.load("encode")
            emb = stages.run("encode", {}, params)
            stages.unload("encode")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        ctx = join_group(rendezvous, "profile", rank, world, backend)
        try:

            def barrier() -> None:
                dist.barrier(group=ctx.group)

            seconds, peak, _ = _measure(
                partial(stages.run, "diffuse", emb, params, parallel=ctx),
                device,
                repeats,
                warmup,
                barrier,
            )
        finally:
            leave_group(ctx)
        q.put((rank, (seconds, peak)))
    except BaseException:
        q.put((rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_parallel(
    model_dir: str,
    device: str,
    dtype_name: str,
    params: dict[str, Any],
    k: int,
    repeats: int,
    warmup: int,
) -> tuple[float, int]:
    """(rank 0's median seconds, the highest rank's peak) of diffuse at degree ``k``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        ctx.Process(
            target=_parallel_worker,
            args=(q, r, k, rendezvous, model_dir, device, dtype_name, params, repeats, warmup),
            daemon=True,
        )
        for r in range(k)
    ]
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        while len(results) < k:
            try:
                rank, res = q.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"degree-{k} profile: a rank exited with code {dead[0].exitcode}"
                    ) from None
                continue
            if isinstance(res, str):
                raise RuntimeError(f"degree-{k} profile, rank {rank} failed:\n{res}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        q.close()
        q.join_thread()
    return results[0][0], max(peak for _, peak in results.values())


def run_profile(
    model_dir: str | Path,
    device: str,
    shapes: Iterable[Shape | str],
    degrees: Iterable[int],
    repeats: int = 3,
    warmup: int = 1,
    out: str | Path | None = None,
    *,
    steps: int | None = None,
    dtype: str = "float32",
    command: str = "",
    log: Callable[[str], None] | None = None,
    batch_sizes: Iterable[int] = (1,),
    decode_options: Mapping[str, Any] | None = None,
    stages: Any = None,
) -> dict[str, Any]:
    """Profile ``model_dir`` on ``device``; returns the document and writes it to ``out``.

    ``shapes``: ``(height, width, frames | None)`` or ``"HxW[xF]"`` strings. ``degrees``
    apply to diffuse; degree 1 is always measured. Degrees a family cannot run (no
    context-parallel plan and no CFG; CFG-parallel at k != 2) are skipped with a note to
    ``log``. ``steps`` defaults to the model's default step count. ``batch_sizes`` > 1
    add batched diffuse calls at degree 1 (image families; video ones are skipped with a
    note: the stage contract batches images only). ``decode_options`` go to every decode
    call (e.g. ``{"vae_tiling": True}``) and into the document. ``stages``: an already
    opened :func:`~trident.pipelines.open_pipeline` of ``model_dir`` at ``device`` and
    ``dtype`` to reuse (its stages are loaded if they are not), e.g. to profile shape by
    shape without reloading the weights.
    """
    import torch

    from trident.pipelines import inspect_model, open_pipeline, validate_request

    say = log or (lambda msg: print(msg, file=sys.stderr))
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    model_dir = str(model_dir)
    meta = inspect_model(model_dir)
    n_steps = steps if steps is not None else meta.default_steps
    shape_list = [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]
    degree_list = sorted({1, *degrees})
    batch_list = sorted({1, *batch_sizes})
    if batch_list[0] < 1:
        raise ValueError(f"batch sizes must be positive, got {batch_list}")
    torch_dtype = getattr(torch, dtype)
    run_device = "cuda:0" if device == "cuda" else device

    if stages is None:
        stages = open_pipeline(model_dir, device=run_device, dtype=torch_dtype)
    for stage in STAGES:
        stages.load(stage)  # type: ignore[arg-type]
    weights = {stage: _stage_weight_bytes(stages, stage) for stage in STAGES}

    def no_barrier() -> None:
        return None

    entries: list[dict[str, Any]] = []
    for shape in shape_list:
        params = _request_params(meta, shape, n_steps)  # type: ignore[arg-type]
        validate_request(
            meta,
            height=params["height"],
            width=params["width"],
            num_frames=params.get("num_frames"),
            num_inference_steps=n_steps,
            guidance_scale=params["guidance_scale"],
        )
        label = f"{params['height']}x{params['width']}" + (
            f"x{params['num_frames']}" if meta.is_video else ""
        )
        sec, peak, emb = _measure(
            partial(stages.run, "encode", {}, params), run_device, repeats, warmup, no_barrier
        )
        entries.append(_entry("encode", params, 1, sec, peak, repeats))
        say(f"{label} encode: {sec:.4f} s, peak {peak / 2**20:.1f} MiB")
        sec, peak, lat = _measure(
            partial(stages.run, "diffuse", emb, params), run_device, repeats, warmup, no_barrier
        )
        entries.append(_entry("diffuse", params, 1, sec, peak, repeats))
        say(f"{label} diffuse k=1: {sec:.4f} s, peak {peak / 2**20:.1f} MiB")
        for b in batch_list[1:]:
            if meta.is_video:
                say(f"{label} diffuse batch={b}: skipped ({meta.family} makes videos)")
                continue
            # Members differ in seed only, as same-shape requests batched by the scheduler.
            members = [{**params, "seed": SEED + i} for i in range(b)]
            sec, peak, _ = _measure(
                partial(stages.run_batch, "diffuse", [emb] * b, members),
                run_device,
                repeats,
                warmup,
                no_barrier,
            )
            entries.append(_entry("diffuse", params, 1, sec, peak, repeats, batch=b))
            say(f"{label} diffuse batch={b}: {sec:.4f} s, peak {peak / 2**20:.1f} MiB")
        sec, peak, _ = _measure(
            partial(stages.run, "decode", lat, params, dict(decode_options or {})),
            run_device,
            repeats,
            warmup,
            no_barrier,
        )
        entries.append(_entry("decode", params, 1, sec, peak, repeats))
        say(f"{label} decode: {sec:.4f} s, peak {peak / 2**20:.1f} MiB")
        for k in degree_list:
            if k == 1:
                continue
            why = _degree_unsupported(meta, k)
            if why:
                say(f"{label} diffuse k={k}: skipped ({meta.family}: {why})")
                continue
            if device.startswith("cuda") and torch.cuda.device_count() < k:
                say(f"{label} diffuse k={k}: skipped (only {torch.cuda.device_count()} GPUs)")
                continue
            sec, peak = _run_parallel(model_dir, device, dtype, params, k, repeats, warmup)
            entries.append(_entry("diffuse", params, k, sec, peak, repeats))
            say(f"{label} diffuse k={k}: {sec:.4f} s, peak {peak / 2**20:.1f} MiB")

    cuda = run_device.startswith("cuda")
    device_name = torch.cuda.get_device_name(run_device) if cuda else "cpu"
    doc: dict[str, Any] = {
        "format": PROFILE_FORMAT,
        "device": device_name,
        "dtype": dtype,
        "family": meta.family,
        "model": Path(model_dir).resolve().name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "weights_bytes": weights,
        "entries": entries,
    }
    if decode_options:
        doc["decode_options"] = dict(decode_options)
    validate_profile(doc)
    if out is not None:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out_path)
    return doc


# ------------------------------------------------------------------------- schema


def validate_profile(doc: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``doc`` is a well-formed ``trident-profile/1`` document."""
    if doc.get("format") != PROFILE_FORMAT:
        raise ValueError(f"format must be {PROFILE_FORMAT!r}, got {doc.get('format')!r}")
    for key in ("device", "dtype", "family", "model", "created", "command"):
        if not isinstance(doc.get(key), str):
            raise ValueError(f"{key!r} must be a string")
    wb = doc.get("weights_bytes")
    if not isinstance(wb, Mapping) or set(wb) != set(STAGES):
        raise ValueError(f"weights_bytes must map exactly {STAGES} to byte counts")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in wb.values()):
        raise ValueError("weights_bytes values must be non-negative integers")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise ValueError("entries must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            raise ValueError(f"entries[{i}] must be an object")
        for key, typ in _ENTRY_KEYS.items():
            value = e.get(key)
            if not isinstance(value, typ) or isinstance(value, bool):
                raise ValueError(f"entries[{i}].{key} must be {typ}, got {value!r}")
        if e["stage"] not in STAGES:
            raise ValueError(f"entries[{i}].stage must be one of {STAGES}")
        if e["stage"] != "diffuse" and e["degree"] != 1:
            raise ValueError(f"entries[{i}]: only diffuse runs at degree > 1")
        if min(e["height"], e["width"], e["num_frames"], e["num_inference_steps"]) < 1:
            raise ValueError(f"entries[{i}]: sizes and steps must be positive")
        if e["degree"] < 1 or e["repeats"] < 1 or e["seconds"] < 0 or e["peak_bytes"] < 0:
            raise ValueError(f"entries[{i}]: degree/repeats >= 1, seconds/peak_bytes >= 0")
        if e["stage"] == "diffuse" and not isinstance(e.get("seconds_per_step"), (int, float)):
            raise ValueError(f"entries[{i}]: diffuse entries carry seconds_per_step")
        if "batch" in e:
            batch = e["batch"]
            if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
                raise ValueError(f"entries[{i}].batch must be a positive integer, got {batch!r}")
            if batch > 1 and e["stage"] != "diffuse":
                raise ValueError(
                    f"entries[{i}]: only diffuse runs batched (encode/decode run member by member)"
                )


# ------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """``trident profile``'s command line."""
    parser = argparse.ArgumentParser(
        prog="trident profile",
        description="Measure per-stage latency and peak memory of a diffusers pipeline.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="local diffusers directory (required)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes", required=True, help="comma-separated HxW or HxWxF (required)")
    parser.add_argument("--degrees", default="1", help="diffuse degrees, e.g. 1,2,4")
    parser.add_argument(
        "--batch-sizes",
        default="1",
        help="diffuse batch sizes, e.g. 1,2,4 (image families, degree 1)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the model's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights and activations dtype",
    )
    parser.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode with VAE tiling (large videos; recorded as decode_options)",
    )
    parser.add_argument("--out", required=True, help="output JSON file (required)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``trident profile --model DIR --device cpu|cuda --shapes ... --out FILE``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        shapes = parse_shapes(args.shapes)
        degrees = _parse_degrees(args.degrees)
        batch_sizes = _parse_batch_sizes(args.batch_sizes)
    except ValueError as e:
        parser.error(str(e))
    run_profile(
        args.model,
        args.device,
        shapes,
        degrees,
        repeats=args.repeats,
        warmup=args.warmup,
        out=args.out,
        steps=args.steps,
        dtype=args.dtype,
        command=shlex.join(["trident", "profile", *args_list]),
        batch_sizes=batch_sizes,
        decode_options={"vae_tiling": True} if args.vae_tiling else None,
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
