"""StableDiffusion3Pipeline adapter (classifier-free guidance when guidance_scale > 1)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trident.pipelines.families.base import FamilyStages, drop_none, to_numpy_output

__all__ = ["SD3Stages"]


class SD3Stages(FamilyStages):
    family_params = (
        "prompt_2",
        "prompt_3",
        "negative_prompt_2",
        "negative_prompt_3",
        "clip_skip",
        "max_sequence_length",
    )

    def _configure(self, pipe: Any) -> None:
        from diffusers.image_processor import VaeImageProcessor

        factor = self.meta.vae_scale_factor_spatial
        pipe.vae_scale_factor = factor
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=factor)

    def _encode(self, pipe: Any, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=self.prompt(params),
            prompt_2=self.prompt(params, "prompt_2"),
            prompt_3=self.prompt(params, "prompt_3"),
            negative_prompt=self.prompt(params, "negative_prompt"),
            negative_prompt_2=self.prompt(params, "negative_prompt_2"),
            negative_prompt_3=self.prompt(params, "negative_prompt_3"),
            do_classifier_free_guidance=self.guidance(params) > 1,
            device=pipe._execution_device,
            clip_skip=params.get("clip_skip"),
            max_sequence_length=self.max_sequence_length(pipe, params),
        )
        return drop_none(
            prompt_embeds=embeds,
            negative_prompt_embeds=neg,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=neg_pooled,
        )

    def _diffuse(
        self,
        pipe: Any,
        inputs: dict[str, torch.Tensor],
        params: Mapping[str, Any],
        seeds: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "prompt_embeds", "pooled_prompt_embeds")
        if self.guidance(params) > 1:
            self.require(inputs, "negative_prompt_embeds", "negative_pooled_prompt_embeds")
        (latents,) = pipe(**inputs, **self.diffuse_kwargs(pipe, params, seeds, cancel))
        return self.paused(pipe, latents) or {"latents": latents}

    def _decode(
        self, pipe: Any, inputs: dict[str, torch.Tensor], params: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "latents")
        vae = pipe.vae
        latents = (inputs["latents"] / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return to_numpy_output(pipe.image_processor.postprocess(image, output_type="np"))
