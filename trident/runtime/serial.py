"""Tensors on the wire: a msgpack-able description plus one raw frame per tensor.

No pickle: a tensor travels as ``{"name", "dtype", "shape"}`` in the header and its
bytes as a separate ZeroMQ frame sent with ``copy=False`` (the frame borrows the
tensor's memory). On receipt the tensor is rebuilt over the frame's buffer without a
copy; it is therefore read-only — clone before changing it.

Works for torch tensors and numpy arrays; torch is imported only when a torch tensor
is packed or ``as_torch=True`` is asked on unpack, so simulated workers stay light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trident.errors import ProtocolError

__all__ = ["MAX_TENSOR_BYTES", "pack_tensors", "unpack_tensors"]

# Largest single tensor accepted from the wire (guards against absurd headers).
MAX_TENSOR_BYTES = 8 << 30

# torch dtype names that numpy cannot view directly travel as raw bytes of this width.
_TORCH_ONLY = {"bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
_NUMPY_OK = {
    "float64",
    "float32",
    "float16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
}


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def pack_tensors(tensors: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Describe and expose the tensors of ``tensors`` for a zero-copy multipart send.

    Returns ``(meta, frames)``: ``meta`` goes into the msgpack header, ``frames`` after
    it (buffer-protocol objects sharing the tensors' memory).
    """
    meta: list[dict[str, Any]] = []
    frames: list[Any] = []
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            meta.append(
                {"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape), "lib": "np"}
            )
            frames.append(memoryview(arr).cast("B") if arr.size else b"")  # type: ignore[arg-type]
            continue
        # torch tensor (duck-typed so this module never imports torch itself)
        if not hasattr(value, "detach"):
            raise TypeError(
                f"tensor {name!r}: expected a torch.Tensor or numpy array, got {type(value)}"
            )
        t = value.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        dtype = _torch_dtype_name(t.dtype)
        meta.append({"name": name, "dtype": dtype, "shape": list(t.shape), "lib": "torch"})
        if t.numel() == 0:
            frames.append(b"")
        elif dtype in _NUMPY_OK:
            frames.append(memoryview(t.numpy()).cast("B"))
        else:
            import torch

            frames.append(memoryview(t.view(torch.uint8).numpy()).cast("B"))
    return meta, frames


def unpack_tensors(
    meta: Sequence[Any], frames: Sequence[Any], *, as_torch: bool | None = None
) -> dict[str, Any]:
    """Rebuild tensors described by ``meta`` over ``frames`` (zero-copy, read-only).

    ``as_torch``: None keeps each tensor's original library, True/False forces one.
    Raises ProtocolError when the header and frames disagree.
    """
    if len(meta) != len(frames):
        raise ProtocolError(f"{len(meta)} tensors described but {len(frames)} frames received")
    out: dict[str, Any] = {}
    for desc, frame in zip(meta, frames, strict=True):
        if not isinstance(desc, Mapping):  # a protocol.TensorDesc struct
            desc = {f: getattr(desc, f, None) for f in ("name", "dtype", "shape", "lib")}
        try:
            name = str(desc["name"])
            dtype = str(desc["dtype"])
            shape = tuple(int(d) for d in desc["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed tensor description {desc!r}") from exc
        if any(d < 0 for d in shape):
            raise ProtocolError(f"tensor {name!r}: negative dimension in {shape}")
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        mv = memoryview(buf).cast("B")
        count = 1
        for d in shape:
            count *= d
        width = _TORCH_ONLY.get(dtype)
        if width is None:
            if dtype not in _NUMPY_OK:
                raise ProtocolError(f"tensor {name!r}: unsupported dtype {dtype!r}")
            width = np.dtype(dtype).itemsize
        if count * width != mv.nbytes:
            raise ProtocolError(
                f"tensor {name!r}: {dtype}{list(shape)} needs {count * width} bytes, frame has {mv.nbytes}"
            )
        if count * width > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor {name!r} exceeds {MAX_TENSOR_BYTES} bytes")
        want_torch = desc.get("lib") == "torch" if as_torch is None else as_torch
        if dtype in _TORCH_ONLY:
            import torch

            raw = np.frombuffer(mv, dtype=np.uint8) if mv.nbytes else np.empty(0, np.uint8)
            t = torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)
            out[name] = t if want_torch else t.float().numpy()
            continue
        arr = (
            np.frombuffer(mv, dtype=np.dtype(dtype)) if mv.nbytes else np.empty(0, np.dtype(dtype))
        )
        arr = arr.reshape(shape)
        if want_torch:
            import warnings

            import torch

            with warnings.catch_warnings():
                # from_numpy warns that the buffer is not writable: we know, see module doc.
                warnings.simplefilter("ignore", UserWarning)
                out[name] = torch.from_numpy(arr)
        else:
            out[name] = arr
    return out
