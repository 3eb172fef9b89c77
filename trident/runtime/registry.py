"""Served models on the scheduler side: registration and request validation.

Registration reads a model directory's metadata (no torch: ``inspect_model``) so a bad
directory is refused when the scheduler starts, and every submission is validated here
before the core or any worker sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trident.config import ModelSpec
from trident.errors import InvalidRequestError, ModelError
from trident.families import FAMILIES, runs_cfg
from trident.sched.types import DTYPE_BYTES, ModelInfo, Shape

__all__ = ["ServedModel", "build_request_shape", "register_models"]

# Generic bounds for simulated models (no directory to read factors from).
MAX_SIDE = 8192
MAX_FRAMES = 1024
MAX_STEPS = 1000
# Defaults when a simulated model's request leaves a size out: the family's reference
# checkpoint's (trident.families).
SIM_DEFAULTS: dict[str, dict[str, int]] = {
    name: {
        "height": spec.default_height,
        "width": spec.default_width,
        "num_frames": spec.default_num_frames or 1,
        "steps": spec.default_steps,
    }
    for name, spec in FAMILIES.items()
}


@dataclass(frozen=True)
class ServedModel:
    info: ModelInfo
    meta: Any | None  # trident.pipelines.api.ModelMeta for real directories
    default_height: int
    default_width: int
    default_num_frames: int
    default_steps: int
    default_guidance: float | None
    # The configured dtype (trident.config.DTYPES, or "auto": the worker picks bfloat16
    # on cuda, float32 on cpu); ``info.dtype`` is the one the planner sizes with.
    dtype: str = "auto"

    def describe(self) -> dict[str, Any]:
        """Defaults and limits, as the scheduler's ``ping`` advertises them (the HTTP
        gateway turns sizes and durations into valid requests with these):
        ``size_multiple`` / ``max_side`` for height and width, ``frame_factor`` /
        ``max_frames`` for the frame rule ``num_frames = 1 + k * frame_factor``,
        ``default_fps`` for clips, ``max_steps`` for ``num_inference_steps``."""
        spec = FAMILIES.get(self.info.family)
        if self.meta is not None:
            from trident.pipelines import meta as limits

            multiple = int(self.meta.size_multiple)
            max_side = min(self.meta.max_side or limits.MAX_SIDE, limits.MAX_SIDE)
            factor = int(self.meta.vae_scale_factor_temporal)
            max_frames = self.meta.max_frames
            max_steps = limits.MAX_STEPS
        else:
            multiple, max_side, max_steps = 16, MAX_SIDE, MAX_STEPS
            factor = spec.reference.vae_temporal if spec is not None else 1
            max_frames = (spec.max_frames if spec is not None else None) or MAX_FRAMES
        if not self.info.is_video:
            factor, max_frames = 1, 1
        return {
            "family": self.info.family,
            "path": self.info.path,
            "is_video": self.info.is_video,
            "dtype": self.dtype,
            "default_height": self.default_height,
            "default_width": self.default_width,
            "default_num_frames": self.default_num_frames,
            "default_steps": self.default_steps,
            "default_fps": spec.default_fps if spec is not None and self.info.is_video else None,
            "size_multiple": multiple,
            "max_side": max_side,
            "frame_factor": factor,
            "max_frames": max_frames,
            "max_steps": max_steps,
        }


def _meta_defaults(meta: Any) -> tuple[int, int]:
    """Default height/width of a real model directory: transformer sample size x VAE factor."""
    import json
    from pathlib import Path

    cfg_path = Path(meta.path) / "transformer" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return 64, 64
    sample = cfg.get("sample_size") or cfg.get("sample_height") or 8
    if isinstance(sample, list | tuple):
        sample = sample[0]
    side = int(sample) * int(meta.vae_scale_factor_spatial)
    if meta.max_side is not None:
        side = min(side, int(meta.max_side))
    mult = max(1, int(meta.size_multiple))
    side = max(mult, (side // mult) * mult)
    return side, side


def register_models(specs: list[ModelSpec]) -> dict[str, ServedModel]:
    """Resolve every configured model; raises ModelError for a bad one.

    Weight sizes follow the model's dtype: a directory's stage weights are its files'
    bytes with the floating-point tensors at the serving dtype
    (:func:`trident.pipelines.meta.stage_weight_bytes_as`); ``"auto"`` is sized as
    bfloat16, what cuda (and sim) devices run it in."""
    served: dict[str, ServedModel] = {}
    for spec in specs:
        if spec.name in served:
            raise ModelError(f"model name {spec.name!r} registered twice")
        sizing = "bfloat16" if spec.dtype == "auto" else spec.dtype
        if sizing not in DTYPE_BYTES:
            raise ModelError(f"model {spec.name!r}: unknown dtype {spec.dtype!r}")
        if spec.path is not None:
            from trident.pipelines import inspect_model
            from trident.pipelines.meta import stage_weight_bytes_as

            meta = inspect_model(spec.path)
            h, w = _meta_defaults(meta)
            info = ModelInfo(
                name=spec.name,
                family=meta.family,
                path=spec.path,
                is_video=meta.is_video,
                stage_weight_bytes=stage_weight_bytes_as(meta, DTYPE_BYTES[sizing]),
                dtype=sizing,
            )
            served[spec.name] = ServedModel(
                info=info,
                meta=meta,
                default_height=h,
                default_width=w,
                default_num_frames=int(meta.default_num_frames or 1) if meta.is_video else 1,
                default_steps=int(meta.default_steps),
                default_guidance=float(meta.default_guidance_scale),
                dtype=spec.dtype,
            )
        else:
            family = spec.family or spec.name
            d = SIM_DEFAULTS.get(family)
            if d is None:
                raise ModelError(f"model {spec.name!r}: unknown family {family!r}")
            info = ModelInfo(
                name=spec.name,
                family=family,
                path=None,
                is_video=FAMILIES[family].is_video,
                dtype=sizing,
            )
            served[spec.name] = ServedModel(
                info=info,
                meta=None,
                default_height=d["height"],
                default_width=d["width"],
                default_num_frames=d["num_frames"],
                default_steps=d["steps"],
                default_guidance=None,
                dtype=spec.dtype,
            )
    return served


def _as_int(params: Mapping[str, Any], key: str, default: int) -> int:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{key} must be an integer, got {value!r}")
    return value


def build_request_shape(model: ServedModel, params: dict[str, Any]) -> Shape:
    """Fill defaults into ``params`` (in place), validate, and return the request's shape.

    Raises InvalidRequestError with a message naming the offending parameter.
    """
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be a string")
    if len(prompt) > 20_000:
        raise InvalidRequestError("prompt longer than 20000 characters")
    neg = params.get("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        raise InvalidRequestError("negative_prompt must be a string or None")
    height = _as_int(params, "height", model.default_height)
    width = _as_int(params, "width", model.default_width)
    frames_default = model.default_num_frames if model.info.is_video else 1
    num_frames = _as_int(params, "num_frames", frames_default)
    steps = _as_int(params, "num_inference_steps", model.default_steps)
    seed = params.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
    ):
        raise InvalidRequestError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    guidance = params.get("guidance_scale", model.default_guidance)
    if guidance is not None:
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, int | float)
            or not 0 <= guidance <= 100
        ):
            raise InvalidRequestError(
                f"guidance_scale must be a number in [0, 100], got {guidance!r}"
            )
        guidance = float(guidance)
    if not model.info.is_video and num_frames != 1:
        raise InvalidRequestError(f"{model.info.name} makes images: num_frames must be 1 or None")
    if model.meta is not None:
        from trident.pipelines import validate_request

        validate_request(
            model.meta,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
        )
    else:
        for key, v, hi in (("height", height, MAX_SIDE), ("width", width, MAX_SIDE)):
            if not 16 <= v <= hi or v % 16:
                raise InvalidRequestError(f"{key}={v}: must be a multiple of 16 in [16, {hi}]")
        if not 1 <= num_frames <= MAX_FRAMES:
            raise InvalidRequestError(f"num_frames={num_frames}: must be in [1, {MAX_FRAMES}]")
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidRequestError(f"num_inference_steps={steps}: must be in [1, {MAX_STEPS}]")
    params.update(
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )
    cfg = runs_cfg(model.info.family, guidance, params)
    return Shape(
        height=height, width=width, num_frames=num_frames, num_inference_steps=steps, cfg=cfg
    )
