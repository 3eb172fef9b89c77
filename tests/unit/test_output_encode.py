"""Output encoding (trident/runtime/encode.py) and how an output type travels: the SDK's
check, the scheduler's admission, the worker's encoding and the result the SDK builds.
No sockets: the real-process paths are tests/integration/test_output_types.py."""

from __future__ import annotations

import io

import numpy as np
import pytest

from trident.client import GenerateResult, _result_from, _submit_message
from trident.errors import InvalidRequestError
from trident.runtime import protocol
from trident.runtime.encode import (
    check_output_type,
    decode_mp4,
    decode_png,
    encode_image,
    encode_mp4,
    encode_mp4_bytes,
    encode_output,
    to_uint8,
)
from trident.runtime.serial import pack_tensors

pytestmark = pytest.mark.timeout(60)


def _image(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _video(f: int = 9, h: int = 32, w: int = 48) -> np.ndarray:
    """A smooth moving gradient, float32 in [0, 1]."""
    t = np.arange(f, dtype=np.float32)[:, None, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[None, :, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, None, :]
    r = 0.5 + 0.5 * np.sin(2 * np.pi * (x + 0.05 * t))
    g = 0.5 + 0.5 * np.cos(2 * np.pi * (y - 0.03 * t))
    b = (x + y) / 2 + 0 * t
    r, g, b = np.broadcast_arrays(r, g, b)
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def test_to_uint8_is_numpy_to_pil_rounding() -> None:
    img = _image()
    img[0, 0] = [0.0, 1.0, 0.5]
    expected = (img * 255).round().astype("uint8")  # diffusers' numpy_to_pil
    assert np.array_equal(to_uint8(img), expected)
    # clipped outside [0, 1]; uint8 passes through
    assert to_uint8(np.array([[[-0.5, 1.5, 2 / 255]]], np.float32)).tolist() == [[[0, 255, 2]]]
    assert to_uint8(expected) is expected
    # across to_uint8's blocks, halves included (round half to even, as ndarray.round)
    big = np.random.default_rng(1).random((3, 300, 301, 3), dtype=np.float32) * 1.2 - 0.1
    big.flat[::7] = np.arange(big.size)[::7] % 256 / np.float32(255) + np.float32(0.5 / 255)
    assert np.array_equal(to_uint8(big), (np.clip(big, 0, 1) * 255).round().astype(np.uint8))


def test_png_round_trips_to_the_uint8_array_exactly() -> None:
    img = _image(17, 31)  # odd sizes are fine for PNG
    data = encode_image(img, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode_png(data), to_uint8(img))
    value, shape = encode_output(img, "png")
    assert isinstance(value, bytes) and shape == (17, 31, 3)
    assert np.array_equal(decode_png(value), to_uint8(img))


@pytest.mark.parametrize("size", [(32, 48), (33, 47)])
def test_mp4_decodes_to_the_right_frame_count_and_size(size: tuple[int, int]) -> None:
    h, w = size
    video = _video(9, h, w)
    data = encode_mp4_bytes(video, fps=8)
    assert data[4:8] == b"ftyp"
    import av

    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == 8
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9
    assert frames[0].shape == (h + h % 2, w + w % 2, 3)  # odd sizes padded by one
    decoded = decode_mp4(data, (9, h, w, 3))
    assert decoded.shape == (9, h, w, 3)
    # lossy but close (mostly 4:2:0 chroma on so small and colourful a frame: ~1.4 at
    # 256x384)
    err = np.abs(decoded.astype(np.int16) - to_uint8(video).astype(np.int16))
    assert float(err.mean()) < 8.0


def test_encode_mp4_to_a_path_is_the_same_encoder(tmp_path, monkeypatch) -> None:
    import trident.runtime.encode as encode_module

    video = _video(5, 16, 16)
    out = encode_mp4(video, tmp_path / "v.mp4", fps=16)
    assert not (tmp_path / "v.mp4.part").exists()
    # The same pictures as the in-memory encoder's. Not the same bytes: two encodes of
    # one array once differed in their H.264 stream (57 bytes of 1.7 KB) in a CI run
    # with two pytest workers; never reproduced alone (300 encodes, any alignment).
    got = decode_mp4(out.read_bytes(), (5, 16, 16, 3)).astype(np.int16)
    want = decode_mp4(encode_mp4_bytes(video, fps=16), (5, 16, 16, 3)).astype(np.int16)
    assert float(np.abs(got - want).mean()) < 1.0
    # ... and what it writes is exactly what encode_mp4_bytes returns.
    monkeypatch.setattr(encode_module, "encode_mp4_bytes", lambda array, fps=16: b"mp4 bytes")
    assert encode_mp4(video, tmp_path / "w.mp4").read_bytes() == b"mp4 bytes"
    # the gateway uses this very implementation
    from trident.gateway import encode as gateway_encode

    assert gateway_encode.encode_mp4 is encode_mp4 and gateway_encode.encode_image is encode_image


def test_encode_output_per_type() -> None:
    img = _image()
    value, shape = encode_output(img, "np")
    assert value is img and shape == img.shape
    value, shape = encode_output(img, "uint8")
    assert isinstance(value, np.ndarray) and value.dtype == np.uint8
    assert np.array_equal(value, to_uint8(img))
    value, shape = encode_output(_video(3, 16, 16), "mp4", fps=4)
    assert isinstance(value, bytes) and shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match="png encodes one image"):
        encode_output(_video(3, 16, 16), "png")
    with pytest.raises(ValueError, match="output_type must be one of"):
        encode_output(img, "gif")


def test_check_output_type() -> None:
    assert check_output_type("png", is_video=False) == "png"
    assert check_output_type("mp4", is_video=True) == "mp4"
    for t in ("np", "uint8"):
        assert check_output_type(t, is_video=True) == check_output_type(t, is_video=False) == t
    with pytest.raises(ValueError, match="is for video models"):
        check_output_type("mp4", is_video=False, model="flux")
    with pytest.raises(ValueError, match="is for image models"):
        check_output_type("png", is_video=True, model="wan")
    for bad in ("gif", 3, None, "NP"):
        with pytest.raises(ValueError, match="must be one of"):
            check_output_type(bad, is_video=False)


def test_the_sdk_refuses_bad_output_types_before_sending() -> None:
    for bad in ("gif", 3, "jpeg", None):
        with pytest.raises(InvalidRequestError, match="output_type"):
            _submit_message("r1", "flux", {"prompt": "x"}, None, True, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="fps"):
        _submit_message("r1", "wan", {"prompt": "x"}, None, True, "mp4", 0)
    header, _ = _submit_message("r1", "wan", {"prompt": "x"}, None, True, "mp4", 8)
    msg, _ = protocol.decode([header], protocol.CLIENT_TO_SCHEDULER)
    assert msg.output_type == "mp4" and msg.fps == 8
    # the default is what it always was: np, no fps
    header, _ = _submit_message("r2", "flux", {"prompt": "x"}, None, True)
    msg, _ = protocol.decode([header], protocol.CLIENT_TO_SCHEDULER)
    assert msg.output_type == "np" and msg.fps is None


def test_the_scheduler_edge_refuses_a_bad_output_type_with_the_request_id() -> None:
    import msgspec

    raw = msgspec.msgpack.encode(
        {"t": "submit", "id": "r9", "model": "flux", "params": {"prompt": "x"}, "output_type": 5}
    )
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.decode([raw], protocol.CLIENT_TO_SCHEDULER)
    assert info.value.request_id == "r9" and "output_type" in info.value.message


def test_admission_params_per_output_type() -> None:
    from trident.config import ModelSpec
    from trident.runtime.registry import register_models
    from trident.runtime.scheduler import output_params

    served = register_models([ModelSpec("flux", family="flux"), ModelSpec("wan", family="wan")])
    assert output_params(served["flux"], "np", None) == {}  # np requests are unchanged
    assert output_params(served["flux"], "png", None) == {"output_type": "png"}
    assert output_params(served["wan"], "mp4", None) == {"output_type": "mp4", "output_fps": 16}
    assert output_params(served["wan"], "mp4", 8)["output_fps"] == 8
    assert output_params(served["wan"], "uint8", None) == {"output_type": "uint8"}
    for model, kind, fps in (("flux", "mp4", None), ("wan", "png", None), ("flux", "png", 8)):
        with pytest.raises(InvalidRequestError):
            output_params(served[model], kind, fps)


def test_the_worker_takes_the_output_type_out_of_the_stages_params() -> None:
    from trident.runtime.worker import _encode_output, _take_output

    params = {"prompt": "x", "height": 32, "output_type": "mp4", "output_fps": 8}
    rest, output = _take_output(params)
    assert rest == {"prompt": "x", "height": 32} and output == ("mp4", 8)
    assert "output_type" in params  # the message's own dict is left alone
    assert _take_output({"prompt": "x"}) == ({"prompt": "x"}, None)
    outputs, info = _encode_output({"output": _video(3, 16, 16)}, "mp4", 8)
    assert info.type == "mp4" and info.shape == [3, 16, 16, 3] and info.seconds >= 0
    assert outputs["output"].dtype == np.uint8 and outputs["output"].ndim == 1
    with pytest.raises(ValueError):
        _encode_output({"latents": np.zeros(3)}, "png", 16)


def _result(value: np.ndarray, info: protocol.OutputInfo | None) -> GenerateResult:
    meta, frames = pack_tensors({"output": value})
    msg = protocol.Result(
        id="r1",
        timings={"total": 1.0},
        devices={},
        tensors=[protocol.TensorDesc(**m) for m in meta],
        output=info,
    )
    return _result_from(msg, [bytes(memoryview(f)) for f in frames], "m", {})


def test_generate_result_per_output_type() -> None:
    img = _image()
    r = _result(img, None)
    assert r.output_type == "np" and r.format is None and r.shape == img.shape
    assert r.array.dtype == np.float32 and np.array_equal(r.array, img) and not r.is_video
    with pytest.raises(ValueError, match="gives an array"):
        _ = r.data
    assert np.array_equal(np.asarray(r.images[0]), to_uint8(img))

    r = _result(to_uint8(img), protocol.OutputInfo(type="uint8", shape=list(img.shape)))
    assert r.output_type == "uint8" and r.array.dtype == np.uint8 and r.format is None
    assert np.array_equal(r.array, to_uint8(img))

    png = np.frombuffer(encode_image(img, "png"), np.uint8)
    r = _result(png, protocol.OutputInfo(type="png", shape=list(img.shape)))
    assert r.format == "png" and isinstance(r.data, bytes) and r.data[:4] == b"\x89PNG"
    assert r.shape == img.shape and np.array_equal(r.array, to_uint8(img))

    video = _video(5, 17, 16)
    mp4 = np.frombuffer(encode_mp4_bytes(video), np.uint8)
    r = _result(mp4, protocol.OutputInfo(type="mp4", shape=list(video.shape)))
    assert r.format == "mp4" and r.is_video and r.data[4:8] == b"ftyp"
    assert r.array.shape == video.shape and len(r.images) == 5
