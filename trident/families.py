"""What Trident knows about each pipeline family, in one torch-free place.

Every layer reads its family facts from here: the daemon config (which family names
exist), the registry (defaults of simulated models, whether a request runs CFG), the
diffusers metadata reader (:mod:`trident.pipelines.meta`: how a directory's VAE factors,
patch size and frame limits are read from its component configs), the scheduler's cost
model (:mod:`trident.sched.cost`: video or not, CFG in the reference times, the
reference checkpoint's VAE factors) and the simulator's traces. This module imports
only the standard library, so the scheduler and simulated workers can import it without
torch.

Facts are those of diffusers (``__init__`` / ``__call__`` defaults of each pipeline and
model class, as of diffusers 0.42) and of each family's reference checkpoint (the one the
cost model's figures are for; named on each entry below).

Frame rule (videos): ``num_frames = 1 + k * t`` for the VAE's temporal factor ``t``,
giving ``k + 1`` latent frames (:func:`latent_frames`, :func:`frames_for_latent`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "PER_MEMBER_PARAMS",
    "STAGES",
    "STAGE_COMPONENTS",
    "FamilySpec",
    "Geometry",
    "Stage",
    "family_of_class",
    "fit_frames",
    "frames_for_latent",
    "latent_frames",
    "runs_cfg",
]

Stage: TypeAlias = Literal["encode", "diffuse", "decode"]
#: The stages every family's pipeline is split into, in order.
STAGES: tuple[Stage, ...] = ("encode", "diffuse", "decode")

#: Which ``model_index.json`` components each stage loads: a component belongs to a stage
#: when its name is one of these or one of these plus ``_<suffix>`` (``text_encoder_2``,
#: ``transformer_2``). Every other component is loaded as None.
STAGE_COMPONENTS: Mapping[Stage, tuple[str, ...]] = {
    "encode": ("text_encoder", "tokenizer"),
    "diffuse": ("transformer", "scheduler"),
    "decode": ("vae",),
}

#: Params the members of one batch may differ in: each request's own text and noise.
#: Every other param must be equal, and negative prompts must agree on being ``None`` or
#: not (that decides whether encode produces negative embeddings: flux / hunyuanvideo
#: true CFG). ``prompt_2`` / ``prompt_3``: the second and third text encoders' prompts of
#: flux, hunyuanvideo (2) and sd3 (2, 3).
PER_MEMBER_PARAMS: frozenset[str] = frozenset(
    {
        "prompt",
        "prompt_2",
        "prompt_3",
        "negative_prompt",
        "negative_prompt_2",
        "negative_prompt_3",
        "seed",
    }
)


# --------------------------------------------------------------------------- geometry


def latent_frames(num_frames: int, temporal: int) -> int:
    """Latent frames of ``num_frames`` output frames (``1 + k*t`` -> ``k + 1``)."""
    return 1 if num_frames <= 1 else (num_frames - 1) // max(1, temporal) + 1


def frames_for_latent(latent: int, temporal: int) -> int:
    """Output frames of ``latent`` latent frames (``k + 1`` -> ``1 + k*t``)."""
    return 1 + (max(1, latent) - 1) * max(1, temporal)


def fit_frames(num_frames: int, temporal: int, limit: int | None) -> int:
    """The largest ``1 + k*temporal`` that is at most ``num_frames`` and ``limit``."""
    n = num_frames if limit is None else min(num_frames, limit)
    return frames_for_latent(latent_frames(max(1, n), temporal), temporal)


@dataclass(frozen=True)
class Geometry:
    """A model's shape rules, as diffusers derives them from the component configs.

    ``max_patches_side`` / ``max_patches_t``: the transformer's positional table has a
    fixed size (Wan's rope table, SD3's cropped sin-cos table): at most this many patches
    per side / along the latent frames; None where the embedding is computed per shape.
    """

    vae_spatial: int  # pixels per latent pixel, per side
    vae_temporal: int = 1  # videos: num_frames = 1 + k * this
    patch: int = 1  # transformer patch per side, in latent pixels (flux: its 2x2 packing)
    patch_t: int = 1  # transformer patch along the latent frames
    max_patches_side: int | None = None
    max_patches_t: int | None = None
    table: str = ""  # the config entry that sets the limits, for messages
    # What the pipeline's check_inputs demands of height / width on its own (Wan and
    # HunyuanVideo: 16, CogVideoX: 8, whatever the VAE and patch).
    pipeline_multiple: int = 1

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return math.lcm(self.vae_spatial * self.patch, self.pipeline_multiple)

    @property
    def max_side(self) -> int | None:
        """Largest height / width in pixels the positional table covers (None: any)."""
        if self.max_patches_side is None:
            return None
        covered = self.max_patches_side * self.vae_spatial * self.patch
        return covered - covered % self.size_multiple

    @property
    def max_frames(self) -> int | None:
        """Largest ``num_frames`` the positional table covers (None: any)."""
        if self.max_patches_t is None:
            return None
        return frames_for_latent(self.max_patches_t * self.patch_t, self.vae_temporal)


Reader = Callable[[Mapping[str, Any], Mapping[str, Any]], Geometry]


def _get_int(cfg: Mapping[str, Any], key: str, default: int) -> int:
    """``cfg[key]`` as diffusers reads it: a missing key is the ``__init__`` default."""
    value = cfg.get(key, default)
    if isinstance(value, list | tuple):  # Wan's patch_size: (t, h, w)
        value = value[-1]
    return int(value) if value is not None else default


def _optional_int(cfg: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = cfg.get(key, default)
    return None if value is None else int(value)


def _vae_levels(vae: Mapping[str, Any]) -> int:
    """``2 ** (len(block_out_channels) - 1)``: the spatial factor of the 2D-style VAEs
    (diffusers' default block_out_channels has four levels: 8)."""
    return int(2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1))


def _flux_geometry(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> Geometry:
    # FluxPipeline packs 2x2 latent pixels into one token; the rope is computed per shape.
    return Geometry(vae_spatial=_vae_levels(vae), patch=2)


def _sd3_geometry(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> Geometry:
    # PatchEmbed crops a (pos_embed_max_size)^2 sin-cos table: more patches per side raise.
    return Geometry(
        vae_spatial=_vae_levels(vae),
        patch=_get_int(transformer, "patch_size", 2),
        max_patches_side=_optional_int(transformer, "pos_embed_max_size", 96),
        table="pos_embed_max_size",
    )


def _wan_geometry(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> Geometry:
    # WanRotaryPosEmbed slices a rope table of rope_max_seq_len rows per axis (frames,
    # height, width, in patches); a longer axis fails inside the transformer.
    patch = transformer.get("patch_size", (1, 2, 2))
    patch_t = int(patch[0]) if isinstance(patch, list | tuple) else 1
    rope = _optional_int(transformer, "rope_max_seq_len", 1024)
    return Geometry(
        vae_spatial=int(vae.get("scale_factor_spatial") or 8),
        vae_temporal=int(vae.get("scale_factor_temporal") or 4),
        patch=_get_int(transformer, "patch_size", 2),
        patch_t=patch_t,
        max_patches_side=rope,
        max_patches_t=rope,
        table="rope_max_seq_len",
        pipeline_multiple=16,
    )


def _cogvideox_geometry(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> Geometry:
    # Sin-cos (1.0) and rope (1.5) embeddings are recomputed for each shape: no limit.
    # (Learned positional embeddings, image-to-video checkpoints only, are not served.)
    return Geometry(
        vae_spatial=_vae_levels(vae),
        vae_temporal=_get_int(vae, "temporal_compression_ratio", 4),
        patch=_get_int(transformer, "patch_size", 2),
        patch_t=_get_int(transformer, "patch_size_t", 1),  # None (1.0) -> 1
        pipeline_multiple=8,
    )


def _hunyuanvideo_geometry(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> Geometry:
    # HunyuanVideoRotaryPosEmbed builds its grid per shape: no limit.
    return Geometry(
        vae_spatial=_get_int(vae, "spatial_compression_ratio", 8),
        vae_temporal=_get_int(vae, "temporal_compression_ratio", 4),
        patch=_get_int(transformer, "patch_size", 2),
        patch_t=_get_int(transformer, "patch_size_t", 1),
        pipeline_multiple=16,
    )


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class FamilySpec:
    """Static facts about one family.

    Defaults are the diffusers ``__call__`` defaults for the reference checkpoint (a
    served directory may say otherwise: :meth:`default_num_frames_for`);
    ``default_height`` / ``default_width`` are what simulated models (no directory) use.
    """

    name: str
    pipeline_class: str  # model_index.json "_class_name"
    is_video: bool
    # guidance_scale > 1 runs an unconditional branch (a doubled diffuse batch).
    uses_cfg: bool
    # Guidance-distilled families run a real unconditional branch only for a
    # negative_prompt with true_cfg_scale > 1 (diffusers' ``do_true_cfg``).
    true_cfg: bool
    context_parallel: bool  # the transformer has a diffusers ``_cp_plan``
    default_steps: int
    default_guidance_scale: float
    default_height: int
    default_width: int
    read_geometry: Reader  # (vae config, transformer config) -> Geometry
    reference: Geometry  # the reference checkpoint's (cost model, simulated models)
    default_num_frames: int | None = None  # None: images
    # A cap for any checkpoint of the family: a few times the frame counts the families
    # were trained at; past it the diffuse activations alone outgrow any single node.
    # A model's own limit (its positional table) may be lower: Geometry.max_frames.
    max_frames: int | None = None
    # Transformer config key whose value the pipeline uses when num_frames is None.
    num_frames_key: str | None = None
    # Frames per second a clip of the family plays at (the fps of the diffusers docs'
    # export_to_video examples): what turns an HTTP request's ``seconds`` into frames.
    default_fps: int | None = None
    stages: tuple[Stage, ...] = STAGES

    def geometry(self, vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> Geometry:
        """The geometry of a directory of this family, from its component configs."""
        return self.read_geometry(vae, transformer)

    def default_num_frames_for(self, transformer: Mapping[str, Any]) -> int | None:
        """What the pipeline uses for ``num_frames=None`` with this transformer config."""
        if not self.is_video:
            return None
        if self.num_frames_key is not None and transformer.get(self.num_frames_key):
            return int(transformer[self.num_frames_key])
        return self.default_num_frames

    def frame_limit(self, geometry: Geometry) -> int | None:
        """The most frames a model of this family with ``geometry`` can make."""
        limits = [x for x in (self.max_frames, geometry.max_frames) if x is not None]
        return min(limits) if limits else None


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        # FLUX.1-dev; guidance-distilled: guidance_scale is embedded, no uncond branch.
        FamilySpec(
            name="flux",
            pipeline_class="FluxPipeline",
            is_video=False,
            uses_cfg=False,
            true_cfg=True,
            context_parallel=True,
            default_steps=28,
            default_guidance_scale=3.5,
            default_height=1024,
            default_width=1024,
            read_geometry=_flux_geometry,
            reference=Geometry(vae_spatial=8, patch=2),
        ),
        # Stable Diffusion 3 medium (pos_embed_max_size 192: at most 3072 px per side).
        FamilySpec(
            name="sd3",
            pipeline_class="StableDiffusion3Pipeline",
            is_video=False,
            uses_cfg=True,
            true_cfg=False,
            context_parallel=False,
            default_steps=28,
            default_guidance_scale=7.0,
            default_height=1024,
            default_width=1024,
            read_geometry=_sd3_geometry,
            reference=Geometry(vae_spatial=8, patch=2, max_patches_side=192),
        ),
        # Wan2.1-T2V-14B (rope_max_seq_len 1024).
        FamilySpec(
            name="wan",
            pipeline_class="WanPipeline",
            is_video=True,
            uses_cfg=True,
            true_cfg=False,
            context_parallel=True,
            default_steps=50,
            default_guidance_scale=5.0,
            default_height=480,
            default_width=832,
            default_num_frames=81,
            max_frames=257,
            default_fps=16,
            read_geometry=_wan_geometry,
            reference=Geometry(
                8, 4, 2, 1, max_patches_side=1024, max_patches_t=1024, pipeline_multiple=16
            ),
        ),
        # CogVideoX1.5-5B (sample 768x1360x81; CogVideoX-5b 1.0: 480x720x49, read from
        # a directory's transformer config as the pipeline does). Its VAE decodes latent
        # frames in pairs: num_frames = 1 + 4k gives back 1 + 4k frames when k is even
        # (49 -> 49) but 4(k+1) when k is odd (5 -> 8), in diffusers as here. Requests are
        # validated as 1 + 4k; the output says what it is.
        FamilySpec(
            name="cogvideox",
            pipeline_class="CogVideoXPipeline",
            is_video=True,
            uses_cfg=True,
            true_cfg=False,
            context_parallel=False,
            default_steps=50,
            default_guidance_scale=6.0,
            default_height=768,
            default_width=1360,
            default_num_frames=81,
            max_frames=161,
            num_frames_key="sample_frames",
            default_fps=8,
            read_geometry=_cogvideox_geometry,
            reference=Geometry(8, 4, 2, 2, pipeline_multiple=8),
        ),
        # HunyuanVideo; guidance-distilled: guidance_scale is embedded, no uncond branch.
        FamilySpec(
            name="hunyuanvideo",
            pipeline_class="HunyuanVideoPipeline",
            is_video=True,
            uses_cfg=False,
            true_cfg=True,
            context_parallel=False,
            default_steps=50,
            default_guidance_scale=6.0,
            default_height=720,
            default_width=1280,
            default_num_frames=129,
            max_frames=257,
            default_fps=15,
            read_geometry=_hunyuanvideo_geometry,
            reference=Geometry(8, 4, 2, 1, pipeline_multiple=16),
        ),
    )
}

#: Every supported family's name, in a stable order.
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)

_BY_CLASS: dict[str, FamilySpec] = {spec.pipeline_class: spec for spec in FAMILIES.values()}


def family_of_class(class_name: str) -> FamilySpec | None:
    """The family whose diffusers pipeline class is ``class_name`` (None: unsupported)."""
    return _BY_CLASS.get(class_name)


def _number(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    f = float(value)
    return f if math.isfinite(f) else default


def runs_cfg(family: str, guidance_scale: float | None, params: Mapping[str, Any]) -> bool:
    """Whether a request runs an unconditional branch too (a doubled diffuse batch).

    CFG families: ``guidance_scale > 1``. Guidance-distilled ones (flux, hunyuanvideo):
    a ``negative_prompt`` with ``true_cfg_scale > 1``. A family not known here: by
    ``guidance_scale`` alone.
    """
    spec = FAMILIES.get(family)
    if spec is None or spec.uses_cfg:
        return guidance_scale is not None and guidance_scale > 1.0
    if spec.true_cfg:
        has_negative = params.get("negative_prompt") is not None
        return has_negative and _number(params.get("true_cfg_scale"), 1.0) > 1.0
    return False
