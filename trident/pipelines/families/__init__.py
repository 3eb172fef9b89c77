"""Family adapters: one module per diffusers pipeline family (imports torch)."""

from __future__ import annotations

from trident.pipelines.families.base import FamilyStages
from trident.pipelines.families.cogvideox import CogVideoXStages
from trident.pipelines.families.flux import FluxStages
from trident.pipelines.families.hunyuanvideo import HunyuanVideoStages
from trident.pipelines.families.sd3 import SD3Stages
from trident.pipelines.families.wan import WanStages

__all__ = ["ADAPTERS", "FamilyStages"]

ADAPTERS: dict[str, type[FamilyStages]] = {
    "flux": FluxStages,
    "sd3": SD3Stages,
    "wan": WanStages,
    "cogvideox": CogVideoXStages,
    "hunyuanvideo": HunyuanVideoStages,
}
