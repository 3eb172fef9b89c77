"""FluxPipeline adapter (guidance-distilled; optional true CFG with a negative prompt)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trident.pipelines.families.base import FamilyStages, drop_none, to_numpy_output

__all__ = ["FluxStages"]


class FluxStages(FamilyStages):
    family_params = ("prompt_2", "negative_prompt_2", "true_cfg_scale", "max_sequence_length")

    def _configure(self, pipe: Any) -> None:
        from diffusers.image_processor import VaeImageProcessor

        factor = self.meta.vae_scale_factor_spatial
        pipe.vae_scale_factor = factor
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=factor * 2)

    @staticmethod
    def _true_cfg(params: Mapping[str, Any]) -> bool:
        # Mirrors FluxPipeline.__call__: true CFG needs a scale > 1 *and* a negative prompt.
        return (
            float(params.get("true_cfg_scale") or 1.0) > 1
            and params.get("negative_prompt") is not None
        )

    def _encode(self, pipe: Any, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        msl = self.max_sequence_length(pipe, params)
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=self.prompt(params),
            prompt_2=self.prompt(params, "prompt_2"),
            device=pipe._execution_device,
            max_sequence_length=msl,
        )
        out = drop_none(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if self._true_cfg(params):
            neg, neg_pooled, _ = pipe.encode_prompt(
                prompt=self.prompt(params, "negative_prompt"),
                prompt_2=self.prompt(params, "negative_prompt_2"),
                device=pipe._execution_device,
                max_sequence_length=msl,
            )
            out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return out

    def _diffuse(
        self,
        pipe: Any,
        inputs: dict[str, torch.Tensor],
        params: Mapping[str, Any],
        seeds: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "prompt_embeds", "pooled_prompt_embeds")
        kwargs = self.diffuse_kwargs(pipe, params, seeds, cancel)
        (latents,) = pipe(
            **inputs, true_cfg_scale=float(params.get("true_cfg_scale") or 1.0), **kwargs
        )
        if (state := self.paused(pipe, latents)) is not None:
            return state  # packed latents: the next chunk passes them back as they are
        # Unpack here so decode needs no height/width: Flux's own _unpack_latents.
        height = kwargs.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
        width = kwargs.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
        return {"latents": pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)}

    def _decode(
        self, pipe: Any, inputs: dict[str, torch.Tensor], params: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "latents")
        vae = pipe.vae
        latents = (inputs["latents"] / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return to_numpy_output(pipe.image_processor.postprocess(image, output_type="np"))
