"""CogVideoXPipeline adapter (classifier-free guidance when guidance_scale > 1)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trident.pipelines.families.base import FamilyStages, drop_none, to_numpy_output

__all__ = ["CogVideoXStages"]


class CogVideoXStages(FamilyStages):
    family_params = ("max_sequence_length", "use_dynamic_cfg")

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
        kwargs = self.diffuse_kwargs(pipe, params, seeds, cancel)
        if params.get("use_dynamic_cfg") is not None:
            kwargs["use_dynamic_cfg"] = bool(params["use_dynamic_cfg"])
        (latents,) = pipe(**inputs, **kwargs)
        if (state := self.paused(pipe, latents)) is not None:
            return state  # padded frames and all: the next chunk passes them back
        # CogVideoX 1.5 pads latent frames to a multiple of patch_size_t; drop them here as
        # CogVideoXPipeline.__call__ does before decoding.
        num_frames = kwargs.get("num_frames") or pipe.transformer.config.sample_frames
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        p_t = pipe.transformer.config.patch_size_t
        extra = p_t - latent_frames % p_t if p_t is not None and latent_frames % p_t else 0
        return {"latents": latents[:, extra:]}

    def _decode(
        self, pipe: Any, inputs: dict[str, torch.Tensor], params: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "latents")
        video = pipe.decode_latents(inputs["latents"].to(pipe.vae.dtype))
        return to_numpy_output(pipe.video_processor.postprocess_video(video, output_type="np"))
