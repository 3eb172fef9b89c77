"""Workload traces: the paper code's traces, synthetic arrivals, and a JSON Lines format.

A trace is a list of :class:`TraceRequest`, sorted by arrival time. Anyone can write
one by hand; the file format is JSON Lines, one request per line::

    {"arrival_s": 0.0, "model": "flux", "height": 1024, "width": 1024,
     "num_frames": 1, "num_inference_steps": 28}
    {"arrival_s": 0.7, "model": "cogvideox", "height": 768, "width": 1360,
     "num_frames": 33, "num_inference_steps": 50, "slo_s": 400.0, "guidance_scale": 6.0}

Required keys: ``arrival_s`` (seconds from the start, >= 0), ``model`` (a family
name such as ``flux`` or a served model name), ``height``, ``width``,
``num_inference_steps``. Optional: ``num_frames`` (default 1 = an image), ``slo_s``
(an explicit latency budget in seconds; default: the benchmark's ``slo_scale`` x the
request's standalone latency), ``guidance_scale`` (> 1 means classifier-free guidance,
which doubles the diffuse batch), ``request_id`` (default ``r<index>``, by arrival order). Blank lines and
lines starting with ``#`` are skipped. Unknown keys are an error (typos would otherwise
pass silently).

Built-in traces (:data:`TRACES`) follow the authors' code: a constant inter-arrival
gap, an equal mix of shapes. ``arrival`` turns the gaps into a Poisson process or a
bursty gamma process (coefficient of variation ``cv`` > 1) at the same mean rate.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeAlias

from trident.families import FAMILIES
from trident.sched.types import RequestSpec, Shape

__all__ = [
    "ARRIVALS",
    "CFG_FAMILIES",
    "FAMILY_SHAPES",
    "TRACES",
    "VIDEO_FAMILIES",
    "Arrival",
    "TraceError",
    "TraceRequest",
    "TraceSpec",
    "arrival_times",
    "dump_trace",
    "dumps_trace",
    "load_trace",
    "loads_trace",
    "make_trace",
    "to_request_specs",
]

Arrival: TypeAlias = Literal["constant", "poisson", "bursty"]
ARRIVALS: tuple[Arrival, ...] = ("constant", "poisson", "bursty")

VIDEO_FAMILIES = frozenset(name for name, spec in FAMILIES.items() if spec.is_video)
# Families whose default pipeline runs classifier-free guidance (a doubled batch).
CFG_FAMILIES = frozenset(name for name, spec in FAMILIES.items() if spec.uses_cfg)


class TraceError(ValueError):
    """A malformed trace file or an impossible trace request."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace (what a client would send, and when)."""

    arrival_s: float
    model: str
    height: int
    width: int
    num_frames: int = 1
    num_inference_steps: int = 28
    slo_s: float | None = None
    guidance_scale: float | None = None
    request_id: str | None = None

    @property
    def shape(self) -> Shape:
        cfg = self.guidance_scale is not None and self.guidance_scale > 1.0
        return Shape(
            height=self.height,
            width=self.width,
            num_frames=self.num_frames,
            num_inference_steps=self.num_inference_steps,
            cfg=cfg,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "arrival_s": self.arrival_s,
            "model": self.model,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "num_inference_steps": self.num_inference_steps,
        }
        if self.slo_s is not None:
            out["slo_s"] = self.slo_s
        if self.guidance_scale is not None:
            out["guidance_scale"] = self.guidance_scale
        if self.request_id is not None:
            out["request_id"] = self.request_id
        return out


# --------------------------------------------------------------------------- file format

_REQUIRED = ("arrival_s", "model", "height", "width", "num_inference_steps")
_OPTIONAL = ("num_frames", "slo_s", "guidance_scale", "request_id")
_LIMITS = {"height": 16384, "width": 16384, "num_frames": 4096, "num_inference_steps": 10000}


def _int_field(obj: Mapping[str, Any], key: str, default: int | None, where: str) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TraceError(f"{where}: {key!r} must be an integer, got {value!r}")
    if value < 1 or value > _LIMITS[key]:
        raise TraceError(f"{where}: {key!r} must be in 1..{_LIMITS[key]}, got {value}")
    return value


def _float_field(obj: Mapping[str, Any], key: str, where: str, *, positive: bool) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"{where}: {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise TraceError(f"{where}: {key!r} must be a finite number {bound}, got {value}")
    return value


def _parse_obj(obj: Any, where: str) -> TraceRequest:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise TraceError(f"{where}: missing required key(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise TraceError(
            f"{where}: unknown key(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(_REQUIRED + _OPTIONAL)})"
        )
    model = obj["model"]
    if not isinstance(model, str) or not model:
        raise TraceError(f"{where}: 'model' must be a non-empty string, got {model!r}")
    request_id = obj.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        raise TraceError(f"{where}: 'request_id' must be a non-empty string")
    arrival = _float_field(obj, "arrival_s", where, positive=False)
    assert arrival is not None
    return TraceRequest(
        arrival_s=arrival,
        model=model,
        height=_int_field(obj, "height", None, where),
        width=_int_field(obj, "width", None, where),
        num_frames=_int_field(obj, "num_frames", 1, where),
        num_inference_steps=_int_field(obj, "num_inference_steps", None, where),
        slo_s=_float_field(obj, "slo_s", where, positive=True),
        guidance_scale=_float_field(obj, "guidance_scale", where, positive=False),
        request_id=request_id,
    )


def _parse_lines(lines: Iterable[str], source: str) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    ids: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        req = _parse_obj(obj, where)
        if req.request_id is not None:
            if req.request_id in ids:
                raise TraceError(
                    f"{where}: duplicate request_id {req.request_id!r} "
                    f"(first on line {ids[req.request_id]})"
                )
            ids[req.request_id] = lineno
        out.append(req)
    # Stable sort: equal arrival times keep file order.
    out.sort(key=lambda r: r.arrival_s)
    return out


def loads_trace(text: str, source: str = "<string>") -> list[TraceRequest]:
    """Parse JSON Lines text into requests sorted by arrival; errors name the line."""
    return _parse_lines(text.splitlines(), source)


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSON Lines trace file (see the module doc for the format)."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as fh:
            return _parse_lines(fh, str(p))
    except OSError as exc:
        raise TraceError(f"{p}: cannot read trace file: {exc.strerror}") from None


def dumps_trace(requests: Iterable[TraceRequest]) -> str:
    """Serialise requests as JSON Lines."""
    return "".join(json.dumps(r.to_json(), separators=(", ", ": ")) + "\n" for r in requests)


def dump_trace(requests: Iterable[TraceRequest], path: str | Path | IO[str]) -> None:
    """Write requests as a JSON Lines trace file (or to an open text stream)."""
    text = dumps_trace(requests)
    if isinstance(path, str | Path):
        Path(path).write_text(text, encoding="utf-8")
    else:
        path.write(text)


# --------------------------------------------------------------------------- arrivals


def arrival_times(
    n: int, rate: float, arrival: Arrival, rng: random.Random, *, cv: float = 3.0
) -> list[float]:
    """``n`` arrival times at mean ``rate`` req/s, the first at t=0.

    ``constant``: a fixed gap 1/rate (the authors' traces). ``poisson``: exponential
    gaps. ``bursty``: gamma gaps with coefficient of variation ``cv`` (shape 1/cv²),
    the usual model of bursty serving traffic.
    """
    if rate <= 0:
        raise TraceError(f"rate must be > 0, got {rate}")
    if arrival not in ARRIVALS:
        raise TraceError(f"unknown arrival process {arrival!r} (one of {', '.join(ARRIVALS)})")
    gap = 1.0 / rate
    times: list[float] = []
    t = 0.0
    for _ in range(n):
        times.append(t)
        if arrival == "constant":
            t += gap
        elif arrival == "poisson":
            t += rng.expovariate(rate)
        else:
            shape = 1.0 / (cv * cv)
            t += rng.gammavariate(shape, gap / shape)
    return times


# --------------------------------------------------------------------------- built-in traces

ShapeTuple: TypeAlias = tuple[int, int, int, int]  # height, width, frames, steps

# The authors' trace shapes (equal mix), per family; steps as the paper code uses them.
FAMILY_SHAPES: dict[str, tuple[ShapeTuple, ...]] = {
    "flux": tuple((s, s, 1, 28) for s in (128, 256, 512, 1024, 2048)),
    "sd3": tuple((s, s, 1, 20) for s in (128, 256, 512, 1024, 1536)),
    "cogvideox": tuple((768, w, f, 50) for w in (1360, 432) for f in (17, 33, 65, 81)),
    "hunyuanvideo": tuple(
        (h, w, f, 50) for (h, w) in ((720, 1280), (960, 544)) for f in (17, 33, 65, 129)
    ),
}
_DEFAULT_RATE = {"flux": 1.5, "sd3": 1.5, "cogvideox": 1.5, "hunyuanvideo": 1.0}
_IMAGE = tuple(fam for fam in FAMILY_SHAPES if not FAMILIES[fam].is_video)
_VIDEO = tuple(fam for fam in FAMILY_SHAPES if FAMILIES[fam].is_video)


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """A built-in trace: its default rate (req/s) and a one-line description."""

    name: str
    rate: float
    description: str
    build: Callable[[int, random.Random, float, float], list[tuple[str, ShapeTuple]]]


def _single(
    family: str,
) -> Callable[[int, random.Random, float, float], list[tuple[str, ShapeTuple]]]:
    def build(n: int, rng: random.Random, p0: float, p1: float) -> list[tuple[str, ShapeTuple]]:
        shapes = FAMILY_SHAPES[family]
        return [(family, rng.choice(shapes)) for _ in range(n)]

    return build


def _small_images(n: int, rng: random.Random, p0: float, p1: float) -> list[tuple[str, ShapeTuple]]:
    # The small end of the flux and sd3 traces: where batching pays (bench/batching.md).
    shapes = [("flux", sh) for sh in FAMILY_SHAPES["flux"][:2]]
    shapes += [("sd3", sh) for sh in FAMILY_SHAPES["sd3"][:2]]
    return [rng.choice(shapes) for _ in range(n)]


def _mixed(n: int, rng: random.Random, p0: float, p1: float) -> list[tuple[str, ShapeTuple]]:
    fams = tuple(FAMILY_SHAPES)
    out = []
    for _ in range(n):
        fam = rng.choice(fams)
        out.append((fam, rng.choice(FAMILY_SHAPES[fam])))
    return out


def _shifting(n: int, rng: random.Random, p0: float, p1: float) -> list[tuple[str, ShapeTuple]]:
    out = []
    for i in range(n):
        frac = i / max(1, n - 1)
        p_video = p0 + (p1 - p0) * frac
        fams = _VIDEO if rng.random() < p_video else _IMAGE
        fam = rng.choice(fams)
        out.append((fam, rng.choice(FAMILY_SHAPES[fam])))
    return out


# Four pipelines sharing one cluster (issue #14's mix): images at 28 steps, 256^2-2048^2;
# videos from the authors' shapes at few steps (distilled / fast samplers).
_FOUR_SHARES = (("flux", 0.45), ("sd3", 0.35), ("cogvideox", 0.13), ("hunyuanvideo", 0.07))
_FOUR_SHAPES: dict[str, tuple[ShapeTuple, ...]] = {
    "flux": tuple((s, s, 1, 28) for s in (256, 512, 1024, 2048)),
    "sd3": tuple((s, s, 1, 28) for s in (256, 512, 1024, 2048)),
    "cogvideox": tuple((h, w, f, 6) for (h, w, f, _) in FAMILY_SHAPES["cogvideox"]),
    "hunyuanvideo": tuple((h, w, f, 8) for (h, w, f, _) in FAMILY_SHAPES["hunyuanvideo"]),
}


def _four_pipelines(
    n: int, rng: random.Random, p0: float, p1: float
) -> list[tuple[str, ShapeTuple]]:
    fams = [f for f, _ in _FOUR_SHARES]
    weights = [w for _, w in _FOUR_SHARES]
    out = []
    for _ in range(n):
        fam = rng.choices(fams, weights)[0]
        out.append((fam, rng.choice(_FOUR_SHAPES[fam])))
    return out


TRACES: dict[str, TraceSpec] = {
    **{
        fam: TraceSpec(
            fam,
            _DEFAULT_RATE[fam],
            f"{fam}: {len(FAMILY_SHAPES[fam])} shapes, equal mix, "
            f"{FAMILY_SHAPES[fam][0][3]} steps, {_DEFAULT_RATE[fam]} req/s",
            _single(fam),
        )
        for fam in FAMILY_SHAPES
    },
    "mixed": TraceSpec("mixed", 1.0, "flux, sd3, cogvideox, hunyuanvideo in equal shares", _mixed),
    "four-pipelines": TraceSpec(
        "four-pipelines",
        2.6,
        "45% flux, 35% sd3 (28 steps, 256^2-2048^2), 13% cogvideox (6 steps), "
        "7% hunyuanvideo (8 steps); 2.6 req/s",
        _four_pipelines,
    ),
    "small-images": TraceSpec(
        "small-images",
        6.0,
        "flux 128^2/256^2 (28 steps) and sd3 128^2/256^2 (20 steps), equal mix, 6 req/s",
        _small_images,
    ),
    "shifting": TraceSpec(
        "shifting",
        1.0,
        "image-heavy turning video-heavy: P(video) rises linearly 0.1 -> 0.9",
        _shifting,
    ),
}


def make_trace(
    name: str,
    *,
    rate: float | None = None,
    duration_s: float = 1800.0,
    seed: int = 0,
    arrival: Arrival = "constant",
    cv: float = 3.0,
    slo_s: float | None = None,
    video_share: tuple[float, float] = (0.1, 0.9),
) -> list[TraceRequest]:
    """A built-in trace: ``duration_s`` seconds of arrivals at ``rate`` req/s.

    ``name`` is one of :data:`TRACES` (flux, sd3, cogvideox, hunyuanvideo, mixed,
    shifting). The same arguments and seed always give the same trace.
    """
    spec = TRACES.get(name)
    if spec is None:
        raise TraceError(f"unknown trace {name!r} (one of {', '.join(sorted(TRACES))})")
    r = spec.rate if rate is None else rate
    if r <= 0 or duration_s <= 0:
        raise TraceError("rate and duration must be > 0")
    rng = random.Random(f"{name}:{seed}")
    n = max(1, math.floor(r * duration_s + 1e-9))
    times = arrival_times(n, r, arrival, rng, cv=cv)
    mix = spec.build(n, rng, video_share[0], video_share[1])
    return [
        TraceRequest(
            arrival_s=round(t, 6),
            model=fam,
            height=h,
            width=w,
            num_frames=f,
            num_inference_steps=steps,
            slo_s=slo_s,
            request_id=f"r{i:06d}",
        )
        for i, (t, (fam, (h, w, f, steps))) in enumerate(zip(times, mix, strict=True))
    ]


def to_request_specs(
    requests: Sequence[TraceRequest],
    *,
    resolve_model: Callable[[str], str] | None = None,
    slo_for: Callable[[TraceRequest, str], float | None] | None = None,
    offset_s: float = 0.0,
) -> list[RequestSpec]:
    """Trace requests as the scheduler core's :class:`RequestSpec` (ids ``r<index>``).

    ``resolve_model`` maps a trace's model (family or served name) to the served model
    name (raise TraceError for unknown ones); ``slo_for(request, served_name)`` gives
    the latency budget for requests without an explicit ``slo_s``.
    """
    out: list[RequestSpec] = []
    for i, req in enumerate(requests):
        model = resolve_model(req.model) if resolve_model else req.model
        slo = req.slo_s
        if slo is None and slo_for is not None:
            slo = slo_for(req, model)
        params: dict[str, object] = {"prompt": f"trace request {i}", "seed": i}
        if req.guidance_scale is not None:
            params["guidance_scale"] = req.guidance_scale
        out.append(
            RequestSpec(
                request_id=req.request_id or f"r{i:06d}",
                model=model,
                shape=req.shape,
                arrival=req.arrival_s + offset_s,
                slo_s=slo,
                params=params,
            )
        )
    return out
