"""Outputs as files: images as PNG / JPEG / WEBP (Pillow), videos as MP4 (H.264, PyAV).

One implementation, shared with the decode worker (which encodes a request's output
when the SDK asks ``output_type="png"`` / ``"mp4"``): :mod:`trident.runtime.encode`.
Inputs are float32 in [0, 1] or uint8, ``(H, W, 3)`` for an image and ``(F, H, W, 3)``
for a video (diffusers' ``output_type="np"`` layout).
"""

from __future__ import annotations

from trident.runtime.encode import (
    IMAGE_FORMATS,
    MEDIA_TYPES,
    encode_image,
    encode_mp4,
    to_uint8,
    write_atomic,
)

__all__ = ["IMAGE_FORMATS", "MEDIA_TYPES", "encode_image", "encode_mp4", "to_uint8", "write_atomic"]
