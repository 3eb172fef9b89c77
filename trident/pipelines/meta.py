"""What Trident knows about a diffusers directory without importing torch.

:func:`inspect_model` reads ``model_index.json`` and the component ``config.json`` files;
:func:`validate_request` checks a request's shape against the result. Both run in the
scheduler and in simulated workers, which must stay free of torch/diffusers (importing
them costs ~6 s and ~370 MB per process).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trident.errors import InvalidRequestError, ModelError
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
    "validate_request",
]

MAX_SIDE = 4096  # pixels; beyond this a request is absurd for every supported family
MAX_PIXELS = 4096 * 4096
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class FamilySpec:
    """Static facts about one family (its defaults are the diffusers ``__call__`` defaults)."""

    family: str
    pipeline_class: str
    is_video: bool
    default_steps: int
    default_guidance_scale: float
    uses_cfg: bool
    context_parallel: bool  # the transformer has a diffusers ``_cp_plan``
    default_num_frames: int | None = None
    max_frames: int | None = None


FAMILIES: dict[str, FamilySpec] = {
    spec.family: spec
    for spec in (
        FamilySpec("flux", "FluxPipeline", False, 28, 3.5, uses_cfg=False, context_parallel=True),
        FamilySpec(
            "sd3", "StableDiffusion3Pipeline", False, 28, 7.0, uses_cfg=True, context_parallel=False
        ),
        # Frame caps: a few times the frame counts the families were trained at; past them
        # the diffuse activation alone outgrows any single node.
        FamilySpec(
            "wan", "WanPipeline", True, 50, 5.0, True, True, default_num_frames=81, max_frames=257
        ),
        # CogVideoX's VAE decodes latent frames in pairs: num_frames = 1 + 4k gives back
        # 1 + 4k frames when k is even (49 -> 49) but 4(k+1) when k is odd (5 -> 8), in
        # diffusers as here. Requests are validated as 1 + 4k; the output says what it is.
        FamilySpec(
            "cogvideox",
            "CogVideoXPipeline",
            True,
            50,
            6.0,
            True,
            False,
            default_num_frames=49,
            max_frames=161,
        ),
        # HunyuanVideo is guidance-distilled: guidance_scale is embedded, no uncond branch.
        FamilySpec(
            "hunyuanvideo",
            "HunyuanVideoPipeline",
            True,
            50,
            6.0,
            False,
            False,
            default_num_frames=129,
            max_frames=257,
        ),
    )
}

_BY_CLASS = {spec.pipeline_class: spec for spec in FAMILIES.values()}

# Which model_index.json components each stage needs; every other one is loaded as None.
_DIFFUSE = ("transformer", "transformer_2", "scheduler")
_DECODE = ("vae",)


def family_of_class(class_name: str) -> str | None:
    spec = _BY_CLASS.get(class_name)
    return spec.family if spec else None


def stage_components(components: Mapping[str, Any], stage: StageName) -> list[str]:
    """Names of the ``model_index.json`` components that ``stage`` loads (present ones only)."""
    present = [name for name, value in components.items() if _is_present(value)]
    if stage == "encode":
        return [n for n in present if n.startswith(("text_encoder", "tokenizer"))]
    if stage == "diffuse":
        return [n for n in present if n in _DIFFUSE]
    if stage == "decode":
        return [n for n in present if n in _DECODE]
    raise ValueError(f"unknown stage {stage!r}")


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


def _vae_factors(family: str, vae: Mapping[str, Any]) -> tuple[int, int]:
    """(spatial, temporal) VAE scale factors, computed as each pipeline's ``__init__`` does."""
    if family in ("flux", "sd3", "cogvideox"):
        spatial = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        temporal = int(vae.get("temporal_compression_ratio", 4)) if family == "cogvideox" else 1
        return spatial, temporal
    if family == "wan":
        return int(vae.get("scale_factor_spatial") or 8), int(vae.get("scale_factor_temporal") or 4)
    if family == "hunyuanvideo":
        return int(vae.get("spatial_compression_ratio", 8)), int(
            vae.get("temporal_compression_ratio", 4)
        )
    raise ModelError(f"no VAE rule for family {family!r}")


def _patch(family: str, transformer: Mapping[str, Any]) -> int:
    """Spatial patch size of the transformer (Flux packs latents 2x2 instead)."""
    if family == "flux":
        return 2
    p = transformer.get("patch_size", 2 if family != "hunyuanvideo" else 1)
    if isinstance(p, list | tuple):  # Wan: (t, h, w)
        p = p[-1]
    return int(p or 1)


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
    spec = _BY_CLASS.get(class_name)
    if spec is None:
        supported = ", ".join(sorted(_BY_CLASS))
        raise ModelError(
            f"{root}: pipeline class {class_name} is not supported (supported: {supported})"
        )
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    for needed in ("transformer", "vae", "scheduler"):
        if not _is_present(components.get(needed)):
            raise ModelError(f"{root}: {class_name} without a {needed} cannot be served")
    vae = _read_json(root / "vae" / "config.json", "vae config")
    transformer = _read_json(root / "transformer" / "config.json", "transformer config")
    spatial, temporal = _vae_factors(spec.family, vae)
    weights = {
        stage: sum(_dir_bytes(root / c) for c in stage_components(components, stage))
        for stage in ("encode", "diffuse", "decode")
    }
    return ModelMeta(
        path=str(root.resolve()),
        family=spec.family,
        pipeline_class=class_name,
        is_video=spec.is_video,
        vae_scale_factor_spatial=spatial,
        vae_scale_factor_temporal=temporal,
        size_multiple=spatial * _patch(spec.family, transformer),
        max_frames=spec.max_frames,
        default_num_frames=spec.default_num_frames,
        default_steps=spec.default_steps,
        default_guidance_scale=spec.default_guidance_scale,
        uses_cfg=spec.uses_cfg,
        context_parallel=spec.context_parallel,
        stage_weight_bytes=weights,
    )


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    return value


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
