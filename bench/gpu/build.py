"""Build a full-size random-weight diffusers pipeline from the configs in ``configs/``.

``configs/<family>/`` holds one published component config per pipeline component
(``<component>/config.json``, ``scheduler/scheduler_config.json``) and a
``pipeline.json`` manifest: the pipeline class, the published checkpoint it copies, which
offline tokenizer each tokenizer slot gets, which components are shared between families
(the T5-XXL encoder of FLUX.1-dev, SD3 and CogVideoX is built and written once, then
symlinked) and the published parameter count of each model component (checked by
``tests/unit/test_gpu_configs.py``).

Weights are random: latency and memory do not depend on their values. Each model is
constructed directly on the target device in the target dtype (``torch.device`` context
and ``torch.set_default_dtype``), so the initialisers run there: a 12.8B-parameter
transformer builds in about a second on a GPU instead of minutes on the CPU. Tokenizers are
the character-level ones of :mod:`trident.pipelines.tiny` (ids fit every published
vocabulary; the pipelines pad to the same ``max_sequence_length`` as with the real
tokenizers, so the text encoders see the same sequence lengths).

    python bench/gpu/build.py FAMILY OUT_DIR [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
FAMILIES = ("flux", "sd3", "wan", "cogvideox", "hunyuanvideo")
_META_KEYS = ("_class_name", "_library", "_config_class")


def manifest(family: str) -> dict[str, Any]:
    """``configs/<family>/pipeline.json``."""
    return json.loads((CONFIGS / family / "pipeline.json").read_text(encoding="utf-8"))


def component_configs(family: str) -> dict[str, dict[str, Any]]:
    """component name -> its committed config (model components and the scheduler)."""
    out: dict[str, dict[str, Any]] = {}
    for d in sorted((CONFIGS / family).iterdir()):
        if not d.is_dir():
            continue
        f = d / ("scheduler_config.json" if d.name == "scheduler" else "config.json")
        out[d.name] = json.loads(f.read_text(encoding="utf-8"))
    return out


def _model_class(cfg: dict[str, Any]) -> Any:
    import diffusers
    import transformers

    lib = diffusers if cfg["_library"] == "diffusers" else transformers
    return getattr(lib, cfg["_class_name"])


def instantiate(cfg: dict[str, Any]) -> Any:
    """The module (or scheduler) of one committed config, on the current default device
    and dtype (``torch.device(...)`` context, ``torch.set_default_dtype``)."""
    cls = _model_class(cfg)
    kwargs = {k: v for k, v in cfg.items() if k not in _META_KEYS}
    if cfg["_library"] == "diffusers":
        return cls.from_config(kwargs)
    import transformers

    config = getattr(transformers, cfg["_config_class"])(**kwargs)
    return cls(config)


def count_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def on_device(device: str, dtype: Any) -> Iterator[None]:
    """Construct modules directly on ``device`` in ``dtype``."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def meta_parameter_counts(family: str) -> dict[str, int]:
    """Parameter count of each model component, built on the meta device (no memory)."""
    import torch

    out: dict[str, int] = {}
    for name, cfg in component_configs(family).items():
        if name == "scheduler":
            continue
        with on_device("meta", torch.bfloat16):
            out[name] = count_parameters(instantiate(cfg))
    return out


def _tokenizer(kind: str) -> Any:
    from trident.pipelines import tiny

    return {
        "clip": tiny._clip_tokenizer,
        "t5": tiny._t5_tokenizer,
        "llama": tiny._llama_tokenizer,
    }[kind]()


def _save_component(module: Any, out: Path) -> None:
    module.save_pretrained(out, safe_serialization=True, max_shard_size="50GB")


def build_pipeline(
    family: str,
    out_dir: str | Path,
    *,
    device: str = "cuda",
    dtype: str = "bfloat16",
    shared_dir: str | Path | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Write the full-size ``family`` pipeline to ``out_dir`` (a diffusers directory
    ``DiffusionPipeline.from_pretrained`` loads). Components named in the manifest's
    ``shared`` are written once under ``shared_dir`` and symlinked. Returns a record:
    parameters and bytes per component, seconds spent building and writing."""
    import torch

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    man = manifest(family)
    torch_dtype = getattr(torch, dtype)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shared = Path(shared_dir) if shared_dir else out.parent / "_shared"
    record: dict[str, Any] = {"family": family, "published": man["published"], "components": {}}
    index: dict[str, Any] = {"_class_name": man["pipeline_class"], "_diffusers_version": ""}
    import diffusers

    index["_diffusers_version"] = diffusers.__version__
    for name, cfg in component_configs(family).items():
        t0 = time.perf_counter()
        if name == "scheduler":
            sched = instantiate(cfg)
            sched.save_pretrained(out / name)
            index[name] = ["diffusers", cfg["_class_name"]]
            continue
        share = man.get("shared", {}).get(name)
        target = out / name
        reused = False
        if share:
            cache = shared / f"{share}-{cfg['_class_name']}-{dtype}"
            if (cache / ".complete").exists():
                reused = True
            else:
                if cache.exists():
                    shutil.rmtree(cache)
                _build_and_save(cfg, cache, device, torch_dtype)
                (cache / ".complete").write_text("ok\n")
            target.symlink_to(cache.resolve(), target_is_directory=True)
        else:
            _build_and_save(cfg, target, device, torch_dtype)
        nbytes = sum(f.stat().st_size for f in target.resolve().rglob("*.safetensors"))
        params = _params_from_index(target)
        seconds = time.perf_counter() - t0
        record["components"][name] = {
            "class": cfg["_class_name"],
            "parameters": params,
            "bytes": nbytes,
            "seconds": round(seconds, 3),
            "shared": share or None,
            "reused": reused,
        }
        index[name] = [cfg["_library"], cfg["_class_name"]]
        say(
            f"  {family}/{name}: {cfg['_class_name']} {params / 1e9:.3f}B params, "
            f"{nbytes / 1e9:.2f} GB, {seconds:.1f} s{' (shared, reused)' if reused else ''}"
        )
    for slot, kind in man["tokenizers"].items():
        tok = _tokenizer(kind)
        tok.save_pretrained(out / slot)
        index[slot] = ["transformers", type(tok).__name__]
    for slot in _optional_slots(man["pipeline_class"]):
        index.setdefault(slot, [None, None])
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    record["parameters"] = sum(c["parameters"] for c in record["components"].values())
    record["bytes"] = sum(c["bytes"] for c in record["components"].values())
    return record


def _optional_slots(pipeline_class: str) -> tuple[str, ...]:
    return {"FluxPipeline": ("image_encoder", "feature_extractor")}.get(pipeline_class, ())


def _params_from_index(path: Path) -> int:
    """Parameter count of a saved component, from its safetensors headers (no loading)."""
    total = 0
    for f in path.resolve().glob("*.safetensors"):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, v in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in v["shape"]:
                count *= int(d)
            total += count
    return total


def _build_and_save(cfg: dict[str, Any], out: Path, device: str, dtype: Any) -> None:
    import torch

    with on_device(device, dtype), torch.no_grad():
        module = instantiate(cfg)
    module.eval()
    _save_component(module, out)
    del module
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shared-dir", default=None, help="cache of shared components")
    args = parser.parse_args(argv)
    record = build_pipeline(
        args.family, args.out_dir, device=args.device, dtype=args.dtype, shared_dir=args.shared_dir
    )
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
