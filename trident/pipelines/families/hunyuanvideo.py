"""HunyuanVideoPipeline adapter (embedded guidance; optional true CFG with a negative prompt)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from trident.pipelines.families.base import FamilyStages, drop_none, to_numpy_output

__all__ = ["HunyuanVideoStages"]


class HunyuanVideoStages(FamilyStages):
    family_params = ("prompt_2", "negative_prompt_2", "true_cfg_scale", "max_sequence_length")

    def _configure(self, pipe: Any) -> None:
        from diffusers.video_processor import VideoProcessor

        pipe.vae_scale_factor_spatial = self.meta.vae_scale_factor_spatial
        pipe.vae_scale_factor_temporal = self.meta.vae_scale_factor_temporal
        pipe.video_processor = VideoProcessor(vae_scale_factor=self.meta.vae_scale_factor_spatial)

    @staticmethod
    def _true_cfg(params: Mapping[str, Any]) -> bool:
        # Mirrors HunyuanVideoPipeline.__call__: needs a scale > 1 *and* a negative prompt.
        return (
            float(params.get("true_cfg_scale") or 1.0) > 1
            and params.get("negative_prompt") is not None
        )

    def _encode(self, pipe: Any, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        msl = self.max_sequence_length(pipe, params)
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=self.prompt(params),
            prompt_2=self.prompt(params, "prompt_2"),
            device=pipe._execution_device,
            max_sequence_length=msl,
        )
        out = drop_none(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask
        )
        if self._true_cfg(params):
            neg, neg_pooled, neg_mask = pipe.encode_prompt(
                prompt=self.prompt(params, "negative_prompt"),
                prompt_2=self.prompt(params, "negative_prompt_2"),
                device=pipe._execution_device,
                max_sequence_length=msl,
            )
            out.update(
                negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled,
                negative_prompt_attention_mask=neg_mask,
            )
        return out

    def _diffuse(
        self,
        pipe: Any,
        inputs: dict[str, torch.Tensor],
        params: Mapping[str, Any],
        seeds: Sequence[int] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")
        (latents,) = pipe(
            **inputs,
            true_cfg_scale=float(params.get("true_cfg_scale") or 1.0),
            **self.diffuse_kwargs(pipe, params, seeds, cancel),
        )
        return self.paused(pipe, latents) or {"latents": latents}

    def _decode(
        self, pipe: Any, inputs: dict[str, torch.Tensor], params: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        self.require(inputs, "latents")
        vae = pipe.vae
        latents = inputs["latents"].to(vae.dtype) / vae.config.scaling_factor
        video = vae.decode(latents, return_dict=False)[0]
        return to_numpy_output(pipe.video_processor.postprocess_video(video, output_type="np"))
