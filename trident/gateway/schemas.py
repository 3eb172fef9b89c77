"""OpenAI-shaped requests and responses, and how a request becomes a Trident request.

Request bodies are pydantic models that refuse unknown fields (a typo is a 400 naming
it, not a silent default); OpenAI fields that mean nothing for a diffusion pipeline
(``quality``, ``style``, ``background``, ``moderation``) are accepted and ignored.
Sizes, durations and frame counts are resolved against the model's defaults and limits
as the scheduler's ``ping`` advertises them (:meth:`ServedModel.describe
<trident.runtime.registry.ServedModel.describe>`).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trident.gateway.errors import GatewayError
from trident.gateway.store import Job

__all__ = [
    "ImageRequest",
    "VideoRequest",
    "frames_for",
    "invalid",
    "parse_model",
    "resolve_size",
    "video_object",
]

Prompt = Annotated[str, Field(max_length=20_000)]
Steps = Annotated[int, Field(ge=1, le=1000)]
Guidance = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
Slo = Annotated[float, Field(gt=0.0, le=1e7, allow_inf_nan=False)]
Ignored = Annotated[str | None, Field(max_length=64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=20_000)]
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    size: Annotated[str, Field(max_length=32)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # Diffusers' extras (as vllm-omni and SGLang accept them)
    negative_prompt: Prompt | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    seed: Seed | None = None
    slo_s: Slo | None = None


class ImageRequest(_Request):
    """``POST /v1/images/generations``."""

    n: Annotated[int, Field(ge=1, le=10)] = 1
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None
    stream: Literal[False] | None = None
    quality: Ignored = None
    style: Ignored = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Ignored = None


class VideoRequest(_Request):
    """``POST /v1/videos`` (JSON or multipart form fields)."""

    seconds: Annotated[float, Field(gt=0.0, le=3600.0, allow_inf_nan=False)] | None = None
    fps: Annotated[int, Field(ge=1, le=120)] | None = None
    num_frames: Annotated[int, Field(ge=1, le=10_000)] | None = None


def invalid(param: str | None, message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", "invalid_request", param)


def parse_model(cls: type[_Request], data: Any) -> Any:
    """Validate a request body; the first problem is a 400 naming its field."""
    if not isinstance(data, dict):
        raise invalid(None, "the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ())]
        param = loc[0] if loc else None
        if first.get("type") == "extra_forbidden":
            message = f"unknown parameter {param!r}"
        elif first.get("type") == "missing":
            message = f"missing required parameter {param!r}"
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        raise invalid(param, message) from None


_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def resolve_size(size: str | None, info: dict[str, Any]) -> tuple[int, int]:
    """``"WxH"`` (or None / ``"auto"``: the model's default) -> (width, height), checked
    against the model's size rule."""
    if size is None or size.strip().lower() == "auto":
        return int(info["default_width"]), int(info["default_height"])
    m = _SIZE.match(size)
    if m is None:
        raise invalid("size", f"size {size!r}: expected WIDTHxHEIGHT, e.g. 1024x1024")
    width, height = int(m.group(1)), int(m.group(2))
    multiple = int(info.get("size_multiple") or 1)
    max_side = info.get("max_side")
    for side, v in (("width", width), ("height", height)):
        if v < multiple or v % multiple:
            raise invalid("size", f"size {size!r}: {side} must be a multiple of {multiple}")
        if max_side is not None and v > int(max_side):
            raise invalid("size", f"size {size!r}: {side} exceeds the model's {max_side}")
    return width, height


def _valid_frames(n: int, factor: int) -> bool:
    return n >= 1 and (n - 1) % factor == 0


def frames_for(req: VideoRequest, info: dict[str, Any]) -> tuple[int, int, str | None]:
    """(num_frames, fps, note): the clip's frame count on the model's rule
    ``1 + k * frame_factor``; ``seconds`` x ``fps`` is rounded to the nearest valid count
    (``note`` says so), an explicit ``num_frames`` must be valid."""
    factor = max(1, int(info.get("frame_factor") or 1))
    max_frames = info.get("max_frames")
    fps = int(req.fps or info.get("default_fps") or 16)
    if req.num_frames is not None and req.seconds is not None:
        raise invalid("num_frames", "give seconds (with fps) or num_frames, not both")
    if req.num_frames is not None:
        n = req.num_frames
        if not _valid_frames(n, factor):
            lo = 1 + (n - 1) // factor * factor
            raise invalid(
                "num_frames",
                f"num_frames={n}: must be 1 + k*{factor} (nearest: {lo} or {lo + factor})",
            )
        if max_frames is not None and n > int(max_frames):
            raise invalid("num_frames", f"num_frames={n}: the model makes at most {max_frames}")
        return n, fps, None
    if req.seconds is None:
        return int(info.get("default_num_frames") or 1 + factor), fps, None
    want = req.seconds * fps
    n = 1 + max(1, round((want - 1) / factor)) * factor
    if max_frames is not None and n > int(max_frames):
        most = int(max_frames)
        raise invalid(
            "seconds",
            f"seconds={req.seconds:g} at {fps} fps is {want:g} frames; the model makes at most "
            f"{most} ({most / fps:.2f} s)",
        )
    note = None
    if not math.isclose(n, want):
        note = (
            f"seconds={req.seconds:g} at {fps} fps is {want:g} frames; rounded to {n}, the "
            f"nearest valid count (1 + k*{factor}): {n / fps:.3f} s"
        )
    return n, fps, note


def _seconds_text(num_frames: int, fps: int) -> str:
    text = f"{num_frames / fps:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def video_info(
    req: VideoRequest, width: int, height: int, num_frames: int, fps: int, note: str | None
) -> dict[str, Any]:
    """What a video job shows besides its status (kept in the job's row)."""
    info: dict[str, Any] = {
        "size": f"{width}x{height}",
        "seconds": _seconds_text(num_frames, fps),
        "fps": fps,
        "num_frames": num_frames,
        "prompt": req.prompt,
    }
    if note:
        info["note"] = note
    if req.user:
        info["user"] = req.user
    return info


def video_object(job: Job) -> dict[str, Any]:
    """A job as OpenAI's ``Video`` object, plus Trident's details under ``trident``."""
    info = job.info
    error = None
    if job.status in ("failed", "cancelled") and job.error_code:
        error = {"code": job.error_code, "message": job.error_message or ""}
    extra: dict[str, Any] = {
        k: info[k]
        for k in ("num_frames", "fps", "note", "timings", "devices", "met_slo", "frames")
        if k in info
    }
    extra["attempts"] = job.attempts
    return {
        "id": job.id,
        "object": "video",
        "status": job.status,
        "progress": int(job.progress),
        "created_at": job.created_at,
        "completed_at": job.completed_at,
        "expires_at": job.expires_at,
        "error": error,
        "model": job.model,
        "prompt": info.get("prompt"),
        "size": info.get("size"),
        "seconds": info.get("seconds"),
        "remixed_from_video_id": None,
        "trident": extra,
    }
