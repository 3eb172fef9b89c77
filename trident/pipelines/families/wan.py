"""WanPipeline adapter (text-to-video, classifier-free guidance when guidance_scale > 1)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trident.pipelines.families.base import FamilyStages, drop_none, to_numpy_output

__all__ = ["WanStages"]


class WanStages(FamilyStages):
    family_params = ("max_sequence_length",)

    def _configure(self, pipe: Any) -> None:
        from diffusers.video_processor import VideoProcessor

        pipe.vae_scale_factor_spatial = self.meta.vae_scale_factor_spatial
        pipe.vae_scale_factor_temporal = self.meta.vae_scale_factor_temporal
        pipe.video_processor = VideoProcessor(vae_scale_factor=self.meta.vae_scale_factor_spatial)

    def _encode(self, pipe: Any, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        embeds, neg = pipe.encode_prompt(
            prompt=self.prompt(params),
            negative_prompt=self.prompt(params, "negative_prompt"),
            do_classifier_free_guidance=self.guidance(params) > 1,
            max_sequence_length=self.max_sequence_length(pipe, params),
            device=pipe._execution_device,
        )
        return drop_none(prompt_embeds=embeds, negative_prompt_embeds=neg)

    def _diffuse(
        self,
        pipe: Any,
        inputs: dict[str, torch.Tensor],
        params: Mapping[str, Any],
        seeds: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "prompt_embeds")
        if self.guidance(params) > 1:
            self.require(inputs, "negative_prompt_embeds")
        (latents,) = pipe(**inputs, **self.diffuse_kwargs(pipe, params, seeds, cancel))
        return self.paused(pipe, latents) or {"latents": latents}

    def _decode(
        self, pipe: Any, inputs: dict[str, torch.Tensor], params: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "latents")
        vae = pipe.vae
        latents = inputs["latents"].to(dtype=vae.dtype)
        # Wan's latent normalisation, as in WanPipeline.__call__.
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(
            latents.device, latents.dtype
        )
        latents = latents / inv_std + mean
        video = vae.decode(latents, return_dict=False)[0]
        return to_numpy_output(pipe.video_processor.postprocess_video(video, output_type="np"))
