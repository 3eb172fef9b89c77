"""The cost model: latency, peak memory, weights and tensor sizes of pipeline stages.

:class:`ReferenceCostModel` implements :class:`trident.sched.types.CostModel`. It is the
planner's estimate and the simulator's ground truth (the simulator adds its own noise).
Importable without torch: simulated ("sim") workers call :func:`load_cost_model` to know
how long to sleep.

Sources, in order of precedence, per (family, stage, degree):

1. **Profile files** written by ``trident profile`` (schema ``trident-profile/1``, see
   :func:`read_profile`): measured seconds and peak bytes at a set of shapes, plus the
   weights' bytes of each stage.
2. **Built-in reference**: diffuse per-step seconds at degrees 1/2/4/8 for flux, sd3,
   cogvideox and hunyuanvideo from the TridentServe authors' public profiler table
   (``data/diffuse_step_seconds.csv``; device presumably NVIDIA L20 — speed 1.0).
   Everything else in the reference (encode and decode time, every memory figure,
   tensor sizes, the whole ``wan`` family) is an **estimate**; each is documented next
   to its number in :data:`REFERENCE_FAMILIES`.

Interpolation over shapes: per (stage, degree), a monotone (isotonic) piecewise-linear
fit in log(height*width*frames) -> log(value); outside the measured range it extends
with the nearest segment's log-log slope, clamped to [0, 2] (diffuse is at most
quadratic in tokens: attention). Degrees with no data for a family are unsupported
(``math.inf`` seconds). Encode and decode run on the instance leader: their cost does
not depend on the degree (runtime contract: only diffuse runs at degree > 1).

Device speed: every figure here is for a speed-1.0 device; a device of speed ``s``
takes ``seconds / s`` (:func:`on_device`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from trident.families import FAMILIES
from trident.sched.types import DTYPE_BYTES, STAGES, Shape, Stage

__all__ = [
    "DEFAULT_EFFICIENCY",
    "PROFILE_FORMAT",
    "REFERENCE_FAMILIES",
    "FamilyEstimate",
    "LinkModel",
    "MonotoneCurve",
    "ProfileEntry",
    "ProfileFile",
    "ReferenceCostModel",
    "ScaledCostModel",
    "activation_scale",
    "batch_peak_bytes",
    "batch_stage_seconds",
    "best_degree",
    "decode_peak_bytes",
    "efficient_degrees",
    "load_cost_model",
    "memo_table",
    "model_peak_bytes",
    "model_weight_bytes",
    "on_device",
    "read_profile",
    "supported_degrees",
]

PROFILE_FORMAT = "trident-profile/1"
DEFAULT_EFFICIENCY = 0.8
GB = 10**9
MB = 10**6
# Entries a cost model's memo table (:func:`memo_table`) holds before it starts afresh
# (bounds memory on traces with unbounded shape variety; never changes a figure).
MEMO_LIMIT = 1 << 16


def on_device(seconds: float, speed: float) -> float:
    """Seconds on a device of relative ``speed`` (1.0 = the profile's device)."""
    if speed <= 0:
        raise ValueError(f"device speed must be > 0, got {speed}")
    return seconds / speed


# --------------------------------------------------------------------------- curves


class MonotoneCurve:
    """Non-decreasing piecewise-linear interpolation in log-log space.

    Points with equal x are averaged (in log y); a pool-adjacent-violators pass makes
    the fitted values non-decreasing in x (measurement noise would otherwise make a
    larger shape look cheaper). Extrapolation uses the end segments' slopes clamped to
    ``[0, max_slope]``; a single point extrapolates linearly (slope 1).
    """

    __slots__ = ("_lx", "_ly", "_slope_hi", "_slope_lo")

    def __init__(self, points: Iterable[tuple[float, float]], max_slope: float = 2.0) -> None:
        by_x: dict[float, list[float]] = {}
        for x, y in points:
            if x <= 0 or y <= 0 or not math.isfinite(x) or not math.isfinite(y):
                continue
            by_x.setdefault(math.log(x), []).append(math.log(y))
        if not by_x:
            raise ValueError("a curve needs at least one point with x > 0 and y > 0")
        xs = sorted(by_x)
        # Pool adjacent violators on (mean log y, weight).
        blocks: list[list[float]] = []  # [sum, weight, first index, last index]
        for i, x in enumerate(xs):
            ys = by_x[x]
            blocks.append([sum(ys), float(len(ys)), i, i])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                s, w, _, last = blocks.pop()
                blocks[-1][0] += s
                blocks[-1][1] += w
                blocks[-1][3] = last
        fitted = [0.0] * len(xs)
        for s, w, first, last in blocks:
            for i in range(int(first), int(last) + 1):
                fitted[i] = s / w
        self._lx = xs
        self._ly = fitted
        if len(xs) == 1:
            self._slope_lo = self._slope_hi = 1.0
        else:
            lo = (fitted[1] - fitted[0]) / (xs[1] - xs[0])
            hi = (fitted[-1] - fitted[-2]) / (xs[-1] - xs[-2])
            self._slope_lo = min(max(lo, 0.0), max_slope)
            self._slope_hi = min(max(hi, 0.0), max_slope)

    @property
    def domain(self) -> tuple[float, float]:
        return math.exp(self._lx[0]), math.exp(self._lx[-1])

    def __call__(self, x: float) -> float:
        lx = math.log(max(x, 1.0))
        xs, ys = self._lx, self._ly
        if lx <= xs[0]:
            return math.exp(ys[0] + self._slope_lo * (lx - xs[0]))
        if lx >= xs[-1]:
            return math.exp(ys[-1] + self._slope_hi * (lx - xs[-1]))
        lo, hi = 0, len(xs) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if xs[mid] <= lx:
                lo = mid
            else:
                hi = mid
        t = (lx - xs[lo]) / (xs[hi] - xs[lo])
        return math.exp(ys[lo] + t * (ys[hi] - ys[lo]))


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class FamilyEstimate:
    """Per-family figures with no published measurement: estimates, documented inline.

    Times are for the reference device (NVIDIA L20, 48 GB, ~120 dense bf16 TFLOP/s; we
    assume ~50% utilisation for big GEMMs). Weights are bf16 parameter counts x 2 bytes.
    """

    family: str
    is_video: bool
    weights: Mapping[str, int]  # stage -> bytes
    # Whether the reference diffuse time already includes the CFG (uncond) branch. A
    # request with ``shape.cfg`` on a family whose reference does not include it costs 2x.
    cfg_in_reference: bool
    encode_seconds: float  # independent of shape (prompt length is fixed by the family)
    encode_peak: int
    decode_base_s: float
    decode_s_per_px: float  # VAE decode FLOPs are proportional to output pixels
    # Decode's activation peak: base + per_px x output pixels (all frames). For video
    # families these are the figures *with* VAE tiling (how their decode must run at
    # the reference sizes); images decode untiled.
    decode_peak_base: int
    decode_peak_per_px: float
    diffuse_peak_base: int
    diffuse_peak_per_px: float  # activations ~ tokens (flash attention): / degree
    text_bytes: int  # encode output: prompt embeddings (bf16), incl. the negative prompt
    latent_channels: int
    vae_spatial: int = 8
    vae_temporal: int = 1
    # wan has no published row: its diffuse table is another family's scaled by this.
    diffuse_from: tuple[str, float] | None = None
    # Untiled decode of a video VAE (what the core weighs to decide on tiling,
    # :func:`decode_peak_bytes`): base + this x height x width x the frames one decoder
    # call holds (``decode_frames_per_call``; None: all of them). None: the figures
    # above are untiled already (images).
    decode_untiled_peak_per_px: float | None = None
    decode_frames_per_call: int | None = None
    notes: str = ""


def _reference(family: str, **figures: Any) -> FamilyEstimate:
    """``family``'s estimate: the figures given here, the flags from
    :mod:`trident.families` (video or not; whether the reference diffuse time includes a
    CFG branch: the authors profiled each family's default call, which runs one exactly
    when the family uses CFG; the reference checkpoint's VAE factors)."""
    spec = FAMILIES[family]
    return FamilyEstimate(
        family=family,
        is_video=spec.is_video,
        cfg_in_reference=spec.uses_cfg,
        vae_spatial=spec.reference.vae_spatial,
        vae_temporal=spec.reference.vae_temporal,
        **figures,
    )


REFERENCE_FAMILIES: dict[str, FamilyEstimate] = {
    est.family: est
    for est in (
        # FLUX.1-dev: transformer 11.9B -> 23.8 GB; T5-XXL encoder 4.76B (9.5 GB) + CLIP-L
        # text 123M (0.25 GB); VAE 84M (0.17 GB). Encode: T5-XXL over 512 tokens = 2*4.76e9*512
        # ~ 4.9 TFLOP ~ 0.08 s at 60 TFLOP/s + overhead -> 0.10 s. Decode: 1024^2 ~ 0.15 s on
        # L20 (SD-style VAE decoder, ~1.2 MFLOP/px... scaled linearly in pixels). Diffuse
        # activations: 4300 B/px at k=1 (2048^2 -> 18 GB: beside E+D+C weights (33.9 GB) it
        # does not fit in 48 GB, which reproduces the authors' rule ">= 2048^2 needs k >= 2"
        # for a whole-pipeline device). Guidance-distilled: no CFG branch in the reference.
        _reference(
            "flux",
            weights={"encode": 9_770_000_000, "diffuse": 23_800_000_000, "decode": 168_000_000},
            encode_seconds=0.10,
            encode_peak=1 * GB,
            decode_base_s=0.01,
            decode_s_per_px=1.35e-7,
            decode_peak_base=512 * MB,
            decode_peak_per_px=3000.0,
            diffuse_peak_base=1 * GB,
            diffuse_peak_per_px=4300.0,
            text_bytes=512 * 4096 * 2 + 768 * 2,
            latent_channels=16,
            notes="diffuse from authors' table; everything else estimated",
        ),
        # SD3-medium: MMDiT 2.03B -> 4.06 GB; CLIP-L (0.25 GB) + CLIP-G 695M (1.39 GB) +
        # T5-XXL (9.5 GB) = 11.16 GB; VAE 0.17 GB. Encode runs prompt + negative (CFG):
        # ~ 2 x T5 over 256+77 tokens -> 0.10 s. CFG batch of 2 in the reference table.
        _reference(
            "sd3",
            weights={"encode": 11_160_000_000, "diffuse": 4_060_000_000, "decode": 168_000_000},
            encode_seconds=0.10,
            encode_peak=1 * GB,
            decode_base_s=0.01,
            decode_s_per_px=1.35e-7,
            decode_peak_base=512 * MB,
            decode_peak_per_px=3000.0,
            diffuse_peak_base=1 * GB,
            diffuse_peak_per_px=2000.0,
            text_bytes=2 * 333 * 4096 * 2 + 2 * 2048 * 2,
            latent_channels=16,
            notes="diffuse from authors' table; everything else estimated",
        ),
        # CogVideoX1.5-5B: transformer ~5.6B -> 11.1 GB; T5-XXL 9.5 GB; 3D VAE 215M -> 0.43 GB.
        # Encode: T5 over 226 tokens, prompt + negative -> 0.08 s. Decode: 3D causal VAE with
        # tiling, ~7e-7 s/px (480x720x49 ~ 12 s on L20). Decode peak with tiling: ~8 GB +
        # output buffer. Diffuse activations 400 B/px at k=1 (768x1360x81 -> 34 GB).
        _reference(
            "cogvideox",
            weights={"encode": 9_520_000_000, "diffuse": 11_100_000_000, "decode": 430_000_000},
            encode_seconds=0.08,
            encode_peak=1 * GB,
            decode_base_s=0.2,
            decode_s_per_px=7.0e-7,
            decode_peak_base=8 * GB,
            decode_peak_per_px=24.0,
            diffuse_peak_base=2 * GB,
            diffuse_peak_per_px=400.0,
            # Untiled: 128 channels at full resolution, bf16, ~4 live tensors (conv in
            # and out, norm) -> ~1 KB per output pixel; the VAE decodes 2 latent frames
            # (8 output frames) per call.
            decode_untiled_peak_per_px=1024.0,
            decode_frames_per_call=8,
            text_bytes=2 * 226 * 4096 * 2,
            latent_channels=16,
            notes="diffuse from authors' table; everything else estimated",
        ),
        # HunyuanVideo: transformer 12.8B -> 25.6 GB; LLaVA-Llama-3-8B text tower 7.5B
        # (15.0 GB) + CLIP-L (0.25 GB); 3D VAE 246M -> 0.49 GB. Encode: 8B LLM over 256
        # tokens ~ 4 TFLOP -> 0.12 s. Decode ~7e-7 s/px (720x1280x129 -> ~83 s). Diffuse
        # activations 600 B/px at k=1: 720x1280x129 -> 71 GB (k=1, 2 infeasible beside 25.6
        # GB weights on 48 GB; k=4 fits), reproducing the authors' "long 720p needs k >= 4".
        # Embedded guidance: no CFG branch in the reference.
        _reference(
            "hunyuanvideo",
            weights={"encode": 15_250_000_000, "diffuse": 25_600_000_000, "decode": 490_000_000},
            encode_seconds=0.12,
            encode_peak=2 * GB,
            decode_base_s=0.2,
            decode_s_per_px=7.0e-7,
            decode_peak_base=8 * GB,
            decode_peak_per_px=24.0,
            diffuse_peak_base=2 * GB,
            diffuse_peak_per_px=600.0,
            # Untiled: 128 channels at full resolution over every frame at once, ~1 KB
            # per output pixel: 720x1280x129 -> ~130 GB, which is why it must tile.
            decode_untiled_peak_per_px=1024.0,
            text_bytes=256 * 4096 * 2 + 768 * 2,
            latent_channels=16,
            notes="diffuse from authors' table; everything else estimated",
        ),
        # Wan2.1-T2V-14B: NO published row. Same VAE compression (4x8x8) and patch (1x2x2)
        # as HunyuanVideo, so the same token count per pixel; 14B vs 12.8B parameters
        # (x1.09) and Wan runs CFG (guidance 5.0: x2 batch) where HunyuanVideo does not:
        # diffuse = hunyuanvideo's table x 2.19. Weights: transformer 14B -> 28 GB; umT5-XXL
        # encoder 5.7B -> 11.4 GB; Wan-VAE 127M (0.25 GB). Encode: umT5 over 512 tokens,
        # prompt + negative -> 0.20 s. Wan-VAE decodes ~2.5x faster than HunyuanVideo's
        # (Wan report) -> 3e-7 s/px. Diffuse activations as HunyuanVideo's, x2 for the CFG
        # batch.
        _reference(
            "wan",
            weights={"encode": 11_400_000_000, "diffuse": 28_000_000_000, "decode": 254_000_000},
            encode_seconds=0.20,
            encode_peak=2 * GB,
            decode_base_s=0.2,
            decode_s_per_px=3.0e-7,
            decode_peak_base=6 * GB,
            decode_peak_per_px=24.0,
            diffuse_peak_base=2 * GB,
            diffuse_peak_per_px=1200.0,
            # Untiled: 96 channels at full resolution, ~4 live tensors (~768 B per output
            # pixel); the causal Wan-VAE decodes one latent frame (4 frames) per call.
            decode_untiled_peak_per_px=768.0,
            decode_frames_per_call=4,
            text_bytes=2 * 512 * 4096 * 2,
            latent_channels=16,
            diffuse_from=("hunyuanvideo", (14.0 / 12.8) * 2.0),
            notes="ALL estimated (scaled from hunyuanvideo)",
        ),
    )
}


@dataclass(frozen=True)
class LinkModel:
    """Bandwidths (bytes/s) and latencies (s). Estimates for an L20 cluster: PCIe Gen4
    peer-to-peer within a node (no NVLink on L20) ~20 GB/s effective; 100 Gb/s RDMA
    between nodes ~10 GB/s effective; host pinned memory -> GPU ~12 GB/s; local NVMe ~2
    GB/s; a fixed overhead per weight load (allocator, module setup)."""

    intra_node_bw: float = 20e9
    inter_node_bw: float = 10e9
    intra_node_latency: float = 0.0005
    inter_node_latency: float = 0.001
    peer_load_bw: float = 20e9
    node_cache_load_bw: float = 12e9
    disk_load_bw: float = 2e9
    load_overhead_s: float = 0.2


# --------------------------------------------------------------------------- profile files


@dataclass(frozen=True)
class ProfileEntry:
    stage: Stage
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    degree: int
    seconds: float
    peak_bytes: int
    repeats: int = 1
    batch: int = 1  # requests in one batched call (diffuse); seconds are the call's

    @property
    def pixels(self) -> int:
        return self.height * self.width * self.num_frames


@dataclass(frozen=True)
class ProfileFile:
    device: str
    dtype: str
    family: str
    model: str
    weights_bytes: Mapping[str, int]
    entries: tuple[ProfileEntry, ...]
    # Whether its decode entries ran with VAE tiling (the document's decode_options).
    decode_tiled: bool = False


def _decode_tiled(options: object) -> bool:
    return isinstance(options, Mapping) and bool(options.get("vae_tiling"))


def read_profile(source: str | os.PathLike[str] | Mapping[str, object]) -> ProfileFile:
    """Parse a ``trident-profile/1`` file (path) or its decoded JSON (mapping)."""
    if isinstance(source, Mapping):
        doc: Mapping[str, object] = source
    else:
        with open(source, encoding="utf-8") as f:
            doc = json.load(f)
    if doc.get("format") != PROFILE_FORMAT:
        raise ValueError(f"not a {PROFILE_FORMAT} profile: format={doc.get('format')!r}")
    raw_entries = doc.get("entries") or []
    if not isinstance(raw_entries, list):
        raise ValueError("profile 'entries' must be a list")
    entries = []
    for e in raw_entries:
        stage = str(e["stage"])
        if stage not in STAGES:
            raise ValueError(f"profile entry has unknown stage {stage!r}")
        entries.append(
            ProfileEntry(
                stage=stage,  # type: ignore[arg-type]
                height=int(e["height"]),
                width=int(e["width"]),
                num_frames=int(e.get("num_frames", 1) or 1),
                num_inference_steps=int(e.get("num_inference_steps", 1) or 1),
                degree=int(e.get("degree", 1) or 1),
                seconds=float(e["seconds"]),
                peak_bytes=int(e.get("peak_bytes", 0) or 0),
                repeats=int(e.get("repeats", 1) or 1),
                batch=int(e.get("batch", 1) or 1),
            )
        )
    wb = doc.get("weights_bytes") or {}
    if not isinstance(wb, Mapping):
        raise ValueError("profile 'weights_bytes' must be an object")
    return ProfileFile(
        device=str(doc.get("device", "")),
        dtype=str(doc.get("dtype", "")),
        family=str(doc["family"]),
        model=str(doc.get("model", "")),
        weights_bytes={str(k): int(v) for k, v in wb.items()},
        entries=tuple(entries),
        decode_tiled=_decode_tiled(doc.get("decode_options")),
    )


# --------------------------------------------------------------------------- the model


def _load_reference_table() -> dict[str, dict[int, list[tuple[float, float]]]]:
    """family -> degree -> [(pixels, per-step seconds)] from the packaged CSV."""
    text = (
        resources.files("trident.sched")
        .joinpath("data/diffuse_step_seconds.csv")
        .read_text(encoding="utf-8")
    )
    rows = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for row in csv.DictReader(io.StringIO("\n".join(rows))):
        px = float(row["height"]) * float(row["width"]) * float(row["frames"])
        fam = out.setdefault(row["model"], {})
        for k in (1, 2, 4, 8):
            fam.setdefault(k, []).append((px, float(row[f"k{k}"])))
    return out


@dataclass
class _Measured:
    seconds: MonotoneCurve
    peak: MonotoneCurve | None


@dataclass
class _Family:
    est: FamilyEstimate
    diffuse_step: dict[int, MonotoneCurve] = field(default_factory=dict)  # reference
    measured: dict[tuple[str, int], _Measured] = field(default_factory=dict)  # profiles
    # Batched diffuse calls from profiles: degree -> curve over pixels x batch.
    batched: dict[int, _Measured] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    decode_tiled: bool = False  # the measured decode entries ran with VAE tiling


class ReferenceCostModel:
    """:class:`~trident.sched.types.CostModel` from the reference table, estimates and
    optional ``trident profile`` files. See the module docstring for the precedence."""

    def __init__(
        self,
        profiles: Sequence[ProfileFile] = (),
        links: LinkModel | None = None,
        families: Mapping[str, FamilyEstimate] | None = None,
        efficiency: float = DEFAULT_EFFICIENCY,
    ) -> None:
        self.links = links or LinkModel()
        self.efficiency = efficiency
        # Memoised figures (pure functions of the family data; add_profile drops them).
        self._generation = 0
        self._seconds: dict[tuple[str, str, Shape, int], float] = {}
        self._memos: dict[str, dict[Any, Any]] = {}
        estimates = dict(families or REFERENCE_FAMILIES)
        table = _load_reference_table()
        self._families: dict[str, _Family] = {}
        for name, est in estimates.items():
            fam = _Family(est=est, weights=dict(est.weights))
            src = table.get(name)
            scale = 1.0
            if src is None and est.diffuse_from is not None:
                src = table.get(est.diffuse_from[0])
                scale = est.diffuse_from[1]
            for k, pts in (src or {}).items():
                fam.diffuse_step[k] = MonotoneCurve((x, y * scale) for x, y in pts)
            self._families[name] = fam
        for prof in profiles:
            self.add_profile(prof)

    # ------------------------------------------------------------------ building

    def add_profile(self, prof: ProfileFile) -> None:
        """Measured entries override the reference for their (stage, degree)."""
        self._invalidate()
        try:
            self._add_profile(prof)
        finally:
            self._invalidate()

    def _invalidate(self) -> None:
        """Drop every memoised figure (the family data changed)."""
        self._generation += 1
        self._seconds = {}
        self._memos = {}

    def _memo(self, name: str) -> dict[Any, Any]:
        """The memo table ``name`` (see :func:`memo_table`)."""
        table = self._memos.get(name)
        if table is None or len(table) >= MEMO_LIMIT:
            table = self._memos[name] = {}
        return table

    def _add_profile(self, prof: ProfileFile) -> None:
        fam = self._families.get(prof.family)
        if fam is None:
            base = REFERENCE_FAMILIES.get(prof.family) or replace(
                REFERENCE_FAMILIES["flux"],
                family=prof.family,
                notes="unknown family: flux estimates",
            )
            fam = _Family(est=base, weights=dict(base.weights))
            self._families[prof.family] = fam
        for stage, nbytes in prof.weights_bytes.items():
            if stage in STAGES and nbytes > 0:
                fam.weights[stage] = int(nbytes)
        if any(e.stage == "decode" for e in prof.entries):
            fam.decode_tiled = prof.decode_tiled
        groups: dict[tuple[str, int], list[ProfileEntry]] = {}
        batched: dict[int, list[ProfileEntry]] = {}
        for e in prof.entries:
            deg = e.degree if e.stage == "diffuse" else 1
            if e.batch > 1:
                if e.stage == "diffuse":
                    batched.setdefault(deg, []).append(e)
                continue  # encode/decode run member by member: batch-1 figures serve
            groups.setdefault((e.stage, deg), []).append(e)
        for deg, entries in batched.items():
            pts = [(e.pixels * e.batch, e.seconds / max(1, e.num_inference_steps)) for e in entries]
            peaks = [(e.pixels * e.batch, float(e.peak_bytes)) for e in entries if e.peak_bytes > 0]
            fam.batched[deg] = _Measured(
                MonotoneCurve(pts), MonotoneCurve(peaks, max_slope=1.0) if peaks else None
            )
        for key, entries in groups.items():
            stage = key[0]

            def per(e: ProfileEntry, stage: str = stage) -> float:
                return (
                    e.seconds / max(1, e.num_inference_steps) if stage == "diffuse" else e.seconds
                )

            secs = MonotoneCurve((e.pixels, per(e)) for e in entries)
            peaks = [(e.pixels, float(e.peak_bytes)) for e in entries if e.peak_bytes > 0]
            fam.measured[key] = _Measured(
                secs, MonotoneCurve(peaks, max_slope=1.0) if peaks else None
            )

    # ------------------------------------------------------------------ queries

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self._families)

    def _fam(self, family: str) -> _Family:
        try:
            return self._families[family]
        except KeyError:
            raise ValueError(f"no cost data for family {family!r}") from None

    def degrees(self, family: str) -> tuple[int, ...]:
        """Degrees the diffuse stage has data for."""
        fam = self._fam(family)
        ks = set(fam.diffuse_step) | {k for (s, k) in fam.measured if s == "diffuse"}
        return tuple(sorted(ks)) or (1,)

    def stage_seconds(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> float:
        key = (family, stage, shape, degree)
        memo = self._seconds
        try:
            hit = memo.get(key)
        except TypeError:  # an unhashable shape-like argument: no memo
            return self._stage_seconds(family, stage, shape, degree)
        if hit is None:
            hit = self._stage_seconds(family, stage, shape, degree)
            if len(memo) >= MEMO_LIMIT:
                memo = self._seconds = {}
            memo[key] = hit
        return hit

    def _stage_seconds(self, family: str, stage: Stage, shape: Shape, degree: int) -> float:
        fam = self._fam(family)
        est = fam.est
        px = shape.pixels
        if stage == "diffuse":
            m = fam.measured.get(("diffuse", degree))
            if m is not None:
                per_step = m.seconds(px)
            elif degree in fam.diffuse_step:
                per_step = fam.diffuse_step[degree](px)
            else:
                return math.inf
            if shape.cfg and not est.cfg_in_reference:
                per_step *= 2.0
            return per_step * max(1, shape.num_inference_steps)
        m = fam.measured.get((stage, 1))
        if m is not None:
            return m.seconds(px)
        if stage == "encode":
            return est.encode_seconds
        return est.decode_base_s + est.decode_s_per_px * px

    def stage_seconds_batched(
        self, family: str, stage: Stage, shape: Shape, degree: int = 1, batch: int = 1
    ) -> float:
        """Seconds of one call running ``stage`` for ``batch`` requests of ``shape``.

        Encode and decode run member by member in a batch: ``batch`` times one. Diffuse:
        a measured batched profile when there is one; else the **estimate** that a batch
        of b requests of p pixels costs what one request of b*p pixels costs (the same
        tokens through the same linear layers; attention is per member, so this errs
        high), never more than b separate calls and never less than one. Small shapes
        leave a GPU underused (flux per-step time doubles from 128^2 to 256^2 for 4x the
        pixels), which is exactly where this estimate says batching pays.
        """
        single = self.stage_seconds(family, stage, shape, degree)
        if batch <= 1 or not math.isfinite(single):
            return single
        if stage != "diffuse":
            return batch * single
        fam = self._fam(family)
        big = replace(shape, height=shape.height * batch)  # b*p pixels, same frames
        m = fam.batched.get(degree)
        if m is not None:
            per_step = m.seconds(shape.pixels * batch)
            if shape.cfg and not fam.est.cfg_in_reference:
                per_step *= 2.0
            together = per_step * max(1, shape.num_inference_steps)
        else:
            together = self.stage_seconds(family, stage, big, degree)
        return min(batch * single, max(single, together))

    def batch_peak_bytes(
        self, family: str, stage: Stage, shape: Shape, degree: int = 1, batch: int = 1
    ) -> int:
        """Peak activation bytes of one batched call: encode and decode run member by
        member (one member's peak); diffuse holds every member's activations (a measured
        batched profile, else ``batch`` times one member's peak — conservative)."""
        single = self.stage_peak_bytes(family, stage, shape, degree)
        if batch <= 1 or stage != "diffuse":
            return single
        m = self._fam(family).batched.get(degree)
        if m is not None and m.peak is not None:
            return max(single, math.ceil(m.peak(shape.pixels * batch) - 1e-6))
        return batch * single

    def stage_peak_bytes(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> int:
        fam = self._fam(family)
        est = fam.est
        px = shape.pixels
        key = (stage, degree if stage == "diffuse" else 1)
        m = fam.measured.get(key)
        if m is not None and m.peak is not None:
            return math.ceil(m.peak(px) - 1e-6)
        if stage == "encode":
            return est.encode_peak
        if stage == "decode":
            return int(est.decode_peak_base + est.decode_peak_per_px * px)
        cfg = 2.0 if (shape.cfg and not est.cfg_in_reference) else 1.0
        return int(est.diffuse_peak_base + est.diffuse_peak_per_px * px * cfg / max(1, degree))

    def decode_peak_bytes(self, family: str, shape: Shape, tiled: bool) -> int:
        """Decode's activation peak with or without VAE tiling. A profile's figure where
        it was measured that way; else the family's estimate (:class:`FamilyEstimate`:
        a video family's reference figures are tiled, its untiled one separate)."""
        fam = self._fam(family)
        est = fam.est
        m = fam.measured.get(("decode", 1))
        if m is not None and m.peak is not None and fam.decode_tiled == tiled:
            return math.ceil(m.peak(shape.pixels) - 1e-6)
        if est.decode_untiled_peak_per_px is None:  # images: one figure, either way
            if m is not None and m.peak is not None:
                return math.ceil(m.peak(shape.pixels) - 1e-6)
            return int(est.decode_peak_base + est.decode_peak_per_px * shape.pixels)
        if tiled:
            return int(est.decode_peak_base + est.decode_peak_per_px * shape.pixels)
        frames = max(1, int(shape.num_frames or 1))
        if est.decode_frames_per_call:
            frames = min(frames, est.decode_frames_per_call)
        px = int(shape.height) * int(shape.width) * frames
        return int(est.decode_peak_base + est.decode_untiled_peak_per_px * px)

    def weight_bytes(self, family: str, stage: Stage) -> int:
        return self._fam(family).weights.get(stage, 0)

    def output_bytes(self, family: str, stage: Stage, shape: Shape) -> int:
        """encode: prompt embeddings (bf16); diffuse: latents (fp32); decode: pixels as
        float32 HxWx3 per frame (the runtime's decode contract)."""
        est = self._fam(family).est
        if stage == "encode":
            return est.text_bytes
        if stage == "diffuse":
            s = est.vae_spatial
            lat_frames = (
                1 if shape.num_frames <= 1 else (shape.num_frames - 1) // est.vae_temporal + 1
            )
            return (shape.height // s) * (shape.width // s) * lat_frames * est.latent_channels * 4
        return shape.pixels * 3 * 4

    def transfer_seconds(self, nbytes: int, same_node: bool) -> float:
        if nbytes <= 0:
            return 0.0
        ln = self.links
        if same_node:
            return ln.intra_node_latency + nbytes / ln.intra_node_bw
        return ln.inter_node_latency + nbytes / ln.inter_node_bw

    def load_seconds(self, family: str, stage: Stage, source: str) -> float:
        ln = self.links
        bw = {"peer": ln.peer_load_bw, "node-cache": ln.node_cache_load_bw}.get(
            source, ln.disk_load_bw
        )
        return ln.load_overhead_s + self.weight_bytes(family, stage) / bw

    # ------------------------------------------------------------------ derived

    def efficient_degrees(
        self, family: str, shape: Shape, max_degree: int = 8, efficiency: float | None = None
    ) -> tuple[int, ...]:
        return efficient_degrees(
            self, family, shape, max_degree, self.efficiency if efficiency is None else efficiency
        )

    def standalone_seconds(self, family: str, shape: Shape, degree: int) -> float:
        """encode + diffuse at ``degree`` + decode, no queueing or transfer."""
        return (
            self.stage_seconds(family, "encode", shape)
            + self.stage_seconds(family, "diffuse", shape, degree)
            + self.stage_seconds(family, "decode", shape)
        )


def decode_peak_bytes(cost: object, family: str, shape: Shape, tiled: bool) -> int:
    """Decode's activation peak with (``tiled``) or without VAE tiling, from any
    CostModel: its ``decode_peak_bytes`` where it has one, else its decode peak (one
    figure for both)."""
    fn = getattr(cost, "decode_peak_bytes", None)
    if fn is not None:
        return int(fn(family, shape, tiled))
    return int(cost.stage_peak_bytes(family, "decode", shape, 1))  # type: ignore[attr-defined]


def memo_table(cost: object, name: str) -> dict[Any, Any] | None:
    """A dict in which to memoise figures derived from ``cost``'s answers alone (pure
    functions of their arguments and the cost model), or None when ``cost`` may not be
    memoised. Only the built-in models are (exactly :class:`ReferenceCostModel` and
    :class:`ScaledCostModel` over one; a subclass may answer differently): each holds
    its own tables (never shared between two models), dropped when the model changes
    (:meth:`ReferenceCostModel.add_profile`; a Scaled model's ``base`` or ``factor``).
    Keys must be hashable and include every argument the figure depends on."""
    t = type(cost)
    if t is ReferenceCostModel or t is ScaledCostModel:
        return cost._memo(name)  # type: ignore[attr-defined, no-any-return]
    return None


def _memoised(cost: object, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(cost, *args)``, from ``cost``'s memo table named after ``fn`` when it has one
    (:func:`memo_table`) and the arguments are hashable."""
    memo = memo_table(cost, fn.__name__)
    if memo is None:
        return fn(cost, *args)
    try:
        hit = memo.get(args)
    except TypeError:  # an unhashable shape-like argument: no memo
        return fn(cost, *args)
    if hit is None:
        hit = memo[args] = fn(cost, *args)
    return hit


def efficient_degrees(
    cost: object,
    family: str,
    shape: Shape,
    max_degree: int = 8,
    efficiency: float = DEFAULT_EFFICIENCY,
) -> tuple[int, ...]:
    """Degrees k (powers of two up to ``max_degree``) with (t1/tk)/k >= ``efficiency``.
    Degree 1 is always efficient. Works with any CostModel (memoised for the built-in
    ones, :func:`memo_table`)."""
    return _memoised(cost, _efficient_degrees, family, shape, max_degree, efficiency)  # type: ignore[no-any-return]


def _efficient_degrees(
    cost: object, family: str, shape: Shape, max_degree: int, efficiency: float
) -> tuple[int, ...]:
    sec = cost.stage_seconds  # type: ignore[attr-defined]
    t1 = sec(family, "diffuse", shape, 1)
    out = [1]
    k = 2
    while k <= max_degree:
        tk = sec(family, "diffuse", shape, k)
        if 0 < tk < math.inf and (t1 / tk) / k >= efficiency - 1e-9:
            out.append(k)
        k *= 2
    return tuple(out)


def supported_degrees(
    cost: object, family: str, shape: Shape, max_degree: int = 8
) -> tuple[int, ...]:
    """Degrees k (powers of two up to ``max_degree``) the diffuse stage can run at (finite
    time in the cost model); 1 always. Works with any CostModel (memoised for the
    built-in ones, :func:`memo_table`)."""
    return _memoised(cost, _supported_degrees, family, shape, max_degree)  # type: ignore[no-any-return]


def _supported_degrees(cost: object, family: str, shape: Shape, max_degree: int) -> tuple[int, ...]:
    sec = cost.stage_seconds  # type: ignore[attr-defined]
    out = [1]
    k = 2
    while k <= max_degree:
        if 0 < sec(family, "diffuse", shape, k) < math.inf:
            out.append(k)
        k *= 2
    return tuple(out)


def model_weight_bytes(cost: object, info: object, stage: Stage) -> int:
    """Weights of ``stage`` of a served model on a device: the model's own figure
    (``ModelInfo.stage_weight_bytes``, read from the model directory) when it has one,
    else the cost model's figure for its family (bfloat16) scaled to the model's
    ``dtype``. Works with any CostModel."""
    own = getattr(info, "stage_weight_bytes", None) or {}
    nbytes = int(own.get(stage, 0) or 0)
    if nbytes > 0:
        return nbytes
    # The family's figures are bfloat16 (2 bytes per weight): scale to the model's dtype.
    per = DTYPE_BYTES.get(str(getattr(info, "dtype", "bfloat16")), 2)
    return int(cost.weight_bytes(info.family, stage)) * per // 2  # type: ignore[attr-defined]


def model_peak_bytes(
    cost: object, info: object, stage: Stage, shape: Shape, degree: int = 1
) -> int:
    """Peak activation bytes of a served model's ``stage``: the cost model's family
    figure at the model's dtype (:func:`activation_scale`). Works with any CostModel."""
    peak = cost.stage_peak_bytes(info.family, stage, shape, degree)  # type: ignore[attr-defined]
    return int(activation_scale(info) * peak)


def activation_scale(info: object) -> float:
    """How a served model's activation bytes compare with the cost model's family
    figures (bfloat16): its dtype's bytes per element / 2 (float32: 2; "auto" is sized
    as bfloat16, as its weights are: ``model_weight_bytes``). Works with any ModelInfo."""
    return DTYPE_BYTES.get(str(getattr(info, "dtype", "bfloat16")), 2) / 2


def best_degree(
    cost: object,
    family: str,
    shape: Shape,
    max_degree: int = 8,
    efficiency: float = DEFAULT_EFFICIENCY,
) -> int:
    """The efficient degree with the shortest diffuse time (memoised for the built-in
    cost models, :func:`memo_table`)."""
    return _memoised(cost, _best_degree, family, shape, max_degree, efficiency)  # type: ignore[no-any-return]


def _best_degree(
    cost: object, family: str, shape: Shape, max_degree: int, efficiency: float
) -> int:
    sec = cost.stage_seconds  # type: ignore[attr-defined]
    ks = efficient_degrees(cost, family, shape, max_degree, efficiency)
    return min(ks, key=lambda k: (sec(family, "diffuse", shape, k), k))


def batch_stage_seconds(
    cost: object, family: str, stage: Stage, shape: Shape, degree: int = 1, batch: int = 1
) -> float:
    """Seconds of one call running ``stage`` for ``batch`` same-shape requests. Uses the
    model's ``stage_seconds_batched`` when it has one, else ``batch`` separate calls.
    Works with any CostModel."""
    own = getattr(cost, "stage_seconds_batched", None)
    if own is not None:
        return float(own(family, stage, shape, degree, batch))
    return max(1, batch) * float(cost.stage_seconds(family, stage, shape, degree))  # type: ignore[attr-defined]


def batch_peak_bytes(
    cost: object, family: str, stage: Stage, shape: Shape, degree: int = 1, batch: int = 1
) -> int:
    """Peak activation bytes of one batched call (see
    :meth:`ReferenceCostModel.batch_peak_bytes`). Works with any CostModel."""
    own = getattr(cost, "batch_peak_bytes", None)
    if own is not None:
        return int(own(family, stage, shape, degree, batch))
    single = int(cost.stage_peak_bytes(family, stage, shape, degree))  # type: ignore[attr-defined]
    return single * max(1, batch) if stage == "diffuse" else single


class ScaledCostModel:
    """A cost model whose times are multiplied by ``factor`` (memory unchanged).

    The scheduler of a cluster of ``sim`` devices running at ``--time-scale F`` plans
    with the same scaled times the devices sleep for, so predictions, deadlines and
    the dispatcher's look-ahead stay consistent with what the devices really do.
    """

    def __init__(self, base: ReferenceCostModel, factor: float) -> None:
        if not factor >= 0:  # 0: zero-time stages (control-plane benchmarks)
            raise ValueError(f"time scale must be >= 0, got {factor}")
        self.base = base
        self.factor = factor
        self._memos: dict[str, dict[Any, Any]] = {}
        self._memo_key: tuple[object, int, float] | None = None

    def _memo(self, name: str) -> dict[Any, Any] | None:
        """The memo table ``name`` (see :func:`memo_table`): valid while ``base`` is the
        same :class:`ReferenceCostModel`, unchanged, and ``factor`` the same; None for
        any other base."""
        base = self.base
        if type(base) is not ReferenceCostModel:
            return None
        key = self._memo_key
        if key is None or key[0] is not base or key[1] != base._generation or key[2] != self.factor:
            self._memos = {}
            self._memo_key = (base, base._generation, self.factor)
        table = self._memos.get(name)
        if table is None or len(table) >= MEMO_LIMIT:
            table = self._memos[name] = {}
        return table

    def stage_seconds(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> float:
        return self.base.stage_seconds(family, stage, shape, degree) * self.factor

    def stage_peak_bytes(self, family: str, stage: Stage, shape: Shape, degree: int = 1) -> int:
        return self.base.stage_peak_bytes(family, stage, shape, degree)

    def stage_seconds_batched(
        self, family: str, stage: Stage, shape: Shape, degree: int = 1, batch: int = 1
    ) -> float:
        return self.base.stage_seconds_batched(family, stage, shape, degree, batch) * self.factor

    def batch_peak_bytes(
        self, family: str, stage: Stage, shape: Shape, degree: int = 1, batch: int = 1
    ) -> int:
        return self.base.batch_peak_bytes(family, stage, shape, degree, batch)

    def weight_bytes(self, family: str, stage: Stage) -> int:
        return self.base.weight_bytes(family, stage)

    def decode_peak_bytes(self, family: str, shape: Shape, tiled: bool) -> int:
        return decode_peak_bytes(self.base, family, shape, tiled)

    def output_bytes(self, family: str, stage: Stage, shape: Shape) -> int:
        return self.base.output_bytes(family, stage, shape)

    def transfer_seconds(self, nbytes: int, same_node: bool) -> float:
        return self.base.transfer_seconds(nbytes, same_node) * self.factor

    def load_seconds(self, family: str, stage: Stage, source: str) -> float:
        return self.base.load_seconds(family, stage, source) * self.factor

    def degrees(self, family: str) -> tuple[int, ...]:
        return self.base.degrees(family)

    def efficient_degrees(
        self, family: str, shape: Shape, max_degree: int = 8, efficiency: float | None = None
    ) -> tuple[int, ...]:
        return self.base.efficient_degrees(family, shape, max_degree, efficiency)

    def standalone_seconds(self, family: str, shape: Shape, degree: int) -> float:
        return self.base.standalone_seconds(family, shape, degree) * self.factor


def load_cost_model(
    profile_paths: Iterable[str | os.PathLike[str]] | None = None,
    links: LinkModel | None = None,
) -> ReferenceCostModel:
    """The reference model plus the given profile files. With ``profile_paths=None``,
    paths listed in ``$TRIDENT_PROFILES`` (os.pathsep-separated; directories contribute
    their ``*.json``) are used, if set."""
    paths: list[Path] = []
    if profile_paths is None:
        env = os.environ.get("TRIDENT_PROFILES", "")
        profile_paths = [p for p in env.split(os.pathsep) if p]
    for p in profile_paths:
        path = Path(p)
        if path.is_dir():
            paths.extend(sorted(path.glob("*.json")))
        else:
            paths.append(path)
    return ReferenceCostModel([read_profile(p) for p in paths], links=links)
