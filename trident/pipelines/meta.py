"""What Trident knows about a diffusers directory without importing torch.

:func:`inspect_model` reads ``model_index.json`` and the component ``config.json`` files;
:func:`validate_request` checks a request's shape against the result. Both run in the
scheduler and in simulated workers, which must stay free of torch/diffusers (importing
them costs ~6 s and ~370 MB per process). The family facts they apply (pipeline class,
defaults, how the VAE factors, patch size and positional limits are read from the
configs) live in :mod:`trident.families`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trident.errors import InvalidRequestError, ModelError
from trident.families import FAMILIES, STAGE_COMPONENTS, FamilySpec, Geometry, fit_frames
from trident.families import family_of_class as _family_of_class
from trident.pipelines.api import ModelMeta, StageName

__all__ = [
    "FAMILIES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "MAX_STEPS",
    "FamilySpec",
    "family_of_class",
    "inspect_model",
    "stage_components",
    "stage_weight_bytes_as",
    "validate_request",
]

MAX_SIDE = 4096  # pixels; beyond this a request is absurd for every supported family
MAX_PIXELS = 4096 * 4096
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


def family_of_class(class_name: str) -> str | None:
    spec = _family_of_class(class_name)
    return spec.name if spec else None


def stage_components(components: Mapping[str, Any], stage: StageName) -> list[str]:
    """Names of the ``model_index.json`` components that ``stage`` loads (present ones only)."""
    try:
        names = STAGE_COMPONENTS[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}") from None
    return [
        n
        for n, value in components.items()
        if _is_present(value) and any(n == c or n.startswith(c + "_") for c in names)
    ]


def _is_present(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open() as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{what}: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{what}: {path} is not a JSON object")
    return data


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# safetensors dtype codes of floating-point tensors -> bytes per element
_SAFETENSORS_FLOAT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _float_tensors(path: Path) -> tuple[int, int]:
    """(elements, stored bytes) of the floating-point tensors in the ``*.safetensors``
    files under ``path``, from their JSON headers (no tensor data is read). Other weight
    files (``.bin``) are not parsed: their bytes count as they are stored."""
    elements = nbytes = 0
    if not path.is_dir():
        return 0, 0
    for f in path.rglob("*.safetensors"):
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 0 < n < 100_000_000 else {}
        except (OSError, ValueError):
            continue
        for key, t in header.items():
            if key == "__metadata__" or not isinstance(t, dict):
                continue
            size = _SAFETENSORS_FLOAT.get(str(t.get("dtype")))
            shape = t.get("shape")
            if size is None or not isinstance(shape, list):
                continue
            count = math.prod(int(d) for d in shape)
            elements += count
            nbytes += count * size
    return elements, nbytes


def stage_weight_bytes_as(meta: ModelMeta, bytes_per_element: int) -> dict[str, int]:
    """Each stage's weight bytes once loaded with floating-point tensors of
    ``bytes_per_element`` bytes (4: float32, 2: bfloat16/float16): the on-disk bytes
    with the floating-point tensors' stored bytes replaced by elements x that size.
    (diffusers keeps a few modules in float32 whatever the dtype, e.g. T5's ``wo``
    layers; this ignores them.)"""
    out: dict[str, int] = {}
    for stage, stored in meta.stage_weight_bytes.items():
        elements = int(meta.stage_float_elements.get(stage, 0))
        floats = int(meta.stage_float_bytes.get(stage, 0))
        out[stage] = max(0, int(stored) - floats + elements * bytes_per_element)
    return out


def inspect_model(path: str | Path) -> ModelMeta:
    """Read a diffusers directory's metadata (no torch). Raises :class:`ModelError`."""
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"{root} is not a directory")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{root} is not a diffusers pipeline: no model_index.json")
    index = _read_json(index_path, "model_index.json")
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelError(f"{index_path} has no _class_name: not a diffusers pipeline")
    spec = _family_of_class(class_name)
    if spec is None:
        supported = ", ".join(sorted(f.pipeline_class for f in FAMILIES.values()))
        raise ModelError(
            f"{root}: pipeline class {class_name} is not supported (supported: {supported})"
        )
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    for needed in ("transformer", "vae", "scheduler"):
        if not _is_present(components.get(needed)):
            raise ModelError(f"{root}: {class_name} without a {needed} cannot be served")
    vae = _read_json(root / "vae" / "config.json", "vae config")
    transformer = _read_json(root / "transformer" / "config.json", "transformer config")
    geometry = spec.geometry(vae, transformer)
    weights: dict[str, int] = {
        stage: sum(_dir_bytes(root / c) for c in stage_components(components, stage))
        for stage in spec.stages
    }
    floats: dict[str, tuple[int, int]] = {}
    for stage in spec.stages:
        parts = [_float_tensors(root / c) for c in stage_components(components, stage)]
        floats[stage] = (sum(p[0] for p in parts), sum(p[1] for p in parts))
    max_frames, default_frames, notes = _frame_limits(spec, geometry, transformer)
    max_side = geometry.max_side
    if max_side is not None:
        notes["side"] = (
            f"its transformer's {geometry.table} {geometry.max_patches_side} covers "
            f"{geometry.max_patches_side} patches of {geometry.vae_spatial * geometry.patch} px "
            "per side"
        )
    return ModelMeta(
        path=str(root.resolve()),
        family=spec.name,
        pipeline_class=class_name,
        is_video=spec.is_video,
        vae_scale_factor_spatial=geometry.vae_spatial,
        vae_scale_factor_temporal=geometry.vae_temporal,
        size_multiple=geometry.size_multiple,
        max_frames=max_frames,
        default_num_frames=default_frames,
        default_steps=spec.default_steps,
        default_guidance_scale=spec.default_guidance_scale,
        uses_cfg=spec.uses_cfg,
        context_parallel=spec.context_parallel,
        stage_weight_bytes=weights,
        stage_float_elements={k: v[0] for k, v in floats.items()},
        stage_float_bytes={k: v[1] for k, v in floats.items()},
        max_side=max_side,
        limit_notes=notes,
    )


def _frame_limits(
    spec: FamilySpec, geometry: Geometry, transformer: Mapping[str, Any]
) -> tuple[int | None, int | None, dict[str, str]]:
    """(most frames, default frames, why the limit) of a model: the family's cap or what
    its transformer's positional table covers, whichever is lower; the default is the
    pipeline's, brought within the limit and onto the 1 + k*t rule."""
    if not spec.is_video:
        return None, None, {}
    t = geometry.vae_temporal
    limit = spec.frame_limit(geometry)
    notes: dict[str, str] = {}
    table = geometry.max_patches_t
    if table is not None and limit == geometry.max_frames and limit != spec.max_frames:
        notes["num_frames"] = (
            f"its transformer's {geometry.table} {table} covers "
            f"{table * geometry.patch_t} latent frames = {limit} frames"
        )
    if limit is not None:
        limit = fit_frames(limit, t, None)  # a limit on the 1 + k*t rule
    default = spec.default_num_frames_for(transformer)
    if default is not None:
        default = fit_frames(default, t, limit)
    return limit, default, notes


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    return value


def _why(meta: ModelMeta, limit: str) -> str:
    note = meta.limit_notes.get(limit)
    return f": {note}" if note else ""


def validate_request(
    meta: ModelMeta,
    *,
    height: int | None,
    width: int | None,
    num_frames: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
) -> None:
    """Reject impossible or absurd request parameters with :class:`InvalidRequestError`.

    ``None`` means "the model's default". Checks run here, before any worker sees the request,
    so a bad shape never fails inside a stage.
    """
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        v = _int(name, value)
        if v <= 0:
            raise InvalidRequestError(f"{name} must be positive, got {v}")
        if v > MAX_SIDE:
            raise InvalidRequestError(f"{name} {v} exceeds the maximum of {MAX_SIDE}")
        if meta.max_side is not None and v > meta.max_side:
            raise InvalidRequestError(
                f"{name} {v} exceeds the maximum of {meta.max_side} for this {meta.family} "
                f"model{_why(meta, 'side')}"
            )
        if v % meta.size_multiple:
            lo = v - v % meta.size_multiple
            raise InvalidRequestError(
                f"{name} {v} is not a multiple of {meta.size_multiple} for this {meta.family} model "
                f"(try {max(lo, meta.size_multiple)} or {lo + meta.size_multiple})"
            )
    if height is not None and width is not None and height * width > MAX_PIXELS:
        raise InvalidRequestError(f"{height}x{width} exceeds {MAX_PIXELS} pixels")
    if num_frames is not None:
        n = _int("num_frames", num_frames)
        if not meta.is_video:
            if n != 1:
                raise InvalidRequestError(
                    f"{meta.family} makes images: num_frames must be 1, got {n}"
                )
        else:
            if n <= 0:
                raise InvalidRequestError(f"num_frames must be positive, got {n}")
            if meta.max_frames is not None and n > meta.max_frames:
                raise InvalidRequestError(
                    f"num_frames {n} exceeds the maximum of {meta.max_frames} for {meta.family}"
                    f"{_why(meta, 'num_frames')}"
                )
            t = meta.vae_scale_factor_temporal
            if (n - 1) % t:
                lo = n - (n - 1) % t
                raise InvalidRequestError(
                    f"num_frames must be 1 + k*{t} for {meta.family}, got {n} (try {lo} or {lo + t})"
                )
    if num_inference_steps is not None:
        s = _int("num_inference_steps", num_inference_steps)
        if not 1 <= s <= MAX_STEPS:
            raise InvalidRequestError(f"num_inference_steps must be in 1..{MAX_STEPS}, got {s}")
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
            raise InvalidRequestError(f"guidance_scale must be a number, got {guidance_scale!r}")
        g = float(guidance_scale)
        if not math.isfinite(g) or not 0.0 <= g <= MAX_GUIDANCE:
            raise InvalidRequestError(f"guidance_scale must be in 0..{MAX_GUIDANCE}, got {g}")
