"""A request's output in the form it travels and is kept in: the one implementation of
output encoding, used by the decode worker (``output_type``) and the HTTP gateway.

Inputs are decode's output: float32 in [0, 1], ``(H, W, 3)`` for an image and
``(F, H, W, 3)`` for a video (diffusers' ``output_type="np"`` layout), as a numpy array
or a CPU torch tensor (duck-typed: this module never imports torch, so ``sim`` workers
stay light). Pillow and PyAV are imported only when an image or a video is encoded.

Output types (:data:`~trident.runtime.protocol.OUTPUT_TYPES`):

- ``np``: the float32 array itself, exact (the default; 4 bytes per channel value).
- ``uint8``: ``(clip(x, 0, 1) * 255).round()`` as uint8, the rounding diffusers'
  ``numpy_to_pil`` applies (decode's output is already in [0, 1]); 4x smaller.
- ``png``: that uint8 image as PNG (lossless: it decodes to the uint8 array exactly).
  Images only.
- ``mp4``: the uint8 frames as H.264 (libx264, yuv420p, CRF 18, ``veryfast``) in MP4 at
  ``fps`` frames per second. Lossy; odd heights or widths are padded by one pixel
  (repeating the edge), since yuv420p halves both. Videos only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from trident.runtime.protocol import OUTPUT_TYPES, OutputType

__all__ = [
    "DEFAULT_FPS",
    "ENCODED_TYPES",
    "IMAGE_FORMATS",
    "MEDIA_TYPES",
    "OUTPUT_TYPES",
    "OutputType",
    "check_output_type",
    "decode_mp4",
    "decode_png",
    "encode_image",
    "encode_mp4",
    "encode_mp4_bytes",
    "encode_output",
    "to_uint8",
    "write_atomic",
]

DEFAULT_FPS = 16
# Output types that travel as an encoded file (bytes), not as an array.
ENCODED_TYPES: tuple[OutputType, ...] = ("png", "mp4")
IMAGE_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
}
# to_uint8's block: 256 Ki float32 values (1 MiB), a cache-sized temporary.
_BLOCK = 1 << 18
# H.264 settings of every MP4 Trident writes (visually lossless at CRF 18).
_X264_OPTIONS = {"crf": "18", "preset": "veryfast"}


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor: no torch import needed to read it
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def to_uint8(array: Any) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255]: ``(clip(x, 0, 1) * 255).round()`` in float32 (the
    rounding of diffusers' ``numpy_to_pil``); a uint8 array is returned as it is."""
    a = _as_numpy(array)
    if a.dtype == np.uint8:
        return a
    flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    # The same float32 operations, block by block (cache-sized: ~4x faster than whole-
    # array temporaries on a 720p clip); np.rint is what ndarray.round() does.
    buf = np.empty(min(flat.size, _BLOCK), dtype=np.float32)
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        tmp = buf[: block.size]
        np.clip(block, 0.0, 1.0, out=tmp)
        np.multiply(tmp, np.float32(255.0), out=tmp)
        np.rint(tmp, out=tmp)
        out[start : start + block.size] = tmp
    return out.reshape(a.shape)


def check_output_type(output_type: object, *, is_video: bool, model: str = "the model") -> str:
    """``output_type`` if ``model`` (an image or a video model) can give it; raises
    ValueError with a message naming what is allowed otherwise."""
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    if output_type == "png" and is_video:
        raise ValueError(
            f"output_type='png' is for image models; {model} makes videos: use 'mp4', "
            "'uint8' or 'np'"
        )
    if output_type == "mp4" and not is_video:
        raise ValueError(
            f"output_type='mp4' is for video models; {model} makes images: use 'png', "
            "'uint8' or 'np'"
        )
    return output_type


def encode_image(array: Any, fmt: str = "png", quality: int | None = None) -> bytes:
    """One image ``(H, W, 3)`` (a video's first frame when given ``(F, H, W, 3)``),
    float in [0, 1] or uint8, as ``fmt`` bytes; ``quality`` 0-100 for jpeg and webp
    (OpenAI's output_compression)."""
    from PIL import Image

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {IMAGE_FORMATS}")
    pixels = to_uint8(array)
    if pixels.ndim == 4:
        pixels = pixels[0]
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected an image (H, W, 3), got shape {pixels.shape}")
    buf = io.BytesIO()
    options: dict[str, Any] = {}
    if fmt in ("jpeg", "webp"):
        options["quality"] = 90 if quality is None else int(quality)
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buf, format=fmt.upper(), **options)
    return buf.getvalue()


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad height and width to even sizes (yuv420p halves both), repeating the edge."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def _frames(array: Any) -> np.ndarray:
    frames = to_uint8(array)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected frames (F, H, W, 3), got shape {frames.shape}")
    return np.ascontiguousarray(_even(frames))


def _write_mp4(frames: np.ndarray, target: Any, fps: float) -> None:
    import av

    rate = max(1, round(fps))
    with av.open(target, mode="w", format="mp4") as container:
        stream: Any = container.add_stream("libx264", rate=rate)
        stream.width = int(frames.shape[2])
        stream.height = int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = dict(_X264_OPTIONS)
        for f in frames:
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def encode_mp4_bytes(array: Any, fps: float = DEFAULT_FPS) -> bytes:
    """``(F, H, W, 3)`` frames (an ``(H, W, 3)`` image is one frame), float in [0, 1] or
    uint8, as the bytes of an MP4 file (H.264, see the module doc)."""
    frames = _frames(array)
    buf = io.BytesIO()
    _write_mp4(frames, buf, fps)
    return buf.getvalue()


def write_atomic(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` at ``path`` through a temporary name and a rename: a reader never
    sees half a file."""
    out = Path(path)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def encode_mp4(array: Any, path: str | os.PathLike[str], fps: float = DEFAULT_FPS) -> Path:
    """Write ``(F, H, W, 3)`` frames as an MP4 at ``path`` (:func:`encode_mp4_bytes`,
    written atomically)."""
    return write_atomic(encode_mp4_bytes(array, fps), path)


def encode_output(
    array: Any, output_type: str, *, fps: float = DEFAULT_FPS
) -> tuple[np.ndarray | bytes, tuple[int, ...]]:
    """Decode's output as ``output_type``: ``(value, shape)``, where ``value`` is an
    array (``np``: float32, ``uint8``) or the encoded file's bytes (``png``, ``mp4``) and
    ``shape`` the decoded array's shape. ``np`` returns ``array`` itself, untouched."""
    if output_type == "np":
        value = array if isinstance(array, np.ndarray) else _as_numpy(array)
        return value, tuple(int(d) for d in value.shape)
    pixels = to_uint8(array)
    shape = tuple(int(d) for d in pixels.shape)
    if output_type == "uint8":
        return np.ascontiguousarray(pixels), shape
    if output_type == "png":
        if pixels.ndim != 3:
            raise ValueError(f"png encodes one image (H, W, 3), got shape {shape}")
        return encode_image(pixels, "png"), shape
    if output_type == "mp4":
        return encode_mp4_bytes(pixels, fps), shape
    raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")


def decode_png(data: bytes) -> np.ndarray:
    """A PNG's pixels as uint8 ``(H, W, 3)``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def decode_mp4(data: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An MP4's frames as uint8 ``(F, H, W, 3)``, cropped to ``shape``'s height and
    width when given (undoing the padding of odd sizes)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("the video has no frames")
    out = np.stack(frames)
    if shape is not None and len(shape) >= 3:
        out = out[:, : shape[-3], : shape[-2]]
    return np.ascontiguousarray(out)
