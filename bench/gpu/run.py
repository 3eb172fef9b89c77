"""GPU acceptance run: full-size random-weight pipelines, profiled and served end to end.

    python bench/gpu/run.py                        # one H100/H200: <= 10 minutes
    python bench/gpu/run.py --device cpu --tiny    # the same steps, tiny models, CPU

For each family (sd3, flux, cogvideox, wan, hunyuanvideo, cheapest first), one after the
other so that at most one full-size model is on disk at a time:

1. **build**: the published architecture from ``bench/gpu/configs/<family>/`` with random
   weights, built on the device in bfloat16 and written with ``save_pretrained``
   (:mod:`build`); ``--tiny``: :func:`trident.pipelines.tiny.make_tiny_model`.
2. **profile**: encode, diffuse and decode through :func:`trident.pipelines.profile.run_profile`
   (what ``trident profile`` runs) at the cost model's reference-table shapes, shape by
   shape on one loaded pipeline, cheapest first; a shape whose predicted time (the
   reference cost model scaled by the speed measured so far) would overrun the family's
   profile budget is skipped and listed. Written as ``profile-<family>.json``
   (``trident-profile/1``, loadable by ``trident-scheduler --profile``).
3. **serve**: a real ``trident-scheduler`` and one ``trident-node --devices cuda:0``
   (:class:`trident.bench.cluster.LocalCluster`), a few requests one after the other
   through the SDK; per-stage latency from each result's ``timings``. (``--tiny``: the
   tiny models all fit on disk, so one cluster serves all five after they are profiled.)

Results: ``results.json`` (everything, with device name and versions) and ``summary.md``
in ``--out`` (default ``bench/results/gpu/``; ``--tiny``: ``bench/results/gpu-cpu-tiny/``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import gc
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import build  # noqa: E402

FAMILY_ORDER = ("sd3", "flux", "cogvideox", "wan", "hunyuanvideo")
PROMPT = "a red fox running through fresh snow, golden hour"

Shape = tuple[int, int, int]  # height, width, frames (1: image)


@dataclasses.dataclass(frozen=True)
class Plan:
    profile_shapes: tuple[Shape, ...]
    profile_steps: int
    profile_budget_s: float
    serve_shape: Shape
    serve_steps: int
    requests: int


def reference_shapes(family: str) -> list[Shape]:
    """The shapes of the cost model's reference table for ``family``
    (``trident/sched/data/diffuse_step_seconds.csv``). Wan has no row there (the cost model
    scales HunyuanVideo's, same VAE and patch): it is profiled at HunyuanVideo's shapes."""
    text = resources.files("trident.sched").joinpath("data/diffuse_step_seconds.csv")
    rows = [ln for ln in text.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    row_family = "hunyuanvideo" if family == "wan" else family
    return [
        (int(r["height"]), int(r["width"]), int(r["frames"]))
        for r in csv.DictReader(io.StringIO("\n".join(rows)))
        if r["model"] == row_family
    ]


def full_plans() -> dict[str, Plan]:
    # Budgets (seconds of profiling per family) sum to 300 s; see README.md.
    return {
        "sd3": Plan(tuple(reference_shapes("sd3")), 4, 25, (1024, 1024, 1), 28, 3),
        "flux": Plan(tuple(reference_shapes("flux")), 2, 70, (1024, 1024, 1), 28, 3),
        "cogvideox": Plan(tuple(reference_shapes("cogvideox")), 1, 70, (768, 1360, 17), 10, 2),
        "wan": Plan(tuple(reference_shapes("wan")), 1, 45, (480, 832, 33), 20, 2),
        "hunyuanvideo": Plan(tuple(reference_shapes("hunyuanvideo")), 1, 90, (544, 960, 33), 10, 2),
    }


def tiny_plans() -> dict[str, Plan]:
    from trident.pipelines.tiny import TINY_SHAPES

    out = {}
    for fam in FAMILY_ORDER:
        s = TINY_SHAPES[fam]
        frames = 9 if fam == "cogvideox" else s.get("num_frames", 1)
        base = (s["height"], s["width"], frames)
        out[fam] = Plan((base, (48, 48, frames)), 2, 60, base, 2, 2)
    return out


def is_video(family: str) -> bool:
    from trident.families import FAMILIES

    return FAMILIES[family].is_video


# ------------------------------------------------------------------------- environment


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    import trident

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "trident": getattr(trident, "__version__", "unknown"),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        env["git_commit"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            device_name=torch.cuda.get_device_name(0),
            device_memory_bytes=int(props.total_memory),
            device_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env["device_name"] = "cpu"
    return env


# ------------------------------------------------------------------------- steps


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def say(msg: str) -> None:
    print(f"[gpu-acceptance] {msg}", file=sys.stderr, flush=True)


def step_build(family: str, work: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    out = work / family
    t0 = time.perf_counter()
    if args.tiny:
        from trident.pipelines.tiny import make_tiny_model

        if out.exists():
            shutil.rmtree(out)
        make_tiny_model(family, out, seed=0)
        record: dict[str, Any] = {"family": family, "tiny": True}
        record["bytes"] = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    else:
        record = build.build_pipeline(
            family, out, device=args.device, dtype=args.dtype, shared_dir=work / "_shared"
        )
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return out, record


def _predicted_seconds(family: str, shape: Shape, steps: int) -> float:
    """The reference cost model's encode + diffuse + decode seconds (speed-1.0 device)."""
    from trident.families import FAMILIES
    from trident.sched.cost import ReferenceCostModel
    from trident.sched.types import Shape as CostShape

    cost = ReferenceCostModel()
    s = CostShape(shape[0], shape[1], shape[2], steps, cfg=FAMILIES[family].uses_cfg)
    return sum(cost.stage_seconds(family, st, s, 1) for st in ("encode", "diffuse", "decode"))


def step_profile(
    family: str, model_dir: Path, plan: Plan, args: argparse.Namespace, out_dir: Path
) -> dict[str, Any]:
    import torch

    from trident.pipelines import open_pipeline
    from trident.pipelines.profile import run_profile, validate_profile
    from trident.sched.cost import ReferenceCostModel, read_profile

    dtype = args.dtype
    run_device = "cuda:0" if args.device == "cuda" else "cpu"
    t0 = time.perf_counter()
    stages = open_pipeline(str(model_dir), device=run_device, dtype=getattr(torch, dtype))
    for st in ("encode", "diffuse", "decode"):
        stages.load(st)
    load_s = time.perf_counter() - t0
    say(f"{family}: profile pipeline loaded in {load_s:.1f} s")
    decode_options = {"vae_tiling": True} if is_video(family) else None
    shapes = sorted(plan.profile_shapes, key=lambda s: _predicted_seconds(family, s, 1))
    # Measured / reference seconds so far; before any measurement assume a device
    # `assumed_speed` times the reference device (NVIDIA L20).
    ratio_num, ratio_den = 0.0, 0.0
    spent = 0.0
    doc: dict[str, Any] | None = None
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    command = (
        f"trident profile --model {model_dir} --device {args.device} --dtype {dtype} "
        f"--steps {plan.profile_steps} --repeats 1 --warmup 1(first shape)/0"
        + (" --vae-tiling" if decode_options else "")
    )
    for i, shape in enumerate(shapes):
        predicted_ref = _predicted_seconds(family, shape, plan.profile_steps)
        ratio = ratio_num / ratio_den if ratio_den > 0 else 1.0 / args.assumed_speed
        warmup = 1 if i == 0 else 0
        predicted = predicted_ref * ratio * (1 + warmup)
        label = "x".join(map(str, shape))
        if not args.tiny and spent + predicted > plan.profile_budget_s:
            say(
                f"{family} {label}: skipped (predicted {predicted:.1f} s, budget left "
                f"{plan.profile_budget_s - spent:.1f} s)"
            )
            skipped.append({"shape": label, "predicted_s": round(predicted, 2)})
            continue
        frames = shape[2] if is_video(family) else None
        t1 = time.perf_counter()
        try:
            part = run_profile(
                str(model_dir),
                args.device,
                [(shape[0], shape[1], frames)],
                [1],
                repeats=1,
                warmup=warmup,
                out=None,
                steps=plan.profile_steps,
                dtype=dtype,
                command=command,
                log=say,
                decode_options=decode_options,
                stages=stages,
            )
        except Exception as e:  # an OOM at one shape must not cost the others
            say(f"{family} {label}: FAILED {type(e).__name__}: {e}")
            skipped.append({"shape": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            if run_device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        took = time.perf_counter() - t1
        spent += took
        if i > 0 or len(shapes) == 1:
            ratio_num += took
            ratio_den += predicted_ref
        elif ratio_den == 0:
            ratio_num, ratio_den = took / 2, predicted_ref  # warm-up doubled the first
        done.append({"shape": label, "seconds": round(took, 3)})
        if doc is None:
            doc = part
        else:
            doc["entries"].extend(part["entries"])
    del stages
    gc.collect()
    if run_device.startswith("cuda"):
        torch.cuda.empty_cache()
    result: dict[str, Any] = {
        "load_seconds": round(load_s, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "steps": plan.profile_steps,
        "decode_options": decode_options or {},
        "shapes_done": done,
        "shapes_skipped": skipped,
        "speed_vs_reference": round(ratio_den / ratio_num, 3) if ratio_num > 0 else None,
    }
    if doc is not None:
        validate_profile(doc)
        path = out_dir / f"profile-{family}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        ReferenceCostModel().add_profile(read_profile(path))  # the scheduler can read it
        result["file"] = path.name
        result["weights_bytes"] = doc["weights_bytes"]
        result["entries"] = doc["entries"]
    return result


def step_serve(
    models: dict[str, Path], plans: dict[str, Plan], args: argparse.Namespace, log_dir: Path
) -> dict[str, dict[str, Any]]:
    """One scheduler and one node serving ``models``; each family's requests one after
    the other. Returns family -> record (the cluster's startup shared by all)."""
    from trident.bench.cluster import LocalCluster, NodeSpec
    from trident.client import Client

    devices = "cuda:0" if args.device == "cuda" else "cpu:1"
    node = NodeSpec(devices, node_id="n0", threads=1 if args.device == "cpu" else None)
    t0 = time.perf_counter()
    cluster = LocalCluster(
        [f"{fam}={d}" for fam, d in models.items()], [node], log_dir=log_dir, startup_timeout=180
    )
    out: dict[str, dict[str, Any]] = {}
    with cluster:
        cluster.wait_ready(1, timeout=180)  # NodeSpec("cuda:0").count is 0: wait for it
        startup = time.perf_counter() - t0
        say(f"{', '.join(models)}: scheduler + node ({devices}) up in {startup:.1f} s")
        with Client(cluster.client_addr, timeout=args.request_timeout) as c:
            for family in models:
                plan = plans[family]
                t_fam = time.perf_counter()
                h, w, f = plan.serve_shape
                requests: list[dict[str, Any]] = []
                for i in range(plan.requests):
                    t1 = time.perf_counter()
                    r = c.generate(
                        model=family,
                        prompt=f"{PROMPT} #{i}",
                        height=h,
                        width=w,
                        num_frames=f if is_video(family) else None,
                        num_inference_steps=plan.serve_steps,
                        seed=i,
                        output_type="uint8",
                    )
                    wall = time.perf_counter() - t1
                    requests.append(
                        {
                            "shape": "x".join(map(str, plan.serve_shape)),
                            "steps": plan.serve_steps,
                            "wall_seconds": round(wall, 3),
                            "timings": {k: round(v, 4) for k, v in r.timings.items()},
                            "devices": r.devices,
                            "output_shape": list(r.shape),
                        }
                    )
                    timings = ", ".join(f"{k} {v:.2f}" for k, v in r.timings.items())
                    say(f"{family} request {i}: {timings}")
                out[family] = {
                    "devices": devices,
                    "cluster_models": list(models),
                    "startup_seconds": round(startup, 3),
                    "seconds": round(time.perf_counter() - t_fam, 3),
                    "requests": requests,
                }
    return out


# ------------------------------------------------------------------------- report


def write_summary(results: dict[str, Any], path: Path) -> None:
    env = results["environment"]
    lines = [
        "# GPU acceptance run" + (" (tiny models, CPU)" if results["tiny"] else ""),
        "",
        f"- device: **{env.get('device_name')}**, dtype {results['dtype']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, "
        f"transformers {env['transformers']}, commit {env.get('git_commit')}",
        f"- command: `{results['command']}`",
        f"- total {results['total_seconds']:.1f} s (budget {results['budget_seconds']:.0f} s); "
        f"created {results['created']}",
        "",
        "| family | build s | params | profile s | shapes done / skipped | serve s | "
        "request: encode / diffuse / decode / total s |",
        "|---|---|---|---|---|---|---|",
    ]
    for fam, r in results["families"].items():
        b, p, s = r.get("build", {}), r.get("profile", {}), r.get("serve", {})
        params = b.get("parameters")
        reqs = s.get("requests", [])
        last = reqs[-1]["timings"] if reqs else {}
        req = (
            " / ".join(
                f"{last.get(k, float('nan')):.2f}" for k in ("encode", "diffuse", "decode", "total")
            )
            if last
            else "-"
        )
        lines.append(
            f"| {fam} | {b.get('seconds', '-')} | "
            f"{f'{params / 1e9:.2f}B' if params else 'tiny'} | {p.get('seconds', '-')} | "
            f"{len(p.get('shapes_done', []))} / {len(p.get('shapes_skipped', []))} | "
            f"{s.get('seconds', '-')} | {req} |"
        )
        if r.get("error"):
            lines.append(f"| {fam} | FAILED: {r['error'].splitlines()[-1][:200]} ||||||")
    lines += ["", "Profile entries (seconds; diffuse: whole call at the profile's steps):", ""]
    for fam, r in results["families"].items():
        for e in r.get("profile", {}).get("entries", []):
            lines.append(
                f"- {fam} {e['stage']} {e['height']}x{e['width']}x{e['num_frames']} "
                f"steps {e['num_inference_steps']}: {e['seconds']:.4f} s, "
                f"peak {e['peak_bytes'] / 2**30:.2f} GiB"
            )
        for sk in r.get("profile", {}).get("shapes_skipped", []):
            lines.append(f"- {fam} skipped {sk}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GPU acceptance run (see bench/gpu/README.md)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny random-weight models (CPU test)")
    p.add_argument("--families", default=",".join(FAMILY_ORDER))
    p.add_argument("--out", default=None, help="results directory")
    p.add_argument("--work-dir", default=None, help="where models are written (deleted after)")
    p.add_argument("--keep-models", action="store_true", help="do not delete the models")
    p.add_argument("--dtype", default=None, help="default: bfloat16 (cuda), float32 (cpu)")
    p.add_argument("--budget-s", type=float, default=600.0, help="whole-run budget")
    p.add_argument(
        "--assumed-speed",
        type=float,
        default=3.0,
        help="device speed vs the reference L20 assumed before the first measurement",
    )
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument(
        "--profile-scale",
        type=float,
        default=1.0,
        help="scale every family's profile budget (they sum to 300 s; 0.6: 180 s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    clock = Clock(args.budget_s)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        say("no CUDA device (torch.cuda.is_available() is False): use --device cpu --tiny")
        return 2
    if args.device == "cpu" and not args.tiny:
        say("full-size models on CPU would take hours: --device cpu needs --tiny")
        return 2
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    default_out = "bench/results/gpu-cpu-tiny" if args.tiny else "bench/results/gpu"
    out_dir = Path(args.out or REPO / default_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="trident-gpu-models-"))
    work.mkdir(parents=True, exist_ok=True)
    plans = tiny_plans() if args.tiny else full_plans()
    if args.profile_scale != 1.0:  # a shorter lease: every family's profile budget scaled
        plans = {
            f: dataclasses.replace(p, profile_budget_s=p.profile_budget_s * args.profile_scale)
            for f, p in plans.items()
        }
    families = [f for f in FAMILY_ORDER if f in args.families.split(",")]
    results: dict[str, Any] = {
        "format": "trident-gpu-acceptance/1",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/gpu/run.py", *args_list]),
        "tiny": args.tiny,
        "device": args.device,
        "dtype": args.dtype,
        "budget_seconds": args.budget_s,
        "environment": environment(args.device),
        "families": {},
    }
    say(f"device {results['environment']['device_name']}, work dir {work}, out {out_dir}")
    users_of_shared = {
        name: [f for f in families if name in build.manifest(f).get("shared", {}).values()]
        for f in families
        for name in build.manifest(f).get("shared", {}).values()
    }
    failed = False
    # Full size: one family at a time (build, profile, serve, delete: one model on disk).
    # Tiny: every family built and profiled, then one cluster serves them all.
    groups = [families] if args.tiny else [[f] for f in families]
    try:
        for group in groups:
            built: dict[str, Path] = {}
            try:
                for fam in group:
                    rec: dict[str, Any] = {"started_at_s": round(clock.elapsed(), 2)}
                    results["families"][fam] = rec
                    if clock.left() < 30:
                        rec["error"] = (
                            f"not run: {clock.elapsed():.0f} s of {args.budget_s:.0f} s spent"
                        )
                        say(f"{fam}: {rec['error']}")
                        continue
                    try:
                        say(f"{fam}: build")
                        model_dir, rec["build"] = step_build(fam, work, args)
                        built[fam] = model_dir
                        say(f"{fam}: built in {rec['build']['seconds']:.1f} s")
                        rec["profile"] = step_profile(fam, model_dir, plans[fam], args, out_dir)
                        say(f"{fam}: profiled in {rec['profile']['seconds']:.1f} s")
                    except Exception:
                        failed = True
                        built.pop(fam, None)
                        rec["error"] = traceback.format_exc()
                        say(f"{fam}: FAILED\n{rec['error']}")
                if built:
                    try:
                        served = step_serve(built, plans, args, out_dir / "logs" / "-".join(built))
                        for fam, srec in served.items():
                            results["families"][fam]["serve"] = srec
                            say(f"{fam}: served in {srec['seconds']:.1f} s")
                    except Exception:
                        failed = True
                        for fam in built:
                            results["families"][fam]["error"] = traceback.format_exc()
                        say(f"{', '.join(built)}: serve FAILED\n{traceback.format_exc()}")
            finally:
                for fam in group:
                    if fam in results["families"]:
                        results["families"][fam]["finished_at_s"] = round(clock.elapsed(), 2)
                if not args.keep_models:
                    for fam in group:
                        shutil.rmtree(work / fam, ignore_errors=True)
                    for name, users in users_of_shared.items():
                        if users and users[-1] in group:
                            for d in (work / "_shared").glob(f"{name}-*"):
                                shutil.rmtree(d, ignore_errors=True)
                _write(results, clock, out_dir)  # partial results survive a later crash
    finally:
        if args.work_dir is None and not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)
    _write(results, clock, out_dir)
    say(f"done in {clock.elapsed():.1f} s: {out_dir / 'results.json'}, {out_dir / 'summary.md'}")
    over = clock.elapsed() > args.budget_s
    if over:
        say(f"OVER BUDGET: {clock.elapsed():.0f} s > {args.budget_s:.0f} s")
    return 1 if failed or over else 0


def _write(results: dict[str, Any], clock: Clock, out_dir: Path) -> None:
    results["total_seconds"] = round(clock.elapsed(), 2)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "results.json")
    write_summary(results, out_dir / "summary.md")


if __name__ == "__main__":
    sys.exit(main())
