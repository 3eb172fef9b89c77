"""Malformed messages for fuzzing Trident's sockets (tests and ``trident bench chaos``).

Built from the protocol's own struct definitions (:mod:`trident.runtime.protocol`), so
every message type and every field is covered as the protocol grows: a valid sample of
each type, then each field replaced by values of the wrong type or out of bounds,
fields dropped, unknown tags, wrong protocol versions, truncated encodings, random
bytes, deep nesting, and wrong frame counts. Deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgspec
import msgspec.inspect as mi

from trident.runtime import protocol

__all__ = ["malformed_messages", "valid_sample"]

# Values that break type or bounds somewhere: every field gets each of them.
_CONFUSED: tuple[Any, ...] = (
    None,
    True,
    False,
    -1,
    0,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    float("nan"),
    float("inf"),
    -float("inf"),
    "",
    "x" * 70_000,
    b"\x00\xff",
    [],
    [None],
    [1, "a"],
    {},
    {"": None},
    {"a": [1]},
    "abc",
)


def _sample(t: mi.Type) -> Any:
    if isinstance(t, mi.StrType):
        return "x" * max(1, t.min_length or 1)
    if isinstance(t, mi.IntType):
        if t.ge is not None:
            return t.ge
        return t.gt + 1 if t.gt is not None else 0
    if isinstance(t, mi.FloatType):
        lo = t.ge if t.ge is not None else (t.gt if t.gt is not None else 0.0)
        return float(lo) + 0.5
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.ListType):
        return [_sample(t.item_type)] * (t.min_length or 0)
    if isinstance(t, mi.DictType):
        return {}
    if isinstance(t, mi.StructType):
        out: dict[str, Any] = {}
        if t.tag_field is not None:
            out[t.tag_field] = t.tag
        for f in t.fields:
            out[f.encode_name] = _sample(f.type)
        return out
    if isinstance(t, mi.UnionType):
        non_none = [x for x in t.types if not isinstance(x, mi.NoneType)]
        return _sample(non_none[0]) if non_none else None
    if isinstance(t, mi.NoneType):
        return None
    return 0  # Any


def valid_sample(cls: type[Any]) -> dict[str, Any]:
    """A minimal valid message of ``cls`` as a msgpack-able map."""
    sample = _sample(mi.type_info(cls))
    if cls is protocol.NodeHello or cls is protocol.WorkerHello:
        sample["version"] = protocol.PROTOCOL_VERSION
    return sample


def _pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def _nested(depth: int) -> bytes:
    # a list nested `depth` deep, written by hand (an encoder would recurse)
    return b"\x91" * depth + b"\xc0"


def malformed_messages(seed: int = 0, count: int = 100_000) -> Iterator[list[bytes]]:
    """``count`` multipart messages that no channel should accept (deterministic).

    Each is a list of frames (header first). A few are valid messages of a type the
    receiving channel does not carry — still refused, by channel.
    """
    rng = random.Random(seed)
    types = protocol.message_types()
    samples = [valid_sample(cls) for cls in types]
    produced = 0

    def emit(frames: list[bytes]) -> bool:
        nonlocal produced
        produced += 1
        return produced >= count

    while True:
        for sample in samples:
            tag = sample["t"]
            fields = [k for k in sample if k != "t"]
            for name in fields:
                for bad in _CONFUSED:
                    if bad == sample[name] and type(bad) is type(sample[name]):
                        continue
                    mutated = dict(sample)
                    mutated[name] = bad
                    yield [_pack(mutated)]
                    if emit([]):
                        return
                dropped = {k: v for k, v in sample.items() if k != name}
                yield [_pack(dropped)]
                if emit([]):
                    return
            # wrong tag, wrong version, extra and missing frames, truncation
            for frames in (
                [_pack({**sample, "t": tag + "_x"})],
                [_pack({**sample, "t": rng.choice([1, None, [tag], {"t": tag}])})],
                [_pack({**sample, "version": rng.randint(-5, 99)})]
                if "version" in sample
                else [_pack(sample[fields[0]] if fields else 0)],
                [_pack(sample), b"extra frame"],
                [_pack(sample)[: rng.randint(0, max(0, len(_pack(sample)) - 1))]],
                [_pack(list(sample.values()))],
            ):
                yield frames
                if emit(frames):
                    return
        # shapeless input
        for _ in range(200):
            n = rng.randint(0, 512)
            frames = [rng.randbytes(n)]
            if rng.random() < 0.2:
                frames.append(rng.randbytes(rng.randint(0, 64)))
            yield frames
            if emit(frames):
                return
        for frames in (
            [_nested(rng.randint(100, 5000))],
            [b""],
            [_pack(rng.random())],
            [_pack({"t": "submit", "id": "a" * 200, "model": "m", "params": []})],
        ):
            yield frames
            if emit(frames):
                return
