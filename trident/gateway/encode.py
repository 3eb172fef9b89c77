"""Outputs as files: images as PNG / JPEG / WEBP (Pillow), videos as MP4 (H.264, PyAV).

Inputs are the SDK's arrays: float32 in [0, 1], ``(H, W, 3)`` for an image and
``(F, H, W, 3)`` for a video (diffusers' ``output_type="np"`` layout).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IMAGE_FORMATS", "MEDIA_TYPES", "encode_image", "encode_mp4", "to_uint8"]

IMAGE_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
}


def to_uint8(array: Any) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255] (clipped, rounded)."""
    a = np.asarray(array, dtype=np.float32)
    return (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_image(array: Any, fmt: str = "png", quality: int | None = None) -> bytes:
    """One image ``(H, W, 3)`` (a video's first frame when given ``(F, H, W, 3)``) as
    ``fmt`` bytes; ``quality`` 0-100 for jpeg and webp (OpenAI's output_compression)."""
    from PIL import Image

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {IMAGE_FORMATS}")
    pixels = to_uint8(array)
    if pixels.ndim == 4:
        pixels = pixels[0]
    buf = io.BytesIO()
    options: dict[str, Any] = {}
    if fmt in ("jpeg", "webp"):
        options["quality"] = 90 if quality is None else int(quality)
    Image.fromarray(pixels, "RGB").save(buf, format=fmt.upper(), **options)
    return buf.getvalue()


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad height and width to even sizes (yuv420p halves both), repeating the edge."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def encode_mp4(array: Any, path: str | os.PathLike[str], fps: float = 16.0) -> Path:
    """Write ``(F, H, W, 3)`` frames (an ``(H, W, 3)`` image is one frame) as an MP4 at
    ``path``: H.264 (libx264), yuv420p, even dimensions (odd ones padded by one pixel),
    ``fps`` frames per second. Written to a temporary name and renamed: a reader never
    sees half a file."""
    import av

    frames = to_uint8(array)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected frames (F, H, W, 3), got shape {frames.shape}")
    frames = np.ascontiguousarray(_even(frames))
    out = Path(path)
    tmp = out.with_name(out.name + ".part")
    rate = max(1, round(fps))
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream: Any = container.add_stream("libx264", rate=rate)
        stream.width = int(frames.shape[2])
        stream.height = int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, out)
    return out
